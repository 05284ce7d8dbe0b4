"""The hardware profile (fedhq.profile): timing helpers, memory measurement,
work counting, the versioned JSON schema and its errors, and the command lines.

Timings here use tiny ops and one thread (stable on a busy 2-core machine); the
micro-benchmarks run at toy sizes, so their figures are cache figures, not the
machine's: these tests check the machinery, the README's table the numbers."""

import json
import os
import time

import pytest
import torch
from conftest import single_thread
from torch import nn

from fedhq.profile import fit, micro, run, schema, steps, timing
from fedhq.profile.cli import main as profile_main

TINY_SIZES = {"bandwidth_bytes": 1 << 20, "matmul_n": 64, "matmul_low_precision_n": 16, "quant_elements": 1 << 16}
SPEC = "small_cnn@8x8x1"
KEY = "small_cnn@8x8x1:10"

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def profile_doc():
    with single_thread():
        return run.run_profile(quick=True, models=[SPEC], batches=[8, 32, 128], repeats=3, micro_sizes=TINY_SIZES)


# ---- timing ----


def test_timing_statistics():
    t = timing.Timing.from_samples([5.0, 1.0, 3.0, 2.0, 4.0], number=2, warmup=1)
    assert (t.median_s, t.min_s, t.max_s, t.repeats, t.number) == (3.0, 1.0, 5.0, 5, 2)
    assert 1.0 <= t.p10_s <= 2.0 and 4.0 <= t.p90_s <= 5.0
    rate = t.figure(lambda s: 10 / s)  # a rate: p10/p90 swap so that p10 <= median <= p90
    assert rate["p10"] <= rate["median"] <= rate["p90"] and rate["median"] == pytest.approx(10 / 3)
    assert timing.Timing.from_samples([2.0]).p10_s == 2.0
    with pytest.raises(ValueError):
        timing.Timing.from_samples([])


def test_measure_warms_up_rotates_and_times():
    seen = []
    t = timing.measure(seen.append, repeats=4, warmup=2, number=3, inputs=["a", "b", "c"])
    assert len(seen) == 2 + 4 * 3  # warm-up calls first, outside the numbers
    assert seen[:6] == ["a", "b", "c", "a", "b", "c"]  # rotating inputs
    assert t.repeats == 4 and t.number == 3 and t.warmup == 2
    t = timing.measure(lambda: time.sleep(0.004), repeats=3, warmup=0)
    assert 0.004 <= t.median_s < 0.05
    for bad in [dict(repeats=0), dict(number=0), dict(warmup=-1), dict(inputs=[])]:
        with pytest.raises(ValueError):
            timing.measure(lambda *a: None, **bad)


def test_measure_interleaved_alternates():
    order = []
    result = timing.measure_interleaved(
        {"ptq": lambda x: order.append(("ptq", x)), "qat": lambda x: order.append(("qat", x))},
        repeats=3,
        warmup=1,
        inputs=[0, 1],
    )
    timed = [name for name, _ in order[2:]]
    assert timed == ["ptq", "qat"] * 3
    assert set(result) == {"ptq", "qat"} and result["ptq"].repeats == 3


def test_calibrate_number_and_tiny_op_overhead(monkeypatch):
    clock = [0.0]

    class FakeTime:  # a call costs exactly 0.1 ms of a fake clock
        perf_counter = staticmethod(lambda: clock[0])

    monkeypatch.setattr(timing, "time", FakeTime)
    number = timing.calibrate_number(lambda: clock.__setitem__(0, clock[0] + 1e-4), target_s=1e-3)
    assert number == 16  # 1, 2, 4, 8 calls last < 1 ms; 16 calls 1.6 ms
    monkeypatch.undo()
    fig = micro.launch_overhead(torch.device("cpu"), repeats=3)
    assert 0 < fig["p10"] <= fig["median"] <= fig["p90"] < 1000  # microseconds


