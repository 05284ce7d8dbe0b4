"""What the end-to-end FL tests (test_fl.py) do not pin down by themselves: the QAT
client really trains a fake-quantized model, a client's round is a pure function of
its inputs, the simulated time is exactly steps x step time / beta + bytes / uplink
with the round lasting as long as its slowest client, fp32 and zero-point faults are
rejected, a failed checkpoint write leaves the previous checkpoint intact, and every
strategy allocates as specified."""

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fedhq_kernels as fk
from fedhq import cli
from fedhq.allocation import global_init, normalize_significance
from fedhq.data import load_dataset
from fedhq.fl import RunConfig, checkpoint, engine
from fedhq.fl.client import ClientState, RoundPlan, build_client_model, train_local
from fedhq.fl.server import Server
from fedhq.fl.timing import ClientDevice
from fedhq.fl.topology import Topology
from fedhq.models import ModelSpec
from fedhq.profile import schema
from fedhq.quant import float_state_dict, load_float_state_dict, observer_keys

KEY = "small_cnn@8x8x1:10"
DEVICES = Path(__file__).resolve().parents[1] / "fedhq" / "devices"


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


@pytest.fixture
def spec():
    return ModelSpec.parse(KEY)


def plan(strategy, round_=1, **changes):
    values = dict(round=round_, strategy=strategy, epochs=1, batch_size=16, lr=0.05, momentum=0.9, bits=8, seed=3)
    values.update(changes)
    return RoundPlan(**values)


def same_upload(a: dict, b: dict) -> bool:
    def flat(v):
        return (v.data, v.scale, v.zero_point) if isinstance(v, fk.QuantizedTensor) else (v,)

    return a.keys() == b.keys() and all(all(torch.equal(x, y) for x, y in zip(flat(a[k]), flat(b[k]))) for k in a)


# ---- the client ----


def test_qat_client_model_fake_quantizes_and_passes_gradients(spec, gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    weights = float_state_dict(spec.build())
    ptq, qat = build_client_model(spec, "ptq", None, bits=8), build_client_model(spec, "qat", None, bits=8)
    for model in (ptq, qat):
        load_float_state_dict(model, weights)
        model.train()
    x = torch.randn(32, 1, 8, 8, generator=gen)
    y = torch.randint(0, 10, (32,), generator=gen)
    out_ptq, out_qat = ptq(x), qat(x)
    gap = (out_qat - out_ptq).abs().max().item()
    # INT8 weights and activations move the logits, but only by quantization noise
    assert 0 < gap < 0.1 * out_ptq.abs().max().item(), gap
    assert observer_keys(qat) and not observer_keys(ptq)
    F.cross_entropy(out_qat, y).backward()
    for name, p in qat.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()) and bool(p.grad.abs().sum() > 0), name


def test_qat_client_fake_quantizes_at_the_runs_bits(spec, digits, monkeypatch):
    import fedhq.fl.client as client_module

    built, real_prepare_qat = [], client_module.prepare_qat

    def spy(model, **options):
        built.append(real_prepare_qat(model, **options))
        return built[-1]

    monkeypatch.setattr(client_module, "prepare_qat", spy)
    data = digits.train.subset(range(32))
    update, _ = train_local(spec, float_state_dict(spec.build()), data, plan("qat", bits=4), 0, ClientState())
    (model,) = built
    layers = [m for m in model.modules() if hasattr(m, "qat_config")]
    assert layers and all(m.qat_config.weight_bits == 4 and m.qat_config.act_bits == 4 for m in layers)
    for layer in layers:
        levels = max(row.unique().numel() for row in layer.quantize_weight().detach().flatten(1))
        assert 4 < levels <= 16  # 4-bit codes, and more than a handful used
    assert all(v.bits == 4 for v in update.state.values() if isinstance(v, fk.QuantizedTensor))


def test_qat_and_ptq_clients_train_differently_and_observers_stay_local(spec, digits):
    torch.manual_seed(0)
    weights = float_state_dict(spec.build())
    data = digits.train.subset(range(96))
    up_ptq, state_ptq = train_local(spec, weights, data, plan("ptq"), 0)
    up_qat, state_qat = train_local(spec, weights, data, plan("qat"), 0)
    assert state_ptq.observers == {} and state_qat.observers
    assert up_qat.state.keys() == up_ptq.state.keys() == weights.keys()  # observers never leave the client
    assert not same_upload(up_qat.state, up_ptq.state)
    # round 2: the kept observer ranges change what the QAT client computes
    kept, _ = train_local(spec, weights, data, plan("qat", 2), 0, state_qat)
    fresh, _ = train_local(spec, weights, data, plan("qat", 2), 0, ClientState())
    assert not same_upload(kept.state, fresh.state)


