"""The speed model (fedhq.analysis.speed): B_m, H_m and T_m of Eq. 1 from measured
profiles and presets, Eq. 2 with its degenerate case, bad input, and the check that
matters most: predicted vs measured time of a real training run on this machine."""

import json
import math

import pytest
import torch

from fedhq.analysis import speed
from fedhq.profile import run, schema

MiB = 1 << 20
KEY = "small_cnn@8x8x1:10"

pytestmark = pytest.mark.usefixtures("one_thread")  # steadier timings (conftest.py)

# Affine ground truth for the synthetic profile: step = 6 ms + 0.5 ms * B,
# memory = 100 MiB + 1 MiB * B; parameters P = 50_000.
STEP0, STEP1, MEM0, MEM1, PARAMS = 6e-3, 0.5e-3, 100 * MiB, 1 * MiB, 50_000


def _rows(batches=(8, 32, 128), step=lambda b: STEP0 + STEP1 * b, mem=lambda b: MEM0 + MEM1 * b):
    return [
        {
            "batch": b,
            "step_s": {"median": step(b), "p10": step(b), "p90": step(b), "repeats": 5},
            "peak_memory_bytes": mem(b),
            "step_growth_bytes": MEM1 * b,
            "ops": 60,
            "flops": 1e6 * b,
            "bytes_compute": 1e5 + 1e4 * b,
            "bytes_other": 2e5 + 3e4 * b,
        }
        for b in batches
    ]


def make_profile(
    kind="measured",
    name="here",
    *,
    memory=1 << 30,
    overhead=20 * MiB,
    gbps=10.0,
    tflops=0.05,
    launch_us=5.0,
    models=True,
    **rows_kw,
):
    doc = {
        "schema": schema.SCHEMA,
        "schema_version": schema.SCHEMA_VERSION,
        "kind": kind,
        "device": {"name": name, "type": "cpu", "memory_bytes": memory, "memory_overhead_bytes": overhead},
        "figures": {
            "copy_bandwidth_gbps": {"median": gbps},
            "matmul_tflops": {"float32": {"median": tflops}},
            "launch_overhead_us": {"median": launch_us},
        },
        "models": {},
    }
    if kind == "measured":
        doc.update(timestamp="2026-01-01T00:00:00+00:00", software={"torch": torch.__version__})
    if models:
        doc["models"][KEY] = {
            "params": PARAMS,
            "strategies": {
                "ptq": {"batches": _rows(**rows_kw)},
                "qat": {"batches": _rows(step=lambda b: 2 * (STEP0 + STEP1 * b))},
            },
        }
    return doc


# ---- Eq. 1 ----


def test_eq1_from_a_measured_profile():
    model = speed.SpeedModel(make_profile())
    alpha, beta, samples, epochs = 0.25, 0.5, 10_000, 3
    budget = alpha * (1 << 30)
    b_m = math.floor((budget - 20 * MiB - MEM0) / MEM1)  # largest B with overhead + a + b*B <= alpha*M
    assert b_m == 136
    est = model.estimate(KEY, "ptq", alpha=alpha, beta=beta, samples=samples, epochs=epochs)
    step = STEP0 + STEP1 * b_m  # beyond the last measured batch: the fitted per-sample cost
    assert est.batch == b_m and est.step_s == pytest.approx(step)
    assert est.hardware_performance == pytest.approx(beta * PARAMS / step)  # H_m: parameters per second
    # Eq. 1, V/B in whole batches (the last one shorter), as training runs them
    assert est.time_s == pytest.approx(math.ceil(samples / b_m) * epochs * PARAMS / est.hardware_performance)
    assert est.time_s == pytest.approx(math.ceil(samples / b_m) * epochs * step / beta)
    assert est.memory_bytes <= est.budget_bytes < est.memory_bytes + MEM1
    assert est.params == PARAMS and est.scaled_from is None and est.device == "here"
    # QAT: same memory here, twice the step time
    qat = model.estimate(KEY, "qat", alpha=alpha, beta=beta, samples=samples, epochs=epochs)
    assert qat.time_s == pytest.approx(2 * est.time_s)


def test_step_time_between_and_beyond_measured_batches():
    model = speed.SpeedModel(make_profile())
    for b in (8, 32, 128):
        assert model.step_time(KEY, "ptq", b) == pytest.approx(STEP0 + STEP1 * b)  # exact where measured
    for b in (20, 64, 100, 500, 4096):
        assert model.step_time(KEY, "ptq", b) == pytest.approx(STEP0 + STEP1 * b)  # affine truth recovered
    assert 0 < model.step_time(KEY, "ptq", 1) <= model.step_time(KEY, "ptq", 8)
    # a noisy dip never makes a larger batch look cheaper, nor bends the extrapolation down
    dip = {8: 0.01, 32: 0.03, 64: 0.02, 128: 0.07}
    noisy = speed.SpeedModel(make_profile(batches=tuple(dip), step=dip.__getitem__))
    times = [noisy.step_time(KEY, "ptq", b) for b in (8, 16, 32, 48, 64, 96, 128, 256, 1024)]
    assert times == sorted(times)
    assert noisy.step_time(KEY, "ptq", 1024) > noisy.step_time(KEY, "ptq", 128)