def test_rotating_inputs_span_the_cache(monkeypatch):
    monkeypatch.setattr(timing, "cache_bytes", lambda device="cpu": 1 << 20)
    small = timing.rotating_inputs(lambda k: torch.full((1024,), float(k + 1)), 4096)
    assert len(small) == 16  # capped at max_copies (2 MiB / 4 KiB would be 512)
    assert len({float(t[0]) for t in small}) == 16
    assert len(timing.rotating_inputs(lambda k: k, 3 << 20)) == 1  # larger than the cache: one
    assert len(timing.rotating_inputs(lambda k: k, 256 << 10, max_copies=64)) == 8
    x = timing.randn_nonzero((1 << 16,), generator=torch.Generator().manual_seed(0))
    assert bool((x != 0).all())


def test_heap_bytes_sees_tensor_allocations():
    before = timing.heap_bytes()
    x = torch.ones(16 << 20, dtype=torch.uint8)  # 16 MiB, touched
    grown = timing.heap_bytes() - before
    del x
    assert 0.9 * (16 << 20) <= grown <= 1.1 * (16 << 20) + (1 << 20), timing.heap_method()
    assert timing.heap_bytes() - before < (1 << 20)
    memory, source = timing.device_memory_bytes()
    assert memory > 1 << 28 and source


# ---- work and memory of a training step ----


def test_step_counter_counts_flops_bytes_and_skips_views():
    layer = nn.Linear(64, 32)
    x = torch.randn(16, 64)
    with steps.StepCounter() as counter:
        layer(x).view(-1).sum()
    assert counter.flops == 2 * 16 * 64 * 32  # addmm
    assert counter.ops == 2  # addmm, sum: the view is not an op that moves data
    assert counter.bytes_compute == 4 * (32 + 16 * 64 + 64 * 32 + 16 * 32)  # bias, x, W^T, out


def test_training_memory_is_affine_and_matches_resident_memory():
    from fedhq.models import ModelSpec
    from fedhq.quant import prepare_ptq, prepare_qat

    spec = ModelSpec.parse("small_cnn@32x32x3")
    result = steps.profile_training(
        spec.build,
        spec.input_shape,
        spec.num_classes,
        {"ptq": prepare_ptq, "qat": lambda m: prepare_qat(m, inplace=True)},
        [4, 16, 64, 40],
        repeats=1,
        warmup=1,
    )
    for strategy, data in result.items():
        rows = {r["batch"]: r for r in data["batches"]}
        xs = [4, 16, 64]
        mem = fit.fit_affine(xs, [rows[b]["peak_memory_bytes"] for b in xs])
        assert mem.max_rel_residual < 0.05, strategy
        # an unmeasured batch is predicted by the affine fit within 10%
        assert mem(40) == pytest.approx(rows[40]["peak_memory_bytes"], rel=0.10), strategy
        flops = [rows[b]["flops"] for b in xs]
        assert flops[1] == pytest.approx(4 * flops[0]) and flops[2] == pytest.approx(16 * flops[0])
        assert data["static_bytes"] >= 2 * 4 * 545_098  # parameters + momentum
    # QAT keeps more for its backward (the fake-quant inputs) and runs more ops
    for b in (16, 64):
        ptq = next(r for r in result["ptq"]["batches"] if r["batch"] == b)
        qat = next(r for r in result["qat"]["batches"] if r["batch"] == b)
        assert qat["peak_memory_bytes"] > ptq["peak_memory_bytes"] and qat["ops"] > ptq["ops"]


