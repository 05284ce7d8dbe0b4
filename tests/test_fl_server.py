"""Server validation and aggregation on a model with BatchNorm: parameters travel
quantized, buffers float; every kind of bad update is rejected with its reason and
never reaches the global model."""

import dataclasses

import pytest
import torch
from torch import nn

import fedhq_kernels as fk
from fedhq.fl.client import Update, quantize_upload, quantized_names
from fedhq.fl.config import ConfigError, RunConfig
from fedhq.fl.rounds import InClientOrder
from fedhq.fl.server import RunningStats, Server, growth_limits, magnitude, running_stats, validate_update
from fedhq.models import ResNet18


def model():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


@pytest.fixture
def setup(gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    net = model()
    names = quantized_names(net)
    updates = []
    for client in range(3):
        weights = {
            k: v + 0.1 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v + client
            for k, v in net.state_dict().items()
        }
        weights["1.running_var"] = weights["1.running_var"].abs() + 1e-3
        updates.append(Update(client, quantize_upload(weights, names, 8), 10 * (client + 1), 0.0, 1, 0.0))
    return net, names, updates


def test_parameters_are_quantized_and_buffers_float(setup):
    net, names, updates = setup
    assert names == {n for n, _ in net.named_parameters()} and "1.running_mean" not in names
    state = updates[0].state
    assert isinstance(state["0.weight"], fk.QuantizedTensor) and state["0.weight"].axis == 0
    assert isinstance(state["1.weight"], fk.QuantizedTensor)  # BatchNorm's affine scale is a parameter
    assert state["1.running_var"].dtype == torch.float32 and state["1.num_batches_tracked"].dtype == torch.int64


def test_good_updates_aggregate_exactly_as_fedhq_kernels(setup):
    net, names, updates = setup
    server = Server(net.state_dict(), bits=8, quantized=names)
    accepted, rejected = server.aggregate(updates)
    assert accepted == [0, 1, 2] and rejected == []
    assert_state_is(server, fk.aggregate_state_dicts([u.state for u in updates], [10, 20, 30]))


def assert_state_is(server: Server, expected: dict) -> None:
    for name, value in expected.items():
        got = server.state[name]
        if isinstance(value, fk.QuantizedTensor):
            assert torch.equal(got.data, value.data) and torch.equal(got.scale, value.scale), name
        else:
            assert torch.equal(got, value), name


def _breakages(update):
    """(what is wrong, the broken update, words the reason must contain)."""
    s = dict(update.state)
    q = s["3.weight"]
    yield "nan scale", {**s, "3.weight": dataclasses.replace(q, scale=torch.full_like(q.scale, float("nan")))}, "finite"
    yield "zero scale", {**s, "3.weight": dataclasses.replace(q, scale=torch.zeros_like(q.scale))}, "finite and > 0"
    yield "codes out of range", {**s, "3.weight": dataclasses.replace(q, bits=4)}, "4-bit"
    yield "buffer quantized", {**s, "1.running_var": fk.quantize(s["1.running_var"])}, "expected a torch.float32 tensor"
    yield "nan buffer", {**s, "1.running_mean": torch.full_like(s["1.running_mean"], float("nan"))}, "NaN"
    yield "float parameter", {**s, "0.bias": fk.dequantize(s["0.bias"])}, "expected a QuantizedTensor"
    yield "wrong shape", {**s, "0.weight": fk.quantize(torch.randn(4, 1, 2, 2), axis=0)}, "expected shape"
    yield "missing name", {k: v for k, v in s.items() if k != "0.bias"}, "missing ['0.bias']"
    yield "extra name", {**s, "x": torch.zeros(1)}, "unexpected ['x']"
    yield "int buffer dtype", {**s, "1.num_batches_tracked": torch.tensor(1.0)}, "torch.int64"
    yield "not a mapping", [1, 2], "mapping"
    diverged = fk.quantize(fk.dequantize(q) * 1e6, axis=0)  # finite, but training blew up
    yield "diverged weights", {**s, "3.weight": diverged}, "growth limit"
    yield "diverged buffer", {**s, "1.running_var": s["1.running_var"] * 1e6}, "growth limit"
    for field, value, words in (("symmetric", "yes", "symmetric must be a bool"), ("scale", q.scale[:1], "scale must")):
        altered = dataclasses.replace(q)  # altered after construction: rejected, never a RuntimeError
        object.__setattr__(altered, field, value)
        yield f"altered {field}", {**s, "3.weight": altered}, words
    yield "negative variance", {**s, "1.running_var": s["1.running_var"] - 5}, "running variance must be >= 0"


def test_each_bad_update_is_rejected_and_the_others_aggregate(setup):
    net, names, updates = setup
    good = fk.aggregate_state_dicts([u.state for u in updates[1:]], [20, 30])
    for what, state, words in _breakages(updates[0]):
        server = Server(net.state_dict(), bits=8, quantized=names, stats=running_stats(net))
        accepted, rejected = server.aggregate([Update(0, state, 10, 0.0, 1, 0.0), *updates[1:]])
        assert accepted == [1, 2], what
        assert [r.client for r in rejected] == [0] and words in rejected[0].reason, (what, rejected[0].reason)
        assert torch.equal(server.state["3.weight"].data, good["3.weight"].data), what


def test_bad_sample_counts_and_all_bad_rounds(setup):
    net, names, updates = setup
    for count in (0, -3, 2.5, True):
        assert "num_samples" in validate_update(updates[0].state, count, net.state_dict(), bits=8, quantized=names)
    server = Server(net.state_dict(), bits=8, quantized=names)
    before = {k: v.data.clone() if isinstance(v, fk.QuantizedTensor) else v.clone() for k, v in server.state.items()}
    broken = [Update(u.client, u.state, 0, 0.0, 1, 0.0) for u in updates]
    accepted, rejected = server.aggregate(broken)
    assert accepted == [] and len(rejected) == 3
    for k, v in server.state.items():
        assert torch.equal(v.data if isinstance(v, fk.QuantizedTensor) else v, before[k]), k


def test_fp32_server_averages_floats(setup):
    net, _, _ = setup
    states = [{k: v.float() + i if v.is_floating_point() else v for k, v in net.state_dict().items()} for i in range(2)]
    server = Server(net.state_dict(), bits=None, quantized=set())
    accepted, _ = server.aggregate([Update(i, s, n, 0.0, 1, 0.0) for i, (s, n) in enumerate(zip(states, (1, 3)))])
    assert accepted == [0, 1]
    torch.testing.assert_close(server.state["0.weight"], net.state_dict()["0.weight"] + 0.75)
    bad = {**states[0], "0.weight": fk.quantize(states[0]["0.weight"])}
    assert "expected a torch.float32 tensor" in validate_update(bad, 1, net.state_dict(), bits=None, quantized=set())


@pytest.mark.parametrize("bits, symmetric, axis", [(8, True, None), (8, False, 0), (4, True, 0), (3, False, None)])
def test_magnitude_from_the_scales_bounds_the_values_tightly(gen, bits, symmetric, axis):
    x = torch.randn(6, 33, generator=gen) * torch.rand(6, 1, generator=gen) * 5 + 0.3
    q = fk.quantize(x, bits=bits, symmetric=symmetric, axis=axis)
    largest = float(fk.dequantize(q).abs().max())
    assert largest <= magnitude(q) <= float(x.abs().max()) * (1 + 2 ** (1 - bits)) * 1.0001
    assert magnitude(x) == float(x.abs().max()) and magnitude(torch.zeros(0)) == 0.0


def test_growth_limit_follows_the_initial_model_and_can_be_lifted(setup):
    net, names, updates = setup
    u = updates[0]
    grown = {**u.state, "3.weight": fk.quantize(fk.dequantize(u.state["3.weight"]) * 500, axis=0)}
    server = Server(net.state_dict(), bits=8, quantized=names)
    limits = growth_limits(server.state, server.max_growth)
    assert limits["0.weight"] == 100.0  # small weights: 100 x the floor of 1.0
    assert "1.num_batches_tracked" not in limits and limits["1.running_var"] == 100.0
    assert server.aggregate([Update(0, grown, 10, 0.0, 1, 0.0)])[0] == []
    legit = {**u.state, "3.weight": fk.quantize(fk.dequantize(u.state["3.weight"]) * 5, axis=0)}  # fast, not diverged
    assert server.aggregate([Update(0, legit, 10, 0.0, 1, 0.0)])[0] == [0]
    unbounded = Server(net.state_dict(), bits=8, quantized=names, max_growth=None)
    assert unbounded.aggregate([Update(0, grown, 10, 0.0, 1, 0.0)])[0] == [0]
    fp32 = Server(net.state_dict(), bits=None, quantized=set())
    exploded = {k: v * 1e9 if v.is_floating_point() else v for k, v in net.state_dict().items()}
    accepted, rejected = fp32.aggregate([Update(0, exploded, 10, 0.0, 1, 0.0)])
    assert accepted == [] and "growth limit" in rejected[0].reason


def test_running_statistics_are_found_by_module_type():
    assert running_stats(model()) == [RunningStats("1.running_mean", "1.running_var")]
    assert running_stats(nn.BatchNorm1d(3)) == [RunningStats("running_mean", "running_var")]
    assert running_stats(nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False), nn.Linear(2, 2))) == []
    stats = running_stats(ResNet18(width=4))
    assert len(stats) == 20  # the stem, two per block, three shortcuts
    assert RunningStats("layer2.0.downsample.1.running_mean", "layer2.0.downsample.1.running_var") in stats
    assert Server.for_run(RunConfig(), model()).stats == running_stats(model())


