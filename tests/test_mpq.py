"""FedMPQ and AQFL (fedhq.mpq): bit-plane layers against plain torch, the group Lasso,
top-bit pruning, the server's weights, bit-map averaging and pruning-growing (property
tests over seeded random systems), device budgets and a client's local training."""

import copy
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fedhq_kernels as fk
from fedhq.models import ResNet18, build_model
from fedhq.mpq import (
    BUDGET_TIERS,
    BitPlaneConv2d,
    BitPlaneLinear,
    aggregation_weights,
    aqfl_bit_map,
    average_bit_maps,
    average_bits,
    bit_layers,
    bit_map,
    device_budget,
    fit_budget,
    float_state_dict,
    group_lasso,
    prune_top_bits,
    quantizable_layers,
    server_step,
    to_bitplane,
    train_fedmpq,
    upload_state,
)
from fedhq_kernels.checks import MAX_BITS


def reference_code(w, bits):
    """Symmetric per-layer integers, the scale from the largest magnitude (plain torch)."""
    qmax = 2 ** (bits - 1) - 1
    scale = max(float(w.abs().max()) / qmax, torch.finfo(torch.float32).eps)
    scale = torch.tensor(scale, dtype=torch.float32)
    return torch.clamp(torch.round(w / scale), -qmax, qmax), scale


def random_conv(gen, bias):
    groups = int(torch.randint(1, 3, (), generator=gen))
    c_in = groups * int(torch.randint(1, 4, (), generator=gen))
    c_out = groups * int(torch.randint(1, 5, (), generator=gen))
    k = (int(torch.randint(1, 4, (), generator=gen)), int(torch.randint(1, 4, (), generator=gen)))
    stride, padding, dilation = (int(torch.randint(1, 3, (), generator=gen)) for _ in range(3))
    return nn.Conv2d(c_in, c_out, k, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias)