def test_heap_peak_agrees_with_the_resident_high_water_mark():
    """The live-heap peak of a step against the kernel's VmHWM (reset through
    /proc/self/clear_refs): RSS also holds pages the allocator keeps after frees, so it
    may be larger, but not several times larger, and the heap never exceeds it much."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("/proc/self/clear_refs is not writable here")

    def hwm():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))

    model = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * 32 * 32, 10),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    step = steps.make_step(model, optimizer)
    batch = (torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,)))
    step(batch)
    optimizer.zero_grad(set_to_none=True)
    import ctypes
    import gc

    gc.collect()
    try:  # give back what the allocator kept from the first step, so RSS can grow again
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    rss_before, heap_before = timing.process_rss_bytes(), timing.heap_bytes()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := current RSS
    with steps.StepCounter(sample_heap=True) as counter:
        step(batch)
    heap_growth = counter.peak_heap - heap_before
    rss_growth = hwm() - rss_before
    assert heap_growth > 64 << 20  # activations of 128 samples: ~100 MB
    assert 0.7 * heap_growth <= rss_growth <= 2.0 * heap_growth, (heap_growth, rss_growth)


# ---- the profile document ----


def test_profile_document_round_trip(profile_doc, tmp_path):
    doc = profile_doc
    assert doc["schema"] == "fedhq-profile" and doc["schema_version"] == schema.SCHEMA_VERSION
    assert doc["kind"] == "measured" and doc["timestamp"] and doc["software"]["torch"] == torch.__version__
    assert doc["device"]["type"] == "cpu" and doc["device"]["memory_bytes"] > 0
    for key in ("copy_bandwidth_gbps", "read_bandwidth_gbps", "launch_overhead_us"):
        fig = doc["figures"][key]
        assert 0 < fig["p10"] <= fig["median"] <= fig["p90"] and fig["repeats"] >= 3
    assert doc["figures"]["matmul_tflops"]["float32"]["median"] > 0
    assert doc["figures"]["matmul_tflops"]["tf32"] is None and "tf32" in doc["figures"]["matmul_tflops"]["unsupported"]
    assert set(doc["figures"]["quant_ops_gbps"]) == {"fake_quant", "fake_quant_observed", "quantize", "aggregate"}
    entry = doc["models"][KEY]
    assert entry["params"] == 53_002 and set(entry["strategies"]) == {"ptq", "qat"}
    assert [r["batch"] for r in entry["qat_over_ptq"]] == [8, 32, 128]
    assert all(r["ratio"] > 0 for r in entry["qat_over_ptq"])
    path = schema.dump(doc, tmp_path / "sub" / "profile.json")
    assert schema.load(path) == json.loads(json.dumps(doc))
    table = run.format_table(doc)
    assert "QAT/FP32 step" in table and KEY in table and "copy bandwidth" in table and "memory(B) =" in table


def _broken(doc, path, value=schema._MISSING):
    doc = json.loads(json.dumps(doc))
    *parents, last = path.split(".")
    node = doc
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    if value is schema._MISSING:
        del node[int(last) if isinstance(node, list) else last]
    else:
        node[int(last) if isinstance(node, list) else last] = value
    return doc


@pytest.mark.parametrize(
    "path,value,match",
    [
        ("schema_version", 2, "schema_version' is 2"),
        ("schema_version", schema._MISSING, "missing field 'schema_version'"),
        ("schema", "something-else", "field 'schema'"),
        ("kind", "guess", "field 'kind'"),
        ("device.memory_bytes", schema._MISSING, "device.memory_bytes"),
        ("figures.copy_bandwidth_gbps", schema._MISSING, "figures.copy_bandwidth_gbps.median"),
        ("figures.matmul_tflops.float32.median", -1.0, "figures.matmul_tflops.float32.median"),
        ("figures.launch_overhead_us.median", "fast", "figures.launch_overhead_us.median"),
        ("timestamp", schema._MISSING, "timestamp"),
        (f"models.{KEY}.params", schema._MISSING, f"models.{KEY}.params"),
        (
            f"models.{KEY}.strategies.qat.batches.1.step_s",
            schema._MISSING,
            f"models.{KEY}.strategies.qat.batches.1.step_s.median",
        ),
        (
            f"models.{KEY}.strategies.ptq.batches.0.peak_memory_bytes",
            0,
            f"models.{KEY}.strategies.ptq.batches.0.peak_memory_bytes",
        ),
        (f"models.{KEY}.strategies.ptq.batches.1.batch", 8, "repeats a batch size"),
        (f"models.{KEY}.strategies.int4", {"batches": []}, "unknown strategy"),
    ],
)
def test_bad_profiles_name_the_field(profile_doc, tmp_path, path, value, match):
    bad = _broken(profile_doc, path, value)
    with pytest.raises(schema.ProfileError, match=match.replace("[", r"\[")):
        schema.validate(bad, "test")
    file = tmp_path / "bad.json"
    file.write_text(json.dumps(bad))
    with pytest.raises(schema.ProfileError, match=str(file)):
        schema.load(file)


def test_unreadable_profiles(tmp_path):
    with pytest.raises(schema.ProfileError, match="cannot read"):
        schema.load(tmp_path / "absent.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(schema.ProfileError, match="not valid JSON"):
        schema.load(tmp_path / "x.json")
    with pytest.raises(schema.ProfileError, match="JSON object"):
        schema.validate([1, 2], "list")


def test_presets_share_the_schema():
    from fedhq.devices import load_preset, preset_names

    names = preset_names()
    assert {"rtx-a6000", "jetson-orin-nano-8gb", "phone-snapdragon-8-gen-2"} <= set(names)
    for name in names:
        doc = load_preset(name)
        assert doc["kind"] == "preset" and doc["sources"]
        for key in ("copy_bandwidth_gbps", "launch_overhead_us"):
            assert doc["figures"][key]["source"] and "estimate" in doc["figures"][key]
        assert doc["figures"]["matmul_tflops"]["float32"]["source"]
    a6000 = load_preset("rtx-a6000")
    assert a6000["figures"]["copy_bandwidth_gbps"]["peak"] == 768
    assert a6000["figures"]["matmul_tflops"]["float32"]["peak"] == 38.7
    assert a6000["device"]["memory_bytes"] == 48 << 30
    with pytest.raises(ValueError, match="unknown device preset 'h100'.*rtx-a6000"):
        load_preset("h100")


# ---- command lines ----


def test_command_lines_write_the_profile(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(micro, "default_sizes", lambda device, quick: dict(TINY_SIZES))
    out = tmp_path / "p.json"
    assert profile_main(["--quick", "--models", "none", "--out", str(out), "--threads", "1"]) == 0
    doc = schema.load(out)
    assert doc["models"] == {} and doc["quick"] is True
    assert "copy bandwidth" in capsys.readouterr().out

    from fedhq.cli import main as fedhq_main

    out2 = tmp_path / "q.json"
    args = ["profile", "--quick", "--models", SPEC, "--batches", "8,32", "--out", str(out2), "--threads", "1"]
    assert fedhq_main(args) == 0
    printed = capsys.readouterr().out
    assert "QAT/FP32 step" in printed and "Validation" in printed and "error" in printed
    assert "NVIDIA RTX A6000" in printed  # the speed model's table over the presets
    assert schema.load(out2)["models"][KEY]["strategies"]["qat"]["batches"][1]["batch"] == 32


def test_command_line_errors(capsys):
    from fedhq.cli import main as fedhq_main

    assert fedhq_main([]) == 2  # no subcommand: help
    assert profile_main(["--models", "vgg99", "--quick", "--device", "tpu"]) == 2
    assert "device must be cpu or cuda" in capsys.readouterr().err
    assert fedhq_main(["profile", "--batches", "8,x"]) == 2
    assert capsys.readouterr().err.startswith("fedhq profile: error: --batches must be comma-separated integers")
    if not torch.cuda.is_available():
        assert profile_main(["--device", "cuda"]) == 2
        assert "no CUDA GPU" in capsys.readouterr().err


def test_contention_warning():
    doc = {"device": {"type": "cpu", "cores": 2}, "conditions": {"threads": 2, "load_average_start": 1.9}}
    assert "WARNING" in run.contention_warning(doc)
    doc["conditions"]["load_average_start"] = 0.2
    assert run.contention_warning(doc) is None


@pytest.mark.skipif(not hasattr(os, "getloadavg"), reason="no load average on this OS")
def test_conditions_are_recorded(profile_doc):
    cond = profile_doc["conditions"]
    assert cond["threads"] == 1 and cond["load_average_start"] is not None and "mallinfo2" in cond["memory_method"]
