"""One QAT training step against the FP32 step and against torch.ao's eager QAT.

    python bench/bench_qat_step.py [--device cpu|cuda] [--model resnet18] [--batch 32]
                                   [--repeats R] [--threads T] [--json PATH]

The ratio QAT/FP32 of a training step is the number FedHQ's speed model lives on
(a QAT client's cost). A step is zero_grad, forward, cross-entropy, backward and an
SGD(momentum 0.9) update, on rotating random batches. The three variants are timed
round-robin (fedhq_kernels.profile.timing.measure_interleaved), so load that comes and
goes on a shared machine hits all three alike and their ratios hold:

- fp32: the plain model (a PTQ client's step);
- fedhq-qat: ``fedhq.quant.prepare_qat`` (weights per channel and input activations per
  tensor through fedhq_kernels.fake_quant);
- torch.ao-qat: ``torch.ao.quantization.prepare_qat`` with the default 'x86' QAT qconfig
  (fused observer + fake-quant on weights per channel and on every module's output).
  No QuantStub and no Conv-BN fusion: the model is prepared as it is, which is how a
  QAT client would use it without rewriting the model; fusion would change the FP32
  model being compared against.

Goal (issue 3): fedhq-qat at most 1.3x the FP32 step (ResNet-18, CIFAR stem, batch 32).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch
from torch.ao.quantization import get_default_qat_qconfig, prepare_qat

import fedhq_kernels as fk
from fedhq.models import ModelSpec, count_parameters
from fedhq.quant import prepare_qat as fedhq_prepare_qat
from fedhq_kernels.profile.steps import make_step
from fedhq_kernels.profile.timing import measure_interleaved, randn_nonzero

GOAL_RATIO = 1.3
ROTATING_BATCHES = 4


def torch_ao_qat(model: torch.nn.Module) -> torch.nn.Module:
    model.train()
    model.qconfig = get_default_qat_qconfig("x86")
    return prepare_qat(model, inplace=True)


VARIANTS = {"fp32": lambda m: m, "fedhq-qat": lambda m: fedhq_prepare_qat(m, inplace=True), "torch.ao-qat": torch_ao_qat}


def run(args) -> list[dict]:
    device = torch.device(args.device)
    spec = ModelSpec.parse(args.model)
    steps = {}
    for name, prepare in VARIANTS.items():
        torch.manual_seed(0)
        model = prepare(spec.build().to(device).train()).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        steps[name] = make_step(model, optimizer)
    gen = torch.Generator().manual_seed(1)
    batches = [
        (randn_nonzero((args.batch, *spec.input_shape), generator=gen).to(device),
         torch.randint(0, spec.num_classes, (args.batch,), generator=gen).to(device))
        for _ in range(ROTATING_BATCHES)
    ]  # fmt: skip
    timings = measure_interleaved(steps, device=device, repeats=args.repeats, warmup=args.warmup, inputs=batches)
    fp32 = timings["fp32"].median_s
    context = {
        "model": spec.key, "params": count_parameters(spec.build()), "batch": args.batch, "device": device.type,
        "machine": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "fedhq_backends": fk.backends(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip
    rows = []
    for name, t in timings.items():
        row = {"variant": name, "median_ms": t.median_s * 1e3, "p10_ms": t.p10_s * 1e3, "p90_ms": t.p90_s * 1e3,
               "repeats": t.repeats, "ratio_to_fp32": t.median_s / fp32, **context}  # fmt: skip
        if name == "fedhq-qat":
            row["goal"] = f"<= {GOAL_RATIO}x fp32"
            row["goal_met"] = row["ratio_to_fp32"] <= GOAL_RATIO
            row["speedup_vs_torch_ao"] = timings["torch.ao-qat"].median_s / t.median_s
        rows.append(row)
    return rows


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "cpu")
    except OSError:
        return "cpu"


def print_table(rows: list[dict]) -> None:
    r = rows[0]
    print(f"\nOne training step of {r['model']} ({r['params'] / 1e6:.2f}M params), batch {r['batch']}, "
          f"on {r['machine']} ({r['device']}, {r['threads']} threads), torch {r['torch']}")  # fmt: skip
    print("| variant | median ms | p10-p90 ms | / fp32 |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['variant']} | {r['median_ms']:.2f} | {r['p10_ms']:.2f}-{r['p90_ms']:.2f} | {r['ratio_to_fp32']:.2f}x |")
    ours = next(r for r in rows if r["variant"] == "fedhq-qat")
    print(f"\nGoal: fedhq-qat {ours['goal']}: {ours['ratio_to_fp32']:.2f}x -> {'MET' if ours['goal_met'] else 'NOT MET'}; "
          f"{ours['speedup_vs_torch_ao']:.2f}x faster than torch.ao's QAT step")  # fmt: skip


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", default="resnet18@32x32x3:10", help="model spec, e.g. small_cnn@8x8x1:10")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
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
