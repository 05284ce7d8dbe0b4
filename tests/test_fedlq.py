"""FedLQ's pure functions (fedhq.allocation.layer_bits, fedhq.fl.timing.upload_budget):
the measured layer significance against a plain-torch recomputation, and the greedy's
properties on seeded random tables, checked against brute force where it can enumerate."""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedhq.allocation.layer_bits import (
    CANDIDATE_BITS,
    LayerCost,
    LoweringPath,
    Significance,
    allocate_bits,
    client_bit_maps,
    measure_significance,
    quantize_layer,
)
from fedhq.data.base import Split
from fedhq.fl.timing import upload_budget, upload_seconds
from fedhq.models import SmallCNN


def odd_model(seed: int = 0) -> nn.Module:
    """Conv (per-channel), BatchNorm (1-d parameters and float running statistics),
    Linear, odd sizes."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(2, 5, 3),
        nn.BatchNorm2d(5),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(5 * 3 * 3, 7),
        nn.ReLU(),
        nn.Linear(7, 3),
    )
    model.train()
    model(torch.randn(16, 2, 5, 5))  # running statistics that are not the defaults
    return model


def random_split(seed: int, n: int = 37, shape=(2, 5, 5), classes: int = 3) -> Split:
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g))


def plain_fake_quant(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric min-max quantization with torch's own ops: per output channel for 2+
    dimensions, per tensor otherwise."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    eps = torch.finfo(torch.float32).eps
    if w.dim() >= 2:
        scale = (w.abs().flatten(1).amax(1) / ((qmax - qmin) / 2)).clamp(min=eps)
        zero = torch.zeros(w.shape[0], dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, qmin, qmax)
    scale = max(float(w.abs().max()) / ((qmax - qmin) / 2), eps)
    return torch.fake_quantize_per_tensor_affine(w, scale, 0, qmin, qmax)


def plain_nbytes(w: torch.Tensor, bits: int) -> int:
    channels = w.shape[0] if w.dim() >= 2 else 1
    return math.ceil(w.numel() * bits / 8) + channels * (4 + 4)  # packed codes, float32 scale, int32 zero point


@torch.no_grad()
def plain_loss(model: nn.Module, data: Split) -> float:
    model.eval()
    return float(F.cross_entropy(model(data.x), data.y))


def test_significance_matches_a_plain_torch_recomputation():
    model, data = odd_model(), random_split(1)
    bits = (8, 7, 5, 3, 2)
    sig = measure_significance(model, data, bits=bits, batch_size=10)  # several batches
    base = plain_loss(model, data)
    assert sig.base_loss == pytest.approx(base, abs=1e-6)
    names = [n for n, _ in model.named_parameters()]
    assert sorted(sig.tables) == sorted(names)
    largest = 0.0
    for name in names:
        assert sorted(sig.tables[name], reverse=True) == list(bits)
        for b in bits:
            copy = odd_model()
            weight = dict(copy.named_parameters())[name]
            with torch.no_grad():
                weight.copy_(plain_fake_quant(weight.detach().clone(), b))
            damage = plain_loss(copy, data) - base
            assert sig.tables[name][b].damage == pytest.approx(damage, abs=1e-5), (name, b)
            assert sig.tables[name][b].nbytes == plain_nbytes(weight, b), (name, b)
            largest = max(largest, abs(damage))
    assert largest > 1e-2  # the comparison saw real damage, not only zeros
    buffers = [v for k, v in model.state_dict().items() if k not in names]  # BatchNorm's, traveling float
    assert sig.fixed_bytes == sum(v.numel() * v.element_size() for v in buffers) > 0


def test_the_model_is_given_back_as_it_came():
    model = odd_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    measure_significance(model, random_split(2), bits=(4, 2))
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_subset_of_layers_is_measured_alone_and_the_others_are_kept():
    model, data = odd_model(), random_split(3)
    full = measure_significance(model, data, bits=(6, 2))
    part = measure_significance(model, data, bits=(6, 2), layers=["4.weight", "1.bias"])
    assert list(part.tables) == ["4.weight", "1.bias"]
    for name, table in part.tables.items():
        assert table == full.tables[name]
    assert part.kept == {name: 6 for name in full.tables if name not in part.tables}
    kept_bytes = sum(plain_nbytes(model.state_dict()[name], 6) for name in part.kept)
    assert part.fixed_bytes == full.fixed_bytes + kept_bytes


@pytest.mark.parametrize("layers", [None, ["0.weight", "4.weight", "6.weight"]])
def test_the_predicted_bytes_are_the_uploads_bytes(layers):
    from fedhq.fl.client import RoundPlan, payload_bytes, quantize_upload, quantized_names

    model = odd_model()
    sig = measure_significance(model, random_split(4), layers=layers)
    results = client_bit_maps(sig, [0.001, 0.01, 0.02, 0.05, 1.0], upload_s=0.1)
    assert len({tuple(r.bits.values()) for r in results}) > 2  # the uplinks made different maps
    names = quantized_names(model)
    for result in results:
        plan = RoundPlan(
            round=1,
            strategy="ptq",
            epochs=1,
            batch_size=8,
            lr=0.1,
            momentum=0.0,
            bits=8,
            seed=0,
            upload_bits=result.bits,
        )
        assert plan.upload_map(names) == result.bits  # every quantized entry has its width
        upload = quantize_upload(model.state_dict(), names, plan.upload_map(names))
        assert payload_bytes(upload) == result.nbytes


@pytest.mark.parametrize("seed", range(3))
def test_fewer_bits_never_save_fewer_bytes(seed):
    model = SmallCNN(num_classes=3, in_channels=1, image_size=6, width=3, hidden=5)
    sig = measure_significance(model, random_split(seed, 9, (1, 6, 6)), bits=range(2, 9))
    for name, table in sig.tables.items():
        for wider, narrower in zip(range(8, 2, -1), range(7, 1, -1)):
            assert table[narrower].nbytes <= table[wider].nbytes, (name, narrower)
        assert table[2].nbytes < table[8].nbytes  # every tensor here has enough elements to save some


# ---- the greedy on random tables ----


def random_tables(rng: np.random.Generator, layers: int, widths=(8, 6, 4, 3, 2), shape: str = "noisy") -> dict:
    """Bytes from the packed-size rule of a random tensor; damage per shape: 'noisy'
    (falls with bits, plus noise that can make it negative, like measured tables) or
    'any' (arbitrary, non-convex)."""
    tables = {}
    for i in range(layers):
        numel, channels = int(rng.integers(8, 5000)), int(rng.integers(1, 20))
        scale = rng.lognormal(-4, 2)
        table = {}
        for b in widths:
            if shape == "noisy":
                damage = scale * 4.0 ** (8 - b) / 4**6 + rng.normal(0, scale / 50)
            else:
                damage = rng.uniform(-0.2, 1.0) * scale
            table[b] = LayerCost(float(damage), math.ceil(numel * b / 8) + 8 * channels)
        tables[f"layer{i:02d}"] = table
    return tables


def totals(tables, bits, fixed=0):
    nbytes = fixed + sum(tables[n][b].nbytes for n, b in bits.items())
    return nbytes, math.fsum(tables[n][b].damage for n, b in bits.items())


def every_map(tables):
    names = sorted(tables)
    for choice in itertools.product(*(sorted(tables[n]) for n in names)):
        yield dict(zip(names, choice))


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("shape", ["noisy", "any"])
def test_the_budget_holds_whenever_it_can(seed, shape):
    rng = np.random.default_rng(seed)
    tables = random_tables(rng, int(rng.integers(1, 30)), shape=shape)
    fixed = int(rng.integers(0, 1000))
    most = fixed + sum(t[8].nbytes for t in tables.values())
    fewest = fixed + sum(t[2].nbytes for t in tables.values())
    path = LoweringPath(tables, fixed_bytes=fixed)
    previous = None
    for budget in sorted(rng.integers(0, most + 100, 30).tolist() + [fewest, fewest - 1, most], reverse=True):
        result = path.allocate(budget)
        assert (result.nbytes, result.damage) == pytest.approx(totals(tables, result.bits, fixed), abs=1e-12)
        assert all(b in tables[n] for n, b in result.bits.items()) and set(result.bits) == set(tables)
        assert min(result.bits.values()) >= 2
        assert result.met == (budget >= fewest)
        if result.met:
            assert result.nbytes <= budget
        else:
            assert result.nbytes == fewest
        if budget >= most:
            assert result.bits == dict.fromkeys(tables, 8)  # nothing is lowered that need not be
        if previous is not None:  # a smaller budget lowers layers further, never raises one
            assert all(result.bits[n] <= previous.bits[n] for n in tables)
        assert result == allocate_bits(tables, budget, fixed_bytes=fixed)
        previous = result


@pytest.mark.parametrize("seed", range(60))
def test_the_greedy_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    shape = ("noisy", "any")[seed % 2]
    widths = tuple(sorted(rng.choice([8, 7, 6, 5, 4, 3, 2], size=int(rng.integers(2, 6)), replace=False)))
    tables = random_tables(rng, int(rng.integers(1, 5)), widths, shape)
    maps = [(*totals(tables, bits), bits) for bits in every_map(tables)]
    path = LoweringPath(tables)
    checked = 0
    for budget in rng.integers(min(m[0] for m in maps) - 10, max(m[0] for m in maps) + 10, 12).tolist():
        result = path.allocate(max(0, budget))
        feasible = [m for m in maps if m[0] <= budget]
        assert result.met == bool(feasible)
        taken = path.nbytes.index(result.nbytes)
        if taken == 0:
            continue
        before = path.allocate(path.nbytes[taken - 1])  # the greedy's map one step earlier
        last_step = result.damage - before.damage
        if last_step < 0:
            continue  # the greedy stops at the budget: lowering further could predict less damage
        checked += 1
        # no map that uploads as few bytes as the greedy's predicts less damage ...
        assert min(m[1] for m in maps if m[0] <= result.nbytes) >= result.damage - 1e-12
        # ... and the greedy is within its last step of the best map under the budget
        if result.met:
            assert result.damage <= min(m[1] for m in feasible) + last_step + 1e-12
    assert checked > 0 or seed % 2  # on measured-like tables the bounds were always exercised


def test_the_greedy_can_overshoot_a_budget_that_a_fixed_order_meets_exactly():
    # the limitation behind the bound above: one big cheap step beats a small dear one
    tables = {
        "a": {8: LayerCost(0.0, 200), 4: LayerCost(10.0, 100)},  # 0.1 per byte
        "b": {8: LayerCost(0.0, 2), 4: LayerCost(1.0, 1)},  # 1.0 per byte
    }
    greedy = allocate_bits(tables, 201)
    assert greedy.bits == {"a": 4, "b": 8} and greedy.damage == 10.0
    assert totals(tables, {"a": 8, "b": 4}) == (201, 1.0)  # lowering b first would fit at damage 1


def test_ties_go_by_name_and_non_hull_widths_are_skipped():
    same = {8: LayerCost(0.0, 100), 6: LayerCost(1.0, 80), 4: LayerCost(3.0, 60)}
    path = LoweringPath({"b": same, "a": same, "c": same})
    assert path.steps == [("a", 6), ("b", 6), ("c", 6), ("a", 4), ("b", 4), ("c", 4)]
    collinear = {8: LayerCost(0.0, 100), 6: LayerCost(1.0, 80), 4: LayerCost(2.0, 60)}  # a tie within a layer too
    assert LoweringPath({"b": collinear, "a": collinear}).steps == [("a", 6), ("a", 4), ("b", 6), ("b", 4)]
    # 6 bits would cost 0.9 per byte, 4 bits 0.5 per byte on the way down: 6 is above the hull
    above = {8: LayerCost(0.0, 100), 6: LayerCost(9.0, 90), 4: LayerCost(10.0, 80), 2: LayerCost(30.0, 70)}
    assert LoweringPath({"x": above}).steps == [("x", 4), ("x", 2)]
    # equal bytes at fewer bits are never a step (they save nothing)
    flat = {8: LayerCost(0.0, 9), 6: LayerCost(-1.0, 9), 4: LayerCost(0.5, 8)}
    assert LoweringPath({"x": flat}).steps == [("x", 4)]


# ---- budgets from uplinks ----


@pytest.mark.parametrize("seed", range(20))
def test_the_budget_is_the_most_the_uplink_sends_in_time(seed):
    rng = np.random.default_rng(seed)
    for _ in range(200):
        seconds, mbps = float(rng.lognormal(0, 2)), float(rng.lognormal(2, 2))
        budget = upload_budget(seconds, mbps)
        assert upload_seconds(budget, mbps) <= seconds < upload_seconds(budget + 1, mbps)
    assert upload_budget(0.0, 5.0) == 0
    assert upload_budget(2.0, 8.0) == 2_000_000
    assert upload_budget(1e6, 1e6) == 125 * 10**15  # beyond 2^53, where a float step is many bytes


def test_each_client_gets_the_greedy_map_for_its_uplink():
    rng = np.random.default_rng(7)
    tables = random_tables(rng, 12)
    sig = Significance(tables, kept={}, fixed_bytes=300, base_loss=0.5)
    uplinks = [0.01, 0.5, 1.0, 2.0, 5.0, 20.0, 1000.0]
    maps = client_bit_maps(sig, uplinks, upload_s=0.05)
    fewest = 300 + sum(t[2].nbytes for t in tables.values())
    for mbps, result in zip(uplinks, maps):
        budget = upload_budget(0.05, mbps)
        assert result == allocate_bits(tables, budget, fixed_bytes=300)
        assert result.met == (budget >= fewest)
        if result.met:
            assert upload_seconds(result.nbytes, mbps) <= 0.05
    assert not maps[0].met and maps[-1].bits == dict.fromkeys(tables, 8)
    for slower, faster in zip(maps, maps[1:]):
        assert all(slower.bits[n] <= faster.bits[n] for n in tables)


# ---- the first-order assumption, on a trained small model ----


def test_summed_layer_damages_rank_the_joint_damage():
    from scipy.stats import spearmanr

    from fedhq.data.registry import load_dataset
    from fedhq.quant.deploy import score

    torch.manual_seed(0)
    data = load_dataset("digits")
    train, validation = data.train.subset(range(0, 1000)), data.train.subset(range(1000, len(data.train)))
    model = SmallCNN(num_classes=10, in_channels=1, image_size=8, width=8, hidden=32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):
        for idx in torch.randperm(len(train)).split(32):
            optimizer.zero_grad()
            F.cross_entropy(model(train.x[idx]), train.y[idx]).backward()
            optimizer.step()
    sig = measure_significance(model, validation)
    rng = np.random.default_rng(0)
    predicted, joint = [], []
    for _ in range(24):
        bits = {n: int(rng.choice(CANDIDATE_BITS)) for n in sig.tables}
        copy = SmallCNN(num_classes=10, in_channels=1, image_size=8, width=8, hidden=32)
        copy.load_state_dict(model.state_dict())
        with torch.no_grad():
            for name, weight in copy.named_parameters():
                weight.copy_(quantize_layer(name, weight.detach().clone(), bits[name]).dequantize())
        predicted.append(totals(sig.tables, bits)[1])
        joint.append(score(copy, validation)[1] - sig.base_loss)
    assert spearmanr(predicted, joint).statistic > 0.8


# ---- bad input ----


GOOD = {"w": {8: LayerCost(0.0, 10), 4: LayerCost(1.0, 6)}}


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: allocate_bits(GOOD, -1), "budget must be a whole number of bytes >= 0, got -1"),
        (lambda: allocate_bits(GOOD, 1.5), "budget must be a whole number"),
        (lambda: allocate_bits({}, 10), "tables is empty"),
        (lambda: allocate_bits({"w": {}}, 10), "layer 'w' has no bit widths"),
        (lambda: allocate_bits({"w": {9: LayerCost(0.0, 1)}}, 10), "layer 'w' has bit width 9"),
        (lambda: allocate_bits({"w": {8: LayerCost(math.nan, 1)}}, 10), "layer 'w' at 8 bits needs a LayerCost"),
        (lambda: allocate_bits({"w": {8: (0.0, 1)}}, 10), "layer 'w' at 8 bits needs a LayerCost"),
        (lambda: allocate_bits({"w": {8: LayerCost(0.0, -1)}}, 10), "nbytes -1"),
        (
            lambda: allocate_bits({"w": {8: LayerCost(0.0, 5), 4: LayerCost(0.0, 6)}}, 10),
            r"layer 'w' takes more bytes at 4 bits \(6\) than at 8 \(5\)",
        ),
        (lambda: allocate_bits(GOOD, 10, fixed_bytes=-3), "fixed_bytes must be"),
        (lambda: measure_significance(odd_model(), random_split(0), layers=["nope"]), "unknown layer.*'nope'"),
        (lambda: measure_significance(odd_model(), random_split(0), layers=[]), "layers is empty"),
        (lambda: measure_significance(odd_model(), random_split(0, n=0)), "validation split is empty"),
        (lambda: measure_significance(odd_model(), random_split(0), bits=()), "bits is empty"),
        (lambda: measure_significance(odd_model(), random_split(0), bits=(8, 1)), r"int in \[2, 8\], got 1"),
        (lambda: measure_significance(odd_model(), random_split(0), bits=(4, 4)), "distinct"),
        (lambda: upload_budget(-1.0, 5.0), "upload_s must be"),
        (lambda: upload_budget(1.0, 0.0), "uplink_mbps must be a finite number > 0, got 0.0"),
        (lambda: client_bit_maps(Significance(GOOD, {}, 0, 0.0), [math.inf], 1.0), "uplink_mbps must be"),
    ],
)
def test_bad_input_is_one_line_naming_it(call, message):
    with pytest.raises(ValueError, match=message) as error:
        call()
    assert "\n" not in str(error.value)