def test_a_client_round_is_a_pure_function_of_its_inputs(spec, digits):
    torch.manual_seed(0)
    weights = float_state_dict(spec.build())
    data = digits.train.subset(range(50))
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)  # the global RNG must not matter
        runs.append(train_local(spec, weights, data, plan("qat", epochs=2), 4))
    (a, state_a), (b, state_b) = runs
    assert same_upload(a.state, b.state) and a.train_loss == b.train_loss
    assert all(torch.equal(v, state_b.observers[k]) for k, v in state_a.observers.items())
    assert a.steps == b.steps == 2 * math.ceil(50 / 16) and a.num_samples == 50
    other_round, _ = train_local(spec, weights, data, plan("qat", 2, epochs=2), 4)
    assert not same_upload(a.state, other_round.state)  # shuffling depends on the round


# ---- simulated time ----

MiB = 1 << 20


def measured_profile(name, step0, step1, *, uplink_mbps=None):
    """A measured profile whose step time is exactly step0 + step1 * B at the measured
    batch sizes, with memory enough for any batch used here."""

    def rows(factor):
        return [
            {
                "batch": b,
                "step_s": {"median": factor * (step0 + step1 * b)},
                "peak_memory_bytes": (50 + b) * MiB,
                "ops": 40,
                "flops": 1e6 * b,
                "bytes_compute": 1e5 * b,
                "bytes_other": 1e5 * b,
            }
            for b in (4, 16, 64)
        ]

    doc = {
        "schema": schema.SCHEMA,
        "schema_version": schema.SCHEMA_VERSION,
        "kind": "measured",
        "timestamp": "2026-01-01T00:00:00+00:00",
        "software": {"torch": torch.__version__},
        "device": {"name": name, "type": "cpu", "memory_bytes": 64 << 30, "memory_overhead_bytes": 0},
        "figures": {
            "copy_bandwidth_gbps": {"median": 10.0},
            "matmul_tflops": {"float32": {"median": 0.1}},
            "launch_overhead_us": {"median": 5.0},
        },
        "models": {
            KEY: {"params": 20_000, "strategies": {"ptq": {"batches": rows(1.0)}, "qat": {"batches": rows(2.0)}}}
        },
    }
    if uplink_mbps is not None:
        doc["network"] = {"uplink_mbps": {"median": uplink_mbps, "source": "test"}}
    return doc


def step(doc, strategy, batch):
    """The closed form the profile was built from (QAT rows are twice the PTQ ones)."""
    row = next(r for r in doc["models"][KEY]["strategies"][strategy]["batches"] if r["batch"] == batch)
    return row["step_s"]["median"]


def test_client_time_is_steps_times_step_over_beta_plus_bytes_over_uplink():
    fast = measured_profile("fast", 1e-3, 1e-4, uplink_mbps=4.0)
    device = ClientDevice(fast, fast, beta=0.25, default_uplink_mbps=99.0)
    assert device.compute_seconds(KEY, "qat", 16, 30) == pytest.approx(30 * 2 * (1e-3 + 16e-4) / 0.25, rel=1e-12)
    assert device.compute_seconds(KEY, "fp32", 16, 30) == pytest.approx(30 * (1e-3 + 16e-4) / 0.25, rel=1e-12)
    assert device.upload_seconds(500_000) == pytest.approx(500_000 * 8 / 4e6, rel=1e-12)
    # a profile without a network figure gets the configured default
    bare = measured_profile("bare", 1e-3, 1e-4)
    assert ClientDevice(bare, bare, beta=1.0, default_uplink_mbps=2.5).uplink_mbps == 2.5
    # presets carry their own uplink, with a stated source
    for path in sorted(DEVICES.glob("*.json")):
        network = json.loads(path.read_text())["network"]["uplink_mbps"]
        preset = ClientDevice(path.stem, fast, beta=1.0, default_uplink_mbps=99.0)
        assert preset.uplink_mbps == network["median"] > 0 and network["source"], path.name


def test_a_flat_round_waits_for_the_slowest_compute_plus_upload():
    flat = Topology.flat(4)  # the one round-time rule of both engines
    # client 0 computes longest, but client 1's upload makes it the slowest
    assert flat.round_time({0: 5.0, 1: 1.0, 2: 3.0}, {0: 0.5, 1: 6.0, 2: 0.1}) == (7.0, 1)
    assert flat.round_time({3: 1.0, 2: 0.5}, {3: 1.0, 2: 1.5}) == (2.0, 2)  # ties: lowest id
    assert flat.round_time({}, {}) == (0.0, None)