def test_running_statistics_are_bounded_as_statistics_not_as_weights(setup):
    """Measured: one round of ResNet-18 took a running variance from 1.0 to 244, which the
    weight rule (100 x max(1.0, 1.0)) rejected; as a standard deviation it is 15.6."""
    net, names, updates = setup
    stats = running_stats(net)
    limits = growth_limits(Server(net.state_dict(), bits=8, quantized=names).state, 100.0, stats)
    assert limits["1.running_mean"] == limits["1.running_var"] == 100.0  # mean 0, std 1: the floor of 1.0

    def offer(global_state=None, stats=stats, max_growth=100.0, **entries):
        """The rejection reason of a fresh server for an update holding ``entries``, or None."""
        global_state = net.state_dict() if global_state is None else global_state
        server = Server(global_state, bits=8, quantized=names, max_growth=max_growth, stats=stats)
        state = {**updates[0].state, **{f"1.{k}": torch.full((4,), float(v)) for k, v in entries.items()}}
        accepted, rejected = server.aggregate([Update(0, state, 10, 0.0, 1, 0.0)])
        return rejected[0].reason if rejected else None

    assert "'1.running_var': its largest magnitude 244 exceeds 100" in offer(stats=(), running_var=244)
    assert offer(running_var=244) is None
    assert "'1.running_var': its largest standard deviation 1e+03 exceeds 100" in offer(running_var=1e6)
    assert "'1.running_mean': its largest magnitude 150 exceeds 100" in offer(running_mean=150)
    # mean and standard deviation share their layer's scale: a global std of 2 allows |mean| up to 200
    wide = {**net.state_dict(), "1.running_var": torch.full((4,), 4.0)}
    assert growth_limits(wide, 100.0, stats)["1.running_mean"] == 200.0
    assert offer(wide, running_mean=150) is None and "exceeds 200" in offer(wide, running_mean=250)
    assert offer(max_growth=None, running_var=1e12) is None
    assert "running variance must be >= 0, found -0.5" in offer(max_growth=None, running_var=-0.5)