@pytest.mark.parametrize("seed", range(12))
def test_conv_forward_and_gradient_equal_plain_torch(seed):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    conv, bits = random_conv(gen, bias=seed % 2 == 0), 2 + seed % 7
    layer = BitPlaneConv2d(conv, bits, "conv.weight")
    code, scale = reference_code(conv.weight.detach(), bits)
    assert torch.equal(layer.code().float(), code) and torch.equal(layer.scale, scale)
    # the planes: ternary, a weight's planes share its sign, and they add up to its integer
    planes = layer.planes.detach()
    assert planes.shape[0] == bits - 1 and set(planes.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert ((planes == 0) | (planes == code.sign().unsqueeze(0))).all()
    x = torch.randn(3, 7, conv.in_channels, 11, 9).transpose(0, 1)[1]  # non-contiguous, odd sizes
    weight = (scale * code).requires_grad_()
    bias = None if conv.bias is None else conv.bias.detach().clone().requires_grad_()
    expected = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    out = layer(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # STE: plane b's gradient is 2^b x scale x the dequantized weight's gradient
    g = torch.randn_like(out)
    out.backward(g)
    expected.backward(g)
    powers = 2.0 ** torch.arange(bits - 1).view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(layer.planes.grad, powers * scale * weight.grad)
    torch.testing.assert_close(layer.weight_grad(), weight.grad)
    if bias is not None:
        torch.testing.assert_close(layer.bias.grad, bias.grad)


@pytest.mark.parametrize("seed", range(8))
def test_linear_forward_equals_plain_torch(seed):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n_in, n_out = (int(torch.randint(1, 40, (), generator=gen)) for _ in range(2))
    linear, bits = nn.Linear(n_in, n_out, bias=seed % 2 == 1), 2 + seed % 7
    layer = BitPlaneLinear(linear, bits, "fc.weight")
    code, scale = reference_code(linear.weight.detach(), bits)
    x = torch.randn(n_in, 5).t()  # non-contiguous
    torch.testing.assert_close(layer(x), F.linear(x, scale * code, linear.bias), rtol=0, atol=0)
    layer(x).sum().backward()
    assert layer.planes.grad is not None and layer.planes.grad.abs().sum() > 0


def test_round_trip_to_float_state_dict_and_resnet():
    torch.manual_seed(0)
    model = ResNet18(num_classes=10, in_channels=3, width=4)
    counts = quantizable_layers(model)
    assert len(counts) == 21 and counts["fc.weight"] == 10 * 32
    bits = {k: 2 + i % 7 for i, k in enumerate(counts)}
    bp = to_bitplane(model, bits)
    assert bit_map(bp) == bits
    state = float_state_dict(bp)
    reference = model.state_dict()
    assert list(state) == list(reference)
    for name, value in reference.items():
        if name in counts:
            code, scale = reference_code(value, bits[name])
            torch.testing.assert_close(state[name], scale * code, rtol=0, atol=0)
        else:
            assert torch.equal(state[name], value)  # biases, BatchNorm weights and running statistics
    plain = ResNet18(num_classes=10, in_channels=3, width=4)
    plain.load_state_dict(state)
    x = torch.randn(2, 3, 9, 9)
    bp.eval(), plain.eval()
    torch.testing.assert_close(bp(x), plain(x))
    # the lossless upload: the layers' integers at their bits, dequantizing to the float state bit for bit
    upload = upload_state(bp)
    assert list(upload) == list(state)
    for name in counts:
        q = upload[name]
        q.validate()
        assert q.bits == bits[name] and q.axis is None and q.data.abs().max() <= 2 ** (bits[name] - 1) - 1
        assert torch.equal(fk.dequantize(q), state[name])
    assert all(torch.equal(upload[k], state[k]) for k in state if k not in counts)
    # 8 bits keeps every weight within half a step of the float one
    state8 = float_state_dict(to_bitplane(model, dict.fromkeys(counts, 8)))
    for name in counts:
        step = reference[name].abs().max() / 127
        assert (state8[name] - reference[name]).abs().max() <= step / 2 * (1 + 1e-6)
    assert torch.equal(model.state_dict()["conv1.weight"], reference["conv1.weight"])  # the input is not modified


def plane_norms(code, bits):
    """Plain torch: the L2 norm of each magnitude plane of integer codes = sqrt(ones)."""
    magnitude = code.abs().to(torch.int64)
    return [math.sqrt(int(((magnitude >> b) & 1).sum())) for b in range(bits - 1)]


@pytest.mark.parametrize("seed", range(6))
def test_group_lasso_equals_plain_torch(seed):
    torch.manual_seed(seed)
    model = build_model("small_cnn", num_classes=7, in_channels=2, image_size=9)
    counts = quantizable_layers(model)
    bits = {k: int(b) for k, b in zip(counts, torch.randint(2, 9, (len(counts),)))}
    bp = to_bitplane(model, bits)
    memory = sum(counts[k] * bits[k] for k in counts)
    expected = 0.0
    for k, w in model.state_dict().items():
        if k in counts:
            expected += counts[k] * bits[k] / memory * sum(plane_norms(reference_code(w, bits[k])[0], bits[k]))
    value = group_lasso(bp)
    assert value.item() == pytest.approx(expected, rel=1e-5)
    value.backward()
    for k, layer in bit_layers(bp).items():
        # d||p||/dp = p / ||p||, weighted by the layer's memory share; 0 on all-zero planes
        norms = torch.linalg.vector_norm(layer.planes.detach().flatten(1), dim=1).clamp(min=1e-30)
        share = counts[k] * bits[k] / memory
        expected_grad = share * layer.planes.detach() / norms.view(-1, *[1] * (layer.planes.dim() - 1))
        torch.testing.assert_close(layer.planes.grad, expected_grad)


def layer_with_codes(code, bits):
    """A BitPlaneLinear holding exactly ``code`` (scale 1: the largest magnitude is qmax)."""
    linear = nn.Linear(code.shape[1], code.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(code.float())
        linear.weight[0, 0] = 2 ** (bits - 1) - 1  # pin the scale at 1
    layer = BitPlaneLinear(linear, bits, "fc.weight")
    assert float(layer.scale) == 1.0
    return layer, layer.code()


@pytest.mark.parametrize("seed", range(20))
def test_pruning_drops_exactly_the_sparse_top_planes(seed):
    gen = torch.Generator().manual_seed(seed)
    bits = int(torch.randint(3, 9, (), generator=gen))
    rows, cols = int(torch.randint(3, 30, (), generator=gen)), int(torch.randint(3, 30, (), generator=gen))
    # magnitudes spread over a few planes, with a handful of large outliers
    width = int(torch.randint(1, bits, (), generator=gen))
    code = torch.randint(-(2 ** (width - 1)) + 1, 2 ** (width - 1), (rows, cols), generator=gen)
    outliers = int(torch.randint(0, 4, (), generator=gen))
    code.view(-1)[torch.randperm(code.numel(), generator=gen)[:outliers]] = 2 ** (bits - 1) - 1
    layer, code = layer_with_codes(code, bits)
    epsilon = float(torch.rand((), generator=gen)) * 0.2
    min_bits = int(torch.randint(2, bits + 1, (), generator=gen))
    model = nn.Sequential()
    model.add_module("fc", layer)
    # the reference: while the top magnitude bit's density < epsilon, saturate one bit narrower
    expected_bits, expected = bits, code.clone()
    while expected_bits > min_bits and float(((expected.abs() >> (expected_bits - 2)) & 1).float().mean()) < epsilon:
        expected_bits -= 1
        expected = expected.clamp(-(2 ** (expected_bits - 1) - 1), 2 ** (expected_bits - 1) - 1)
    dropped = prune_top_bits(model, epsilon, min_bits)
    assert dropped == {"fc.weight": bits - expected_bits}
    assert layer.bits == expected_bits >= min_bits
    assert torch.equal(layer.code(), expected)
    assert layer.planes.shape == (expected_bits - 1, rows, cols)


def test_pruning_edges():
    code = torch.zeros(4, 5, dtype=torch.int64)
    code[1, 1] = 3
    layer, _ = layer_with_codes(code, 6)
    model = nn.Sequential()
    model.add_module("fc", layer)
    assert prune_top_bits(model, 0.0, 2) == {"fc.weight": 0}  # epsilon 0 prunes nothing
    assert prune_top_bits(model, 0.02, 5) == {"fc.weight": 0}  # 2/20 of the top bits set: dense enough
    assert prune_top_bits(model, 0.5, 4) == {"fc.weight": 2}  # stops at min_bits
    assert layer.bits == 4 and layer.code().abs().max() == 7  # the outlier 31 saturated to 7
    assert prune_top_bits(model, 1.0, 2) == {"fc.weight": 2} and layer.bits == 2
    for bad, match in (((-0.1, 2), "epsilon"), ((0.1, 1), "min_bits"), ((float("nan"), 2), "epsilon")):
        with pytest.raises(ValueError, match=match):
            prune_top_bits(model, *bad)


def test_integer_step():
    layer, code = layer_with_codes(torch.tensor([[0, 5, -5, 6, -7, 2]]), 4)  # entry 0 pinned at 7
    gen = torch.Generator().manual_seed(0)
    # powers of two of the scale move by exactly that many units; the range clamps
    layer.integer_step(torch.tensor([[1.0, -2.0, 4.0, -4.0, 1.0, 0.0]]), gen)
    assert layer.code().tolist() == [[6, 7, -7, 7, -7, 2]]
    # 3 rounds to 4 (nearest power of two), 0.4 to 0.5 of a unit: a unit with probability 0.5
    layer, _ = layer_with_codes(torch.zeros(50, 40, dtype=torch.int64), 8)
    step = torch.full((50, 40), 0.4)
    step[0, 0] = 0.0
    step[0, 1] = 3.0
    layer.integer_step(step, gen)
    moved = layer.code()
    assert moved[0, 1] == -4 and moved[0, 0] == 127  # the pinned entry has step 0
    fraction = float((moved == -1).float().mean())
    assert 0.45 < fraction < 0.55  # 2000 draws: 0.5 +- 5 standard deviations
    with pytest.raises(ValueError, match="fc.weight: its update contains NaN"):
        layer.integer_step(torch.full((50, 40), float("nan")), gen)


def random_system(rng, layers=None):
    n = int(rng.integers(1, 25)) if layers is None else layers
    names = [f"layer{i}.weight" for i in range(n)]
    counts = {k: int(c) for k, c in zip(names, rng.integers(0, 10**6, n) // rng.choice([1, 10, 1000], n))}
    if sum(counts.values()) == 0:
        counts[names[0]] = 1
    return counts


def used(counts, bits):
    return sum(counts[k] * bits[k] for k in counts)


@pytest.mark.parametrize("seed", range(40))
def test_fit_budget_meets_every_budget_as_tightly_as_one_bit_allows(seed):
    rng = np.random.default_rng(seed)
    for _ in range(25):
        counts = random_system(rng)
        average = {k: float(rng.uniform(1.5, 8.5)) for k in counts}
        min_bits = int(rng.integers(2, 5))
        budget = float(rng.uniform(min_bits, 9.0)) if rng.random() < 0.8 else int(rng.integers(min_bits, 9))
        pruned = {k: int(rng.integers(0, 3)) for k in counts} if rng.random() < 0.5 else None
        bits = fit_budget(counts, average, budget, min_bits=min_bits, pruned=pruned)
        assert set(bits) == set(counts) and all(min_bits <= b <= MAX_BITS for b in bits.values())
        cap = Fraction(budget) * sum(counts.values())
        assert used(counts, bits) <= cap  # never exceeds the budget
        # tight: no layer can gain a bit without exceeding it
        assert all(bits[k] == MAX_BITS or used(counts, bits) + counts[k] > cap for k in counts)
        assert average_bits(counts, bits) <= budget * (1 + 1e-12)
        if budget >= MAX_BITS:
            assert set(bits.values()) == {MAX_BITS}


@pytest.mark.parametrize("seed", range(20))
def test_fit_budget_keeps_a_map_that_already_fits_exactly(seed):
    rng = np.random.default_rng(seed)
    counts = {k: c + 1 for k, c in random_system(rng).items()}
    bits = {k: int(rng.integers(2, 9)) for k in counts}
    budget = Fraction(used(counts, bits), sum(counts.values()))
    assert fit_budget(counts, bits, budget) == bits
    assert fit_budget(counts, {k: b + 0.3 for k, b in bits.items()}, budget) == bits
    # a budget from the map's own average, rounded up to a float, changes nothing either
    assert fit_budget(counts, bits, math.nextafter(float(budget), math.inf)) == bits


def test_fit_budget_prunes_the_largest_layers_first_and_grows_the_smallest():
    counts = {"big": 100, "mid": 10, "small": 1}
    assert fit_budget(counts, dict.fromkeys(counts, 8), 6) == {"big": 5, "mid": 8, "small": 8}
    # 2.2 x 111 = 244.2 bits: small grows to 8 (228), mid to 3 (238); one more bit of mid would make 248
    assert fit_budget(counts, dict.fromkeys(counts, 2), 2.2) == {"big": 2, "mid": 3, "small": 8}
    # equal counts: the layer pruned more in local training loses the bit
    counts = {"a": 10, "b": 10}
    assert fit_budget(counts, {"a": 6, "b": 6}, 5.5, pruned={"a": 0, "b": 2}) == {"a": 6, "b": 5}
    assert fit_budget(counts, {"a": 6, "b": 6}, 5.5, pruned={"a": 2, "b": 0}) == {"a": 5, "b": 6}
    assert fit_budget(counts, {"a": 4, "b": 4}, 4.5, pruned={"a": 1, "b": 0}) == {"a": 4, "b": 5}


@pytest.mark.parametrize("seed", range(20))
def test_aggregation_weights_and_bit_map_average(seed):
    rng = np.random.default_rng(seed)
    clients = int(rng.integers(1, 30))
    samples = [int(s) for s in rng.integers(0, 500, clients)]
    samples[0] += 1
    budgets = [float(b) for b in rng.choice([4, 6, 8, 3.5], clients)]
    weights = aggregation_weights(samples, budgets)
    assert sum(weights) == pytest.approx(1.0, abs=1e-12) and all(w >= 0 for w in weights)
    raw = np.array(samples) * np.array(budgets)
    np.testing.assert_allclose(weights, raw / raw.sum(), rtol=1e-12)
    counts = random_system(rng)
    maps = [{k: int(rng.integers(2, 9)) for k in counts} for _ in range(clients)]
    average = average_bit_maps(maps, weights)
    for k in counts:
        assert average[k] == pytest.approx(sum(w * m[k] for w, m in zip(weights, maps)))
        assert min(m[k] for m in maps) - 1e-9 <= average[k] <= max(m[k] for m in maps) + 1e-9
    step = server_step(counts, maps, samples, budgets)
    assert step.weights == weights and step.bits == average and set(step.pruned.values()) == {0}
    for b in budgets:
        bits = step.client_map(counts, b)
        assert used(counts, bits) <= Fraction(b) * sum(counts.values())


def test_server_step_sums_the_pruned_planes():
    counts = {"a": 10, "b": 10}
    maps = [{"a": 6, "b": 6}, {"a": 5, "b": 6}]
    step = server_step(counts, maps, [10, 30], [6, 6], pruned=[{"a": 1, "b": 0}, {"a": 1, "b": 1}])
    assert step.pruned == {"a": 2, "b": 1} and step.weights == [0.25, 0.75]
    assert step.bits == {"a": 5.25, "b": 6.0}
    assert step.client_map(counts, 5.5) == {"a": 5, "b": 6}


def test_aqfl_bit_map():
    counts = {"a": 3, "b": 5}
    assert aqfl_bit_map(counts, 4) == {"a": 4, "b": 4}
    assert aqfl_bit_map(counts, 6.9) == {"a": 6, "b": 6}
    assert aqfl_bit_map(counts, 32) == {"a": MAX_BITS, "b": MAX_BITS}
    with pytest.raises(ValueError, match="budget 1.5 is below the minimum width of 2 bits"):
        aqfl_bit_map(counts, 1.5)


def test_device_budgets():
    assert [device_budget(p) for p in ("rtx-a6000", "jetson-orin-nano-8gb", "phone-snapdragon-8-gen-2")] == [8, 6, 4]
    from fedhq.devices import load_preset

    doc = copy.deepcopy(load_preset("phone-snapdragon-8-gen-2"))
    for floor, bits in BUDGET_TIERS:
        doc["figures"]["matmul_tflops"]["float32"]["median"] = floor + 1e-3
        assert device_budget(doc) == bits
    with pytest.raises(ValueError, match="unknown device preset 'toaster'"):
        device_budget("toaster")


BAD_INPUT = [
    (lambda: fit_budget({"a": 3}, {"a": 4}, 1.9), "fit_budget: budget 1.9 is below the minimum width of 2 bits"),
    (lambda: fit_budget({"a": 3}, {"a": 4}, 3, min_bits=4), "budget 3 is below the minimum width of 4 bits"),
    (lambda: fit_budget({"a": 3}, {"a": 4}, float("inf")), "budget must be a finite number"),
    (lambda: fit_budget({"a": 3}, {"a": 4, "z": 4}, 4), r"unknown layers \['z'\] and misses layers \[\]"),
    (lambda: fit_budget({"a": 3, "b": 1}, {"a": 4}, 4), r"unknown layers \[\] and misses layers \['b'\]"),
    (lambda: fit_budget({"a": -3}, {"a": 4}, 4), r"parameter counts must be ints >= 0, got \{'a': -3\}"),
    (lambda: fit_budget({"a": 0}, {"a": 4}, 4), "the layers hold no parameters"),
    (lambda: fit_budget({"a": 3}, {"a": float("nan")}, 4), "bit widths must be finite numbers"),
    (lambda: fit_budget({"a": 3}, {"a": 4}, 4, pruned={"b": 1}), r"\(pruned\): bit map names unknown layers"),
    (lambda: fit_budget({"a": 3}, {"a": 4}, 4, pruned={"a": -1}), r"pruned counts must be ints >= 0"),
    (lambda: average_bits({"a": 3}, {"a": 9}), r"bits of layer a must be an int in \[2, 8\], got 9"),
    (lambda: aggregation_weights([1, 2], [4]), "need one budget per client, got 2 sample counts and 1 budgets"),
    (lambda: aggregation_weights([1, -2], [4, 4]), "client 1's sample count must be an int >= 0, got -2"),
    (lambda: aggregation_weights([1, 2], [4, 0]), "client 1's budget must be a number > 0, got 0"),
    (lambda: aggregation_weights([0, 0], [4, 4]), "every client has 0 samples"),
    (lambda: average_bit_maps([{"a": 4}, {"b": 4}], [1, 1]), r"\(client 1\): bit map names unknown layers \['b'\]"),
    (lambda: average_bit_maps([{"a": 4}], [-1]), "weights must be finite, >= 0 and not all 0"),
    (lambda: server_step({"a": 3}, [{"b": 4}], [1], [4]), r"server_step: bit map names unknown layers \['b'\]"),
    (lambda: server_step({"a": 3}, [{"a": 4}], [1], [4], pruned=[]), "need one pruned map per client"),
]


@pytest.mark.parametrize("call, match", BAD_INPUT)
def test_bad_input_is_one_line_value_error(call, match):
    with pytest.raises(ValueError, match=match) as error:
        call()
    assert "\n" not in str(error.value)


def test_to_bitplane_bad_input():
    model = build_model("small_cnn", num_classes=3, in_channels=1, image_size=8)
    counts = quantizable_layers(model)
    with pytest.raises(ValueError, match=r"unknown layers \['nope.weight'\] and misses layers \['fc2.weight'\]"):
        to_bitplane(model, {**{k: 4 for k in counts if k != "fc2.weight"}, "nope.weight": 4})
    with pytest.raises(ValueError, match=r"bit-plane layer conv1.weight: bits must be an int in \[2, 8\], got 1"):
        to_bitplane(model, {**dict.fromkeys(counts, 4), "conv1.weight": 1})
    with pytest.raises(TypeError, match="layer conv1 holds torch.float64 weights"):
        to_bitplane(copy.deepcopy(model).double(), dict.fromkeys(counts, 4))
    with pytest.raises(ValueError, match="no bit-plane layers"):
        group_lasso(model)
    with torch.no_grad():
        model.fc1.weight[3, 2] = float("nan")
    with pytest.raises(ValueError, match="bit-plane layer fc1.weight: the weight contains NaN or Inf"):
        to_bitplane(model, dict.fromkeys(counts, 4))
    reflect = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="bit-plane layer 0.weight: padding_mode 'reflect' is not supported"):
        to_bitplane(reflect, {"0.weight": 4})


def blobs(seed, n=192, classes=3, dim=12):
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=gen) * 2
    y = torch.randint(0, classes, (n,), generator=gen)
    return centers[y] + torch.randn(n, dim, generator=gen), y


def mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))


def cross_entropy(state, x, y):
    model = mlp(0)
    model.load_state_dict(state)
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


@pytest.mark.parametrize("seed", range(4))
def test_local_training_reduces_the_loss_and_is_a_pure_function(seed):
    x, y = blobs(seed)
    model = mlp(seed)
    bits = {"0.weight": 4 + seed % 3, "2.weight": 3}
    bp = to_bitplane(model, bits)
    before = {k: v.clone() for k, v in bp.state_dict().items()}
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, len(y), 16)] * 4
    result = train_fedmpq(bp, batches, lr=0.05, momentum=0.9, seed=seed)
    start = cross_entropy(float_state_dict(bp), x, y)
    assert cross_entropy(result.state, x, y) < 0.5 * start
    assert result.steps == len(batches) and math.isfinite(result.train_loss)
    assert all(2 <= b <= bits[k] for k, b in result.bits.items())
    assert result.pruned == {k: bits[k] - result.bits[k] for k in bits}
    assert list(result.state) == list(model.state_dict())
    assert all(torch.equal(v, bp.state_dict()[k]) for k, v in before.items())  # the input model is not modified
    again = train_fedmpq(bp, batches, lr=0.05, momentum=0.9, seed=seed)
    assert all(torch.equal(v, again.state[k]) for k, v in result.state.items())  # seeded
    assert again.bits == result.bits and again.train_loss == result.train_loss