def test_batch_caps_and_fixed_batches():
    model = speed.SpeedModel(make_profile())
    assert model.estimate(KEY, "ptq", alpha=1.0, beta=1.0, samples=50, epochs=1).batch == 50  # never above V
    assert model.estimate(KEY, "ptq", alpha=1.0, beta=1.0, samples=5000, epochs=1, max_batch=64).batch == 64
    fixed = model.estimate(KEY, "ptq", alpha=1.0, beta=1.0, samples=960, epochs=2, batch=48)
    assert fixed.batch == 48 and fixed.time_s == pytest.approx(960 / 48 * 2 * (STEP0 + STEP1 * 48))
    with pytest.raises(ValueError, match="batch = 950 needs"):  # 20 + 100 + 950 MiB > 1 GiB
        model.estimate(KEY, "ptq", alpha=1.0, beta=1.0, samples=960, epochs=1, batch=950)


@pytest.mark.parametrize("field", ["alpha", "beta"])
@pytest.mark.parametrize("value", [0, -0.5, 1.01, float("nan"), True, "0.5", None])
def test_alpha_beta_outside_unit_interval(field, value):
    model = speed.SpeedModel(make_profile())
    client = {"alpha": 0.5, "beta": 0.5, "samples": 100, "epochs": 1, field: value}
    with pytest.raises(ValueError, match=rf"{field} must be a number in \(0, 1\]"):
        model.estimate(KEY, "ptq", **client)


def test_budget_too_small_for_batch_one():
    model = speed.SpeedModel(make_profile())  # batch 1 needs 20 + 100 + 1 MiB of 1 GiB
    with pytest.raises(ValueError, match=r"alpha = 0.1: the memory budget .* too small for batch 1 .* raise alpha"):
        model.estimate(KEY, "ptq", alpha=0.1, beta=1.0, samples=100, epochs=1)
    assert model.max_batch(KEY, "ptq", 0.119) == 1  # 121.9 MiB: room for one sample


def test_other_bad_client_inputs():
    model = speed.SpeedModel(make_profile())
    ok = {"alpha": 0.5, "beta": 0.5, "samples": 100, "epochs": 1}
    for field, value in [("samples", 0), ("samples", 2.5), ("epochs", 0), ("epochs", float("inf")), ("max_batch", 0)]:
        with pytest.raises(ValueError, match=field):
            model.estimate(KEY, "ptq", **{**ok, field: value})
    with pytest.raises(ValueError, match="strategy must be one of"):
        model.estimate(KEY, "int4", **ok)
    with pytest.raises(ValueError, match="no measurements of model resnet18@32x32x3:10"):
        model.estimate("resnet18", "ptq", **ok)
    one_strategy = make_profile()
    del one_strategy["models"][KEY]["strategies"]["qat"]
    with pytest.raises(ValueError, match="no 'qat' measurements"):
        speed.SpeedModel(one_strategy).estimate(KEY, "qat", **ok)
    flat = make_profile(mem=lambda b: 100 * MiB)
    with pytest.raises(ValueError, match="does not grow with the batch size"):
        speed.SpeedModel(flat).max_batch(KEY, "ptq", 0.5)


# ---- presets ----


def test_preset_scaling_is_the_roofline_ratio():
    here = make_profile()
    fast = make_profile(
        "preset", "fast", memory=4 << 30, overhead=300 * MiB, gbps=40.0, tflops=0.5, launch_us=2.0, models=False
    )
    model = speed.SpeedModel(fast, reference=here)

    def cost(b, gbps, tflops, launch_us):
        ops, flops, bc, bo = 60, 1e6 * b, 1e5 + 1e4 * b, 2e5 + 3e4 * b
        return ops * launch_us * 1e-6 + max(bc / (gbps * 1e9), flops / (tflops * 1e12)) + bo / (gbps * 1e9)

    for b in (8, 48, 300):
        expected = (STEP0 + STEP1 * b) * cost(b, 40.0, 0.5, 2.0) / cost(b, 10.0, 0.05, 5.0)
        assert model.step_time(KEY, "ptq", b) == pytest.approx(expected)
        assert model.step_time(KEY, "ptq", b) < speed.SpeedModel(here).step_time(KEY, "ptq", b)
    # memory: the reference's model bytes plus the preset's runtime overhead
    assert model.memory(KEY, "ptq", 10) == pytest.approx(300 * MiB + MEM0 + 10 * MEM1)
    est = model.estimate(KEY, "qat", alpha=0.5, beta=1.0, samples=100_000, epochs=1)
    assert est.scaled_from == "here" and est.batch == math.floor((2 << 30) - 300 * MiB - MEM0) // MEM1