def test_max_weight_growth_setting():
    assert Server.for_run(RunConfig(max_weight_growth=7.0), model()).max_growth == 7.0
    assert Server.for_run(RunConfig(max_weight_growth=None, strategy="fp32"), model()).bits is None
    for bad in (0.5, float("inf"), "10", True):
        with pytest.raises(ConfigError, match="max_weight_growth"):
            RunConfig(max_weight_growth=bad).validated()


def test_a_client_quantized_with_another_scheme_is_rejected_alone(setup):
    """Issue 15: a valid update quantized per tensor (or asymmetrically) where the global
    model is per channel passed validation, then aggregation refused the mix and every
    client was rejected: the model never updated."""
    net, names, updates = setup
    w = updates[0].state["3.weight"]
    for what, other in (
        ("per tensor", fk.quantize(fk.dequantize(w), bits=8)),
        ("asymmetric", fk.quantize(fk.dequantize(w), bits=8, axis=0, symmetric=not w.symmetric)),
    ):
        server = Server(net.state_dict(), bits=8, quantized=names)
        odd = Update(0, {**updates[0].state, "3.weight": other}, 10, 0.0, 1, 0.0)
        accepted, rejected = server.aggregate([odd, *updates[1:]])
        assert accepted == [1, 2] and [r.client for r in rejected] == [0], what
        assert "quantized with" in rejected[0].reason, what