@pytest.mark.parametrize("min_bits", [2, 3, 5])
def test_local_training_prunes_but_respects_the_minimum_width(min_bits):
    x, y = blobs(7)
    bp = to_bitplane(mlp(7), {"0.weight": 8, "2.weight": 6})
    batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, len(y), 32)]
    # a strong Lasso and a threshold every plane is below: every layer ends at min_bits
    result = train_fedmpq(bp, batches, lr=0.05, lam=10.0, epsilon=1.0, min_bits=min_bits, seed=1)
    assert result.bits == {"0.weight": min_bits, "2.weight": min_bits}
    assert result.pruned == {"0.weight": 8 - min_bits, "2.weight": 6 - min_bits}
    qmax = 2 ** (min_bits - 1) - 1
    for k in result.bits:
        scale = bit_layers(bp)[k].scale  # pruning keeps the scale: the upload holds qmax steps of it at most
        assert (result.state[k].abs() <= qmax * scale * (1 + 1e-6)).all()


def test_a_strong_group_lasso_empties_the_top_planes():
    x, y = blobs(3)
    bp = to_bitplane(mlp(3), {"0.weight": 8, "2.weight": 8})
    batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, len(y), 32)] * 3
    assert all(m.top_density() > 0.4 for m in bit_layers(bp).values())  # uniform init: half the weights
    plain = train_fedmpq(bp, batches, lr=0.05, lam=0.0, epsilon=0.0, seed=0)
    sparse = train_fedmpq(bp, batches, lr=0.05, lam=1.0, epsilon=0.0, seed=0)
    default = train_fedmpq(bp, batches, lr=0.05, epsilon=0.0, seed=0)  # lambda 0.001: too weak to show here

    def top(state, k):
        code = torch.round(state[k] / bit_layers(bp)[k].scale).abs()
        return float((code >= 64).float().mean())

    assert set(plain.bits) == {"0.weight", "2.weight"}
    for k in plain.bits:
        assert top(sparse.state, k) < 0.5 * top(plain.state, k)
        assert abs(top(default.state, k) - top(plain.state, k)) < 0.1


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"lr": -1.0}, "lr must be a finite number >= 0, got -1.0"),
        ({"lr": float("nan")}, "lr must be a finite number >= 0"),
        ({"lam": -0.1}, "lam must be a finite number >= 0"),
        ({"momentum": 1.0}, r"momentum must be in \[0, 1\), got 1.0"),
        ({"epsilon": 2.0}, r"epsilon must be a number in \[0, 1\], got 2.0"),
        ({"min_bits": 9}, r"min_bits must be an int in \[2, 8\], got 9"),
    ],
)
def test_local_training_bad_input(bad, match):
    bp = to_bitplane(mlp(0), {"0.weight": 4, "2.weight": 4})
    x, y = blobs(0)

    def batches():  # fails the test if training starts before the arguments are checked
        raise AssertionError("trained before checking its arguments")
        yield x, y

    with pytest.raises(ValueError, match=f"train_fedmpq: {match}"):
        train_fedmpq(bp, batches(), **{"lr": 0.05, **bad})


def test_local_training_needs_a_bit_plane_model():
    with pytest.raises(ValueError, match="train_fedmpq: the model has no bit-plane layers"):
        train_fedmpq(mlp(0), [], lr=0.05)


def test_local_training_of_resnet18_trains_batchnorm_as_float():
    torch.manual_seed(0)
    model = ResNet18(num_classes=4, in_channels=3, width=4)
    counts = quantizable_layers(model)
    bp = to_bitplane(model, {k: 4 + len(k) % 4 for k in counts})
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
    result = train_fedmpq(bp, [(x[:4], y[:4]), (x[4:], y[4:])], lr=0.05, momentum=0.9, seed=0)
    reference = model.state_dict()
    assert list(result.state) == list(reference) and result.steps == 2
    assert not torch.equal(result.state["bn1.running_mean"], reference["bn1.running_mean"])
    assert not torch.equal(result.state["bn1.weight"], reference["bn1.weight"])
    assert any(not torch.equal(result.state[k], float_state_dict(bp)[k]) for k in counts)