def test_real_presets_with_a_reference(tmp_path):
    here = make_profile()
    path = tmp_path / "here.json"
    schema.dump(here, path)
    for name in ("rtx-a6000", "jetson-orin-nano-8gb", "phone-snapdragon-8-gen-2"):
        est = speed.training_time(name, KEY, "qat", reference=str(path), alpha=0.5, beta=1.0, samples=5000, epochs=5)
        assert est.time_s > 0 and est.scaled_from == "here" and 1 <= est.batch <= 5000
    a6000 = speed.SpeedModel("rtx-a6000", reference=here)
    assert a6000.step_time(KEY, "ptq", 128) < speed.SpeedModel(here).step_time(KEY, "ptq", 128)


def test_preset_errors():
    with pytest.raises(ValueError, match="unknown device preset 'tpu-v9'"):
        speed.SpeedModel("tpu-v9")
    with pytest.raises(ValueError, match="no measurements of model .* reference profile"):
        speed.SpeedModel("rtx-a6000").step_time(KEY, "ptq", 8)
    with pytest.raises(ValueError, match="must be a measured profile"):
        speed.SpeedModel(make_profile(), reference="rtx-a6000")
    bad = make_profile()
    del bad["figures"]["launch_overhead_us"]
    with pytest.raises(schema.ProfileError, match="figures.launch_overhead_us.median"):
        speed.SpeedModel(bad)
    with pytest.raises(TypeError):
        speed.SpeedModel(42)


# ---- Eq. 2 ----


def test_eq2_speed_significance():
    assert speed.speed_significance([10.0, 12.0, 20.0]) == pytest.approx([1.0, 1.2, 2.0])  # T / (T_max - T_min)
    assert speed.speed_significance([5.0, 5.0, 5.0]) == [0.5, 0.5, 0.5]  # zero denominator: 0.5 for all
    assert speed.speed_significance([7.0]) == [0.5]
    assert speed.speed_significance([1.0, 1.0 + 1e-12]) == [0.5, 0.5]  # equal up to float noise
    for bad in ([], [1.0, 0.0], [1.0, float("nan")], [-1.0, 2.0]):
        with pytest.raises(ValueError):
            speed.speed_significance(bad)


# ---- predicted vs measured ----


# Bound on |predicted / measured - 1| for a 50-step training run of the small CNN at a
# batch size between two measured ones (8, between 4 and 16, where QAT costs ~2.5x PTQ on
# this CPU: the strategies are far apart). Sources of honest error: the affine reading
# between measured batches (a few %), the shuffling and batch gathering the profiled
# step leaves out (a few %), and load that changes between profile and run. On this
# 2-core machine single attempts were within 10% when it was quiet, and ranged from
# -28% to +55% while other jobs kept its load at 3-4; hence up to three attempts.
# What must fail every attempt: a gross mistake in Eq. 1 (a dropped factor of B or E
# is off by 8x or more), or the wrong strategy's step: the PTQ profile used for a QAT
# client is off by -37% to -75% on its own, and its predicted QAT/PTQ ratio (1.0) is far
# from the measured one (~2.5), which RATIO_BOUND checks; the runs of the two
# strategies alternate, so their ratio is robust to load that shifts both.
VALIDATION_BOUND = 0.35
RATIO_BOUND = 0.30


def test_prediction_matches_a_real_training_run():
    sizes = {"bandwidth_bytes": 1 << 20, "matmul_n": 64, "matmul_low_precision_n": 16, "quant_elements": 1 << 16}
    attempts = []
    for _ in range(3):
        doc = run.run_profile(models=["small_cnn@8x8x1"], batches=[4, 16, 64], repeats=15, micro_sizes=sizes)
        rows = {
            r["strategy"]: r
            for r in speed.validate_against_training(doc, "small_cnn@8x8x1", batch=8, samples=400, epochs=1, runs=3)
        }
        assert set(rows) == {"ptq", "qat"}
        errors = {s: r["error"] for s, r in rows.items()}
        predicted_ratio = rows["qat"]["predicted_s"] / rows["ptq"]["predicted_s"]
        measured_ratio = rows["qat"]["measured_s"] / rows["ptq"]["measured_s"]
        ratio_error = predicted_ratio / measured_ratio - 1
        print(
            "predicted vs measured:",
            {s: f"{e:+.1%}" for s, e in errors.items()},
            f"QAT/PTQ {predicted_ratio:.2f} vs {measured_ratio:.2f}",
        )
        attempts.append((errors, ratio_error))
        if all(abs(e) <= VALIDATION_BOUND for e in errors.values()) and abs(ratio_error) <= RATIO_BOUND:
            break
    errors, ratio_error = attempts[-1]
    assert all(abs(e) <= VALIDATION_BOUND for e in errors.values()), attempts
    assert abs(ratio_error) <= RATIO_BOUND, attempts
    assert json.dumps(list(rows.values()))  # plain numbers, ready for a report