def test_sample_counts_are_bounded_by_what_the_client_declared(setup):
    """Issue 15: 10**12 samples with tiny scales zeroed the model, 2**62 took all the
    weight and 10**400 ended the run with an OverflowError."""
    net, names, updates = setup
    server = Server(net.state_dict(), bits=8, quantized=names)
    server.declare_samples({0: 10, 1: 20, 2: 30})
    for count in (11, 10**12, 2**62, 10**400):
        claim = Update(0, updates[0].state, count, 0.0, 1, 0.0)
        accepted, rejected = server.aggregate([claim, *updates[1:]])
        assert accepted == [1, 2] and "num_samples must be an int in [1, 10]" in rejected[0].reason, count
    undeclared = Server(net.state_dict(), bits=8, quantized=names)
    assert undeclared.aggregate([Update(0, updates[0].state, 10**400, 0.0, 1, 0.0)])[0] == []
    assert undeclared.aggregate([Update(0, updates[0].state, 2**31 - 1, 0.0, 1, 0.0)])[0] == [0]


def test_scales_below_what_quantization_picks_are_rejected(setup):
    net, names, updates = setup
    q = updates[0].state["3.weight"]
    tiny = {**updates[0].state, "3.weight": dataclasses.replace(q, scale=torch.full_like(q.scale, 1e-45))}
    reason = validate_update(tiny, 10, net.state_dict(), bits=8, quantized=names)
    assert reason and "scale below" in reason


def test_a_second_update_from_one_client_is_rejected(setup):
    net, names, updates = setup
    server = Server(net.state_dict(), bits=8, quantized=names)
    accepted, rejected = server.aggregate([updates[0], updates[0], updates[1]])
    assert accepted == [0, 1] and [r.client for r in rejected] == [0] and "second update" in rejected[0].reason


def test_an_update_that_breaks_validation_is_rejected_alone(setup):
    class Hostile(dict):
        def __getitem__(self, key):
            raise RuntimeError("boom")

    net, names, updates = setup
    server = Server(net.state_dict(), bits=8, quantized=names)
    accepted, rejected = server.aggregate([Update(0, Hostile(updates[0].state), 10, 0.0, 1, 0.0), *updates[1:]])
    assert accepted == [1, 2] and "RuntimeError: boom" in rejected[0].reason


def test_the_growth_bound_does_not_ratchet(setup):
    """Issue 15: the bound followed the global model, so a round of weights at 90 let
    the next round through at 100 x 90. It is fixed by the initial model."""
    net, names, updates = setup
    server = Server(net.state_dict(), bits=8, quantized=names)
    base = updates[0].state["3.weight"]

    def scaled(client, target):
        w = fk.dequantize(base)
        return Update(
            client, {**updates[0].state, "3.weight": fk.quantize(w * target / w.abs().max(), axis=0)}, 10, 0.0, 1, 0.0
        )

    assert server.aggregate([scaled(0, 90.0)])[0] == [0]  # within 100 x the floor of 1.0
    accepted, rejected = server.aggregate([scaled(0, 900.0)])
    assert accepted == [] and "exceeds 100" in rejected[0].reason


def test_aggregation_setting_is_parsed_and_validated():
    assert RunConfig().aggregation_method == ("mean", 0.0)
    assert RunConfig(aggregation="median").validated().aggregation_method == ("median", 0.0)
    trimmed = RunConfig(aggregation="trimmed-mean").validated()
    assert trimmed.aggregation == "trimmed-mean:0.1" and trimmed.aggregation_method == ("trimmed-mean", 0.1)
    assert RunConfig(aggregation="trimmed-mean:0.25").validated().to_dict()["aggregation"] == "trimmed-mean:0.25"
    server = Server.for_run(RunConfig(aggregation="trimmed-mean:0.2").validated(), model())
    assert (server.aggregation, server.trim) == ("trimmed-mean", 0.2)
    for bad in ("mode", "trimmed-mean:0.5", "trimmed-mean:-0.1", "trimmed-mean:nan", "trimmed-mean:x", "median:0.1", 3):
        with pytest.raises(ConfigError, match="aggregation"):
            RunConfig(aggregation=bad).validated()


