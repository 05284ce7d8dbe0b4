"""One QAT training step against the FP32 step and against torch.ao's eager QAT.

    python bench/bench_qat_step.py [--device cpu|cuda] [--model resnet18] [--batch 8]
                                   [--repeats R] [--warmup W] [--threads T] [--json PATH]

Variants fp32 (a PTQ client's step), fedhq-qat (``fedhq.quant.prepare_qat``) and
torch.ao-qat, timed round-robin; the QAT/FP32 ratio is reported of the medians and
paired per round, in steady state: the W warm-up steps of each variant are timed apart.
What a step is, why the paired ratio, how the torch.ao model is prepared, and the
goal: docs/profile.md, "The QAT step benchmark".
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.ao.quantization import get_default_qat_qconfig, prepare_qat

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages
import fedhq_kernels as fk  # noqa: E402
from fedhq.models import ModelSpec, count_parameters  # noqa: E402
from fedhq.profile.steps import make_step  # noqa: E402
from fedhq.profile.timing import Timing, measure_interleaved, randn_nonzero, synchronize  # noqa: E402
from fedhq.quant import prepare_qat as fedhq_prepare_qat  # noqa: E402

# QAT step / FP32 step, paired: issue 17's on the CPU (batch 8, 2 threads), 1.3 on a GPU
GOAL_RATIO = {"cpu": 1.2, "cuda": 1.3}
ROTATING_BATCHES = 4

# torch.ao's deprecation notices (eager QAT is the baseline on purpose) are noise here.
warnings.filterwarnings("ignore", message=r"(?s).*torch\.ao\.quantization is deprecated")
warnings.filterwarnings("ignore", message=r"(?s).*reduce_range will be deprecated")


def torch_ao_qat(model: torch.nn.Module) -> torch.nn.Module:
    model.train()
    model.qconfig = get_default_qat_qconfig("x86")
    return prepare_qat(model, inplace=True)


VARIANTS = {
    "fp32": lambda m: m,
    "fedhq-qat": lambda m: fedhq_prepare_qat(m, inplace=True),
    "torch.ao-qat": torch_ao_qat,
}


def warm_up(steps: dict, batches: list, device: torch.device, warmup: int) -> dict[str, list[float]]:
    """Seconds of each of the first ``warmup`` steps of every variant, one variant
    after the other (first steps pay for allocator growth, page faults, caches)."""
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for name, step in steps.items():
        for k in range(warmup):
            start = time.perf_counter()
            step(batches[k % len(batches)])
            synchronize(device)
            seconds[name].append(time.perf_counter() - start)
    return seconds


def timed_rounds(steps: dict, batches: list, device: torch.device, repeats: int) -> dict[str, list[float]]:
    """Seconds per step of every variant, ``repeats`` rounds of one step each
    (measure_interleaved with one repeat per round, after warm_up).
    Each round starts with a different variant and shifts the rotating batches, so no
    variant always follows the same one or gets the same batch; and sample r of every
    variant comes from the same moment, so sample-by-sample ratios (the paired ratio)
    cancel load that drifts over the run."""
    names = list(steps)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        k = r % len(batches)
        timings = measure_interleaved(
            {name: steps[name] for name in order}, device=device, repeats=1, warmup=0, inputs=batches[k:] + batches[:k]
        )
        for name, timing in timings.items():
            samples[name].append(timing.median_s)
    return samples


def run(args) -> list[dict]:
    device = torch.device(args.device)
    spec = ModelSpec.parse(args.model)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    steps = {}
    for name, prepare in VARIANTS.items():
        torch.manual_seed(0)
        model = prepare(spec.build().to(device).train()).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        steps[name] = make_step(model, optimizer)
    gen = torch.Generator().manual_seed(1)
    batches = [
        (
            randn_nonzero((args.batch, *spec.input_shape), generator=gen).to(device),
            torch.randint(0, spec.num_classes, (args.batch,), generator=gen).to(device),
        )
        for _ in range(ROTATING_BATCHES)
    ]
    load_before = _load_average()
    first = warm_up(steps, batches, device, args.warmup)
    samples = timed_rounds(steps, batches, device, args.repeats)
    timings = {name: Timing.from_samples(s) for name, s in samples.items()}
    fp32 = timings["fp32"].median_s
    context = {
        "model": spec.key,
        "params": count_parameters(spec.build()),
        "batch": args.batch,
        "device": device.type,
        "machine": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "fedhq_backends": fk.backends(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_1m": [load_before, _load_average()] if device.type == "cpu" else None,
        "cudnn_benchmark": torch.backends.cudnn.benchmark if device.type == "cuda" else None,
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}
        if device.type == "cuda"
        else None,
    }
    rows = []
    for name, t in timings.items():
        paired = Timing.from_samples([a / b for a, b in zip(samples[name], samples["fp32"])])
        row = {
            "variant": name,
            "median_ms": t.median_s * 1e3,
            "p10_ms": t.p10_s * 1e3,
            "p90_ms": t.p90_s * 1e3,
            "repeats": t.repeats,
            "ratio_to_fp32": t.median_s / fp32,
            "paired_ratio_median": paired.median_s,
            "paired_ratio_p10": paired.p10_s,
            "paired_ratio_p90": paired.p90_s,
            "warmup_steps": len(first[name]),
            "first_step_ms": first[name][0] * 1e3 if first[name] else None,
            "warmup_median_ms": statistics.median(first[name]) * 1e3 if first[name] else None,
            **context,
        }
        if name == "fedhq-qat":
            goal = GOAL_RATIO[device.type]
            row["goal"] = f"<= {goal}x fp32"
            row["goal_figure"] = "paired_ratio_median"
            row["goal_met"] = row["paired_ratio_median"] <= goal
            row["speedup_vs_torch_ao"] = timings["torch.ao-qat"].median_s / t.median_s
        rows.append(row)
    return rows


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "cpu")
    except OSError:
        return "cpu"


def print_table(rows: list[dict]) -> None:
    r = rows[0]
    print(
        f"\nOne training step of {r['model']} ({r['params'] / 1e6:.2f}M params), batch {r['batch']}, "
        f"on {r['machine']} ({r['device']}, {r['threads']} threads), torch {r['torch']}"
    )
    print(
        "| variant | median ms | p10-p90 ms | / fp32 (medians) | / fp32 paired: median [p10-p90] | "
        f"warm-up ({r['warmup_steps']} steps): first / median ms |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        warm = f"{r['first_step_ms']:.2f} / {r['warmup_median_ms']:.2f}" if r["warmup_steps"] else ""
        print(
            f"| {r['variant']} | {r['median_ms']:.2f} | {r['p10_ms']:.2f}-{r['p90_ms']:.2f} | "
            f"{r['ratio_to_fp32']:.2f}x | {r['paired_ratio_median']:.2f}x "
            f"[{r['paired_ratio_p10']:.2f}-{r['paired_ratio_p90']:.2f}] | {warm} |"
        )
    ours = next(r for r in rows if r["variant"] == "fedhq-qat")
    load = rows[0]["load_average_1m"]
    if load and None not in load and max(load) > (os.cpu_count() or 1) + 0.5:  # more runnable threads than cores
        print(
            f"\nThe machine was busy (1-minute load average {load[0]:.1f} before, {load[1]:.1f} after, on "
            f"{os.cpu_count()} cores): trust the paired ratios, not the medians"
        )
    print(
        f"\nGoal: fedhq-qat {ours['goal']} (paired ratio): {ours['paired_ratio_median']:.2f}x -> "
        f"{'MET' if ours['goal_met'] else 'NOT MET'}; "
        f"{ours['speedup_vs_torch_ao']:.2f}x faster than torch.ao's QAT step"
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", default="resnet18@32x32x3:10", help="model spec, e.g. small_cnn@8x8x1:10")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3, help="steps per variant before the timed rounds, timed apart")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    parser.add_argument("--json", type=Path, help="default bench/results/qat-step-<device>.json")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU here (a CPU build of torch, or no driver)")
    if min(args.batch, args.repeats, args.threads) < 1 or args.warmup < 0:
        parser.error("--batch, --repeats and --threads must be >= 1, --warmup >= 0")
    try:
        ModelSpec.parse(args.model)
    except ValueError as error:
        parser.error(str(error))
    args.json = args.json or Path(__file__).resolve().parent / "results" / f"qat-step-{args.device}.json"
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows = run(args)
    print_table(rows)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"\nwrote {len(rows)} rows to {args.json} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