def test_engine_round_time_follows_the_clients_devices(tmp_path):
    """A run on two measured 'devices' with known step times: every round's simulated
    time, slowest client and per-epoch time can be recomputed by hand from results.json;
    the fedhq allocation and the reported normalized values match global_init."""
    fast = measured_profile("fast", 1e-3, 1e-4, uplink_mbps=0.05)  # slow link: upload-bound
    slow = measured_profile("slow", 10e-3, 1e-3)  # no network figure: uplink_mbps below
    paths = [schema.dump(doc, tmp_path / f"{doc['device']['name']}.json") for doc in (fast, slow)]
    betas = [1.0, 0.25, 0.5, 0.5]
    config = RunConfig(
        strategy="fedhq",
        clients=4,
        rounds=2,
        local_epochs=2,
        batch_size=64,
        partition="iid",
        devices=[str(p) for p in paths],
        alphas=[1.0] * 4,
        betas=betas,
        uplink_mbps=20.0,
        reference_profile=str(paths[0]),
        output_dir=str(tmp_path / "run"),
    ).validated()
    results = engine.run(config, echo=lambda s: None)
    docs = [fast, slow, fast, slow]
    uplinks = [0.05, 20.0, 0.05, 20.0]
    for row in results["rounds"]:
        assert row["participants"] == [0, 1, 2, 3] and row["upload_bytes"] % 4 == 0
        nbytes = row["upload_bytes"] // 4  # same model, same quantization: equal uploads
        compute, total = [], []
        for c, doc, uplink in zip(results["clients"], docs, uplinks):
            assert c["batch"] == 64
            steps = 2 * math.ceil(c["samples"] / 64)
            compute.append(steps * step(doc, "qat" if c["strategy"] == "qat" else "ptq", 64) / c["beta"])
            total.append(compute[-1] + nbytes * 8 / (uplink * 1e6))
        assert row["sim_s"] == pytest.approx(max(total), rel=1e-9)
        assert row["slowest_client"] == int(np.argmax(total)) and row["slowest_client"] in (0, 2)
        assert row["sim_s"] > max(compute)  # the upload counts
        assert row["sim_epoch_s"] == pytest.approx(max(compute) / 2, rel=1e-9)
    assert results["sim_time_s"] == pytest.approx(sum(r["sim_s"] for r in results["rounds"]), rel=1e-12)
    # allocation: global_init on the reported significances; normalized values as reported
    speed_sig = [c["speed_sig"] for c in results["clients"]]
    acc_sig = [c["acc_sig"] for c in results["clients"]]
    expected = global_init(
        speed_sig, acc_sig, config.xi, config.area_threshold, speed_orientation=config.speed_orientation
    )
    assert [c["strategy"] for c in results["clients"]] == [str(s) for s in expected.strategies]
    norm_speed = normalize_significance(speed_sig)
    if config.speed_orientation == "speed":
        norm_speed = 1 - norm_speed
    assert [c["norm_speed"] for c in results["clients"]] == pytest.approx(norm_speed.tolist())
    assert [c["norm_acc"] for c in results["clients"]] == pytest.approx(normalize_significance(acc_sig).tolist())


# ---- the server and checkpoints ----


def test_fp32_server_rejects_non_finite_weights_and_keeps_its_model(spec):
    torch.manual_seed(0)
    initial = spec.build().state_dict()
    server = Server(initial, bits=None, quantized=set())
    good = {k: v + 1 if v.is_floating_point() else v for k, v in initial.items()}
    name = next(k for k, v in initial.items() if v.is_floating_point())
    for bad_value in (math.nan, math.inf):
        broken = dict(good)
        broken[name] = good[name].clone()
        broken[name].view(-1)[0] = bad_value
        update = type("U", (), {"client": 7, "state": broken, "num_samples": 5})()
        accepted, rejected = server.aggregate([update])
        assert accepted == [] and "NaN or Inf" in rejected[0].reason and name in rejected[0].reason
        assert all(torch.equal(server.state[k], initial[k]) for k in initial)


def test_zero_point_out_of_range_is_rejected(spec):
    torch.manual_seed(0)
    model = spec.build()
    names = {n for n, _ in model.named_parameters()}
    server = Server(model.state_dict(), bits=8, quantized=names)
    state = dict(server.state)
    key = sorted(names)[0]
    q = state[key]
    state[key] = fk.QuantizedTensor(
        q.data, q.scale, torch.full_like(q.zero_point, 300), q.bits, q.axis, q.symmetric, q.dtype, q.shape
    )
    update = type("U", (), {"client": 1, "state": state, "num_samples": 5})()
    before = {k: v.data.clone() for k, v in server.state.items() if isinstance(v, fk.QuantizedTensor)}
    accepted, rejected = server.aggregate([update])
    assert accepted == [] and key in rejected[0].reason and "zero_point must lie in" in rejected[0].reason
    assert all(torch.equal(server.state[k].data, v) for k, v in before.items())