def test_aggregation_from_the_cli_and_the_flower_run_config():
    from fedhq import cli

    for command in ("run", "compare"):
        args = cli.build_parser().parse_args([command, "--aggregation", "median"])
        assert cli._run_config(args).aggregation == "median"
    assert cli.main(["run", "--aggregation", "trimmed-mean:0.7"]) == 2
    flower = pytest.importorskip("fedhq.flower.server_app", reason="the Flower run config needs the flower extra")
    assert flower.run_config_from_flower({"aggregation": "trimmed-mean:0.2"}).aggregation_method == (
        "trimmed-mean",
        0.2,
    )


def test_round_intake_aggregates_as_updates_arrive_and_keeps_none(setup):
    import gc
    import weakref

    net, names, updates = setup
    server = Server(net.state_dict(), bits=8, quantized=names)
    intake = server.open_round()
    alive = []
    for update in updates:
        state = {k: dataclasses.replace(v, data=v.data.clone()) if k in names else v for k, v in update.state.items()}
        alive.append(weakref.ref(state["0.weight"].data))
        fresh = Update(update.client, state, update.num_samples, 0.0, 1, 0.0)
        del state
        intake.offer(fresh)
        del fresh
    gc.collect()
    assert [ref() for ref in alive] == [None, None, None]  # nothing of an update outlives its offer
    intake.offer(updates[0])  # a second update from client 0
    assert intake.close() == ([0, 1, 2], intake.rejected) and len(intake.rejected) == 1
    assert_state_is(server, fk.aggregate_state_dicts([u.state for u in updates], [u.num_samples for u in updates]))


def test_fp32_round_is_the_same_running_mean(setup, gen):
    net, _, _ = setup
    states = []
    for client in range(3):
        state = {
            k: v + 0.1 * torch.randn(v.shape, generator=gen)
            for k, v in net.state_dict().items()
            if v.is_floating_point()
        }
        state["1.running_var"] = state["1.running_var"].abs()
        state["1.num_batches_tracked"] = torch.tensor(client)
        states.append(state)
    server = Server(net.state_dict(), bits=None, quantized=set())
    accepted, rejected = server.aggregate([Update(k, s, 5 + k, 0.0, 1, 0.0) for k, s in enumerate(states)])
    assert (accepted, rejected) == ([0, 1, 2], [])
    expected = fk.aggregate_state_dicts(states, [5, 6, 7])
    for name, value in expected.items():
        assert torch.equal(server.state[name], value), name
    assert int(server.state["1.num_batches_tracked"]) == round((5 * 0 + 6 * 1 + 7 * 2) / 18)


def test_replies_come_out_in_client_order_whatever_order_they_arrive_in():
    gen = torch.Generator().manual_seed(7)
    for _ in range(200):
        clients = torch.randperm(40, generator=gen)[: int(torch.randint(1, 12, (1,), generator=gen))].tolist()
        silent = {c for c in clients if torch.rand(1, generator=gen) < 0.3}
        arrivals = [clients[i] for i in torch.randperm(len(clients), generator=gen).tolist()]
        order, out = InClientOrder(clients), []
        for c in arrivals:
            out += order.skip(c) if c in silent else order.put(c, f"reply {c}")
        assert out == [(c, f"reply {c}") for c in sorted(clients) if c not in silent]
        # a reply is held only while a client before it has not been heard from
        peak, first_unheard = 0, min(clients)
        for t, c in enumerate(arrivals):
            if c not in silent:
                arrived = {a for a in arrivals[: t + 1] if a not in silent}
                peak = max(peak, len({a for a in arrived if a >= first_unheard}))
            first_unheard = min(set(clients) - set(arrivals[: t + 1]), default=max(clients) + 1)
        assert order.peak == peak
    order = InClientOrder([0, 1, 2])
    assert order.put(2, "b") == [] and order.put(0, "a") == [(0, "a")] and order.peak == 2
    with pytest.raises(ValueError, match="client 2 replied twice"):
        order.put(2, "again")
    assert order.skip(1) == [(2, "b")]
    # a reply already handed out, or from a client not planned, would be held for ever
    with pytest.raises(ValueError, match="client 0 replied twice"):
        order.put(0, "again")
    with pytest.raises(ValueError, match="client 1 replied twice"):
        order.skip(1)
    with pytest.raises(ValueError, match="client 7 is not a client of this round"):
        order.put(7, "stray")


def test_download_requantizes_the_global_model_at_a_clients_bits(setup):
    net, names, _ = setup
    server = Server(net.state_dict(), bits=8, quantized=names)
    assert server.download(None) is server.state
    bits = dict.fromkeys(sorted(names), 8) | {"0.weight": 3, "3.bias": 5}
    sent = server.download(bits)
    for name, q in sent.items():
        if name not in names:
            assert sent[name] is server.state[name]
            continue
        held = server.state[name]
        assert (q.bits, q.axis, q.symmetric, q.shape) == (bits[name], held.axis, held.symmetric, held.shape)
        if bits[name] == 8:
            assert q is held
        else:  # plain-torch reference: the held model's values, quantized at the plan's width
            expected = fk.quantize(held.dequantize(), bits=bits[name], symmetric=held.symmetric, axis=held.axis)
            assert torch.equal(q.data, expected.data) and torch.equal(q.scale, expected.scale)


def test_each_update_is_checked_against_its_clients_planned_bits(setup):
    net, names, updates = setup
    server = Server(net.state_dict(), bits=8, quantized=names)
    planned = {0: dict.fromkeys(names, 8), 1: dict.fromkeys(names, 8) | {"0.weight": 4}, 2: dict.fromkeys(names, 8)}
    intake = server.open_round(upload_bits=planned)
    for update in updates:  # all three uploaded at 8 bits: client 1 was asked for 4 in '0.weight'
        intake.offer(update)
    accepted, rejected = intake.close()
    assert accepted == [0, 2] and [r.client for r in rejected] == [1]
    assert "'0.weight'" in rejected[0].reason and "expected 4-bit codes, got 8-bit" in rejected[0].reason


def test_round_plan_bit_maps_are_validated():
    from fedhq.fl.client import RoundPlan

    values = {"round": 1, "strategy": "ptq", "epochs": 1, "batch_size": 8, "lr": 0.1, "momentum": 0.0, "bits": 8}
    plan = RoundPlan(**values, seed=0, upload_bits={"a": 4}, download_bits={"b": 2})
    assert plan.upload_map({"a", "b"}) == {"a": 4, "b": 8} and plan.download_map({"a", "b"}) == {"a": 8, "b": 2}
    assert RoundPlan(**values, seed=0).download_map({"a"}) is None
    with pytest.raises(ValueError, match="not quantized: \\['c'\\]"):
        RoundPlan(**values, seed=0, upload_bits={"c": 4}).upload_map({"a"})
    for bad in (1, 9, 4.0, True):
        with pytest.raises(ValueError, match="upload_bits must map names to widths in \\[2, 8\\]"):
            RoundPlan(**values, seed=0, upload_bits={"a": bad})
    for bad in ([4], "4", 4):  # JSON in a training message that is not an object: an AttributeError before
        with pytest.raises(ValueError, match="download_bits must map names to widths"):
            RoundPlan(**values, seed=0, download_bits=bad)


def test_a_range_of_planned_widths_accepts_narrower_uploads_only(setup):
    net, names, updates = setup
    server = Server(net.state_dict(), bits=8, quantized=names)
    weights = {k: v.dequantize() if isinstance(v, fk.QuantizedTensor) else v for k, v in updates[0].state.items()}
    planned = dict.fromkeys(names, range(2, 7)) | {"3.weight": range(2, 9)}  # as for a pruning (mpq) client
    narrower = Update(0, quantize_upload(weights, names, dict.fromkeys(names, 8) | {"0.weight": 3}), 10, 0.0, 1, 0.0)
    assert "'0.bias': expected 2- to 6-bit codes, got 8-bit" == server.check(narrower, planned)
    fits = Update(0, quantize_upload(weights, names, dict.fromkeys(names, 5) | {"3.weight": 8}), 10, 0.0, 1, 0.0)
    assert server.check(fits, planned) is None