def test_a_failed_checkpoint_write_leaves_the_previous_one(tmp_path):
    path = tmp_path / "checkpoint.pt"
    q = fk.quantize(torch.randn(4, 3), axis=0)
    checkpoint.save(path, {"history": [1, 2], "server_state": {"w": q}})
    with pytest.raises((pickle.PicklingError, AttributeError)):  # which one depends on the object
        checkpoint.save(path, {"history": [1, 2, 3], "bad": lambda: None})  # cannot be pickled
    saved = checkpoint.load(path)
    assert saved["history"] == [1, 2] and torch.equal(saved["server_state"]["w"].data, q.data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temporary file left


# ---- allocation per strategy ----


def test_each_strategy_allocates_as_specified():
    rng = np.random.default_rng(5)
    speed_sig, acc_sig = rng.uniform(0.1, 3, 16).tolist(), rng.uniform(0.1, 3, 16).tolist()

    def allocate(strategy, seed=0):
        return engine.allocate(RunConfig(strategy=strategy, clients=16, seed=seed).validated(), speed_sig, acc_sig)

    config = RunConfig(strategy="fedhq", clients=16).validated()
    expected = global_init(
        speed_sig, acc_sig, config.xi, config.area_threshold, speed_orientation=config.speed_orientation
    )
    assert allocate("fedhq") == [str(s) for s in expected.strategies]
    assert allocate("fedaqt") == ["qat"] * 16 and allocate("fedfq") == ["ptq"] * 16
    assert allocate("fp32") == ["fp32"] * 16
    draws = [allocate("fedrh", seed) for seed in range(4)]
    assert draws[0] == allocate("fedrh", 0)
    assert len({tuple(d) for d in draws}) > 1 and all(set(d) == {"ptq", "qat"} for d in draws)


# ---- configuration ----


def test_flags_override_the_config_file(tmp_path, capsys):
    doc = measured_profile("here", 1e-3, 1e-4)
    reference = schema.dump(doc, tmp_path / "here.json")
    settings = {
        "strategy": "fedfq",
        "clients": 3,
        "rounds": 4,
        "local_epochs": 1,
        "batch_size": 64,
        "reference_profile": str(reference),
        "devices": [str(reference)],
        "output_dir": str(tmp_path / "from-file"),
    }
    (tmp_path / "run.json").write_text(json.dumps(settings))
    out = tmp_path / "from-flags"
    assert cli.main(["run", "--config", str(tmp_path / "run.json"), "--rounds", "1", "--output", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["rounds"] == 1 and len(results["rounds"]) == 1  # flag wins
    assert results["config"]["clients"] == 3 and results["strategy"] == "fedfq"  # file kept
    assert not (tmp_path / "from-file").exists()
    capsys.readouterr()
    assert cli.main(["run", "--config", str(tmp_path / "run.json"), "--bits", "12"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bits must be an int in [2, 8], got 12" in err[0]


def test_default_models_fit_the_datasets_that_need_no_files():
    for name in ("digits", "synthetic"):
        dataset = load_dataset(name, seed=0)
        spec = engine.model_spec(RunConfig(dataset=name).validated(), dataset)
        assert spec.input_shape == dataset.input_shape and spec.num_classes == dataset.num_classes


def test_a_reference_measured_on_a_busy_machine_is_flagged(tmp_path, monkeypatch):
    """Simulated times scale with the reference profile, which a loaded machine skews:
    the run says so when it measures one under load, and stays quiet on an idle one."""
    from fedhq.profile import run as profile_run

    spec = ModelSpec.parse(KEY)
    for load, flagged in ((9.5, True), (0.0, False)):
        doc = measured_profile("here", 1e-3, 1e-4)
        doc["device"]["cores"] = 2
        doc["conditions"] = {"threads": 2, "load_average_start": load, "load_average_end": load}
        monkeypatch.setattr(profile_run, "run_profile", lambda doc=doc, **_: doc)
        lines = []
        out = tmp_path / f"load{load}"
        engine.reference_profile(RunConfig(output_dir=str(out)).validated(), spec, out, lines.append)
        warned = [line for line in lines if "load average" in line]
        assert bool(warned) == flagged, lines
        assert not warned or "--reference-profile" in warned[0]
        assert (out / engine.REFERENCE_FILE).exists()
