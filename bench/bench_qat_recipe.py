"""PTQ against QAT for one client trained centrally: accuracy with float activations and
as deployed (INT``bits`` weights and activations), over several seeds.

    python bench/bench_qat_recipe.py [--datasets digits,fashion-mnist] [--bits 8,4]
                                     [--seeds 5] [--lr 0.01] [--quick] [--json PATH]

One client holding the whole training split trains with the FL client's own
``train_local`` in float (PTQ, then ``quantize_upload``) and with QAT per width; means
carry a 95% Student-t interval, QAT - PTQ is paired by seed. The goal, the learning
rate and the results: docs/method.md §1.2 and docs/fl.md, "The QAT recipe".
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fedhq_kernels as fk  # noqa: E402
from fedhq.data import DatasetNotFoundError, load_dataset  # noqa: E402
from fedhq.data.base import stratified_test_indices  # noqa: E402
from fedhq.fl import seeds  # noqa: E402
from fedhq.fl.client import RoundPlan, evaluate, quantize_upload, quantized_names, train_local  # noqa: E402
from fedhq.fl.summary import mean_ci, paired_differences  # noqa: E402
from fedhq.models import ModelSpec  # noqa: E402
from fedhq.quant import QATConfig, calibration_split, evaluate_deployed, float_state_dict  # noqa: E402

# epochs and training-set size per dataset: the colleague's digits setting (30 epochs),
# and a Fashion-MNIST subset that one CPU thread trains in about a minute per model.
SETTINGS = {"digits": {"epochs": 30, "max_train": None}, "fashion-mnist": {"epochs": 8, "max_train": 6000}}
QUICK = {"epochs": 1, "max_train": 300}
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "qat_recipe.json"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default=None, help="comma-separated (default digits,fashion-mnist; --quick: digits)")
    p.add_argument("--bits", default="8,4", help="comma-separated widths")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 5; --quick: 2)")
    p.add_argument("--epochs", type=int, default=None, help="override every dataset's epochs")
    p.add_argument("--max-train", type=int, default=None, help="override every dataset's training-set size")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="a smoke test: 1 epoch on 300 digits, 2 seeds")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"rows are written here (default {DEFAULT_JSON})")
    args = p.parse_args(argv)
    args.datasets = (args.datasets or ("digits" if args.quick else "digits,fashion-mnist")).split(",")
    args.bits = [int(b) for b in args.bits.split(",")]
    args.seeds = args.seeds if args.seeds is not None else (2 if args.quick else 5)
    for name in args.datasets:
        if name not in SETTINGS:
            p.error(f"unknown dataset {name!r}; choose from {', '.join(SETTINGS)}")
    if args.seeds < 1 or not args.bits or any(not 2 <= b <= 8 for b in args.bits):
        p.error("--seeds must be >= 1 and --bits ints in [2, 8]")
    return args


def setting(args, dataset: str) -> dict:
    base = dict(QUICK if args.quick else SETTINGS[dataset])
    if args.epochs is not None:
        base["epochs"] = args.epochs
    if args.max_train is not None:
        base["max_train"] = args.max_train
    return base


def scores(spec: ModelSpec, upload: dict, x_cal, test, bits: int) -> tuple[float, float]:
    """(accuracy with float activations, deployed accuracy) of an upload."""
    accuracy, _ = evaluate(spec, fk.dequantize_state_dict(upload), test)
    deployed, _ = evaluate_deployed(spec.build(), upload, x_cal, test, bits=bits)
    return accuracy, deployed


def run_seed(args, dataset_name: str, seed: int, common: dict) -> list[dict]:
    cfg = setting(args, dataset_name)
    dataset = load_dataset(dataset_name, seed=seed)
    train = dataset.train
    if cfg["max_train"] and cfg["max_train"] < len(train):  # a seeded, stratified subset
        rng = np.random.default_rng([seed, 0x5EED])
        train = train.subset(stratified_test_indices(train.y.numpy(), cfg["max_train"], rng))
    c, h, _ = dataset.input_shape
    spec = ModelSpec("small_cnn", image_size=h, in_channels=c, num_classes=dataset.num_classes)
    x_cal = calibration_split(train, seeds.generator(seed, "calibration"))
    torch.manual_seed(seed)
    initial = float_state_dict(spec.build())
    names = quantized_names(spec.build())

    def fit(strategy: str, bits: int):
        plan = RoundPlan(
            round=1,
            strategy=strategy,
            epochs=cfg["epochs"],
            batch_size=args.batch_size,
            lr=args.lr,
            momentum=args.momentum,
            bits=bits,
            seed=seed,
        )
        started = time.perf_counter()
        update, _ = train_local(spec, initial, train, plan, client=0)
        return update.state, time.perf_counter() - started

    base = common | {
        "dataset": dataset_name,
        "model": spec.key,
        "seed": seed,
        "epochs": cfg["epochs"],
        "train_samples": len(train),
        "test_samples": len(dataset.test),
    }

    def row(strategy: str, bits: int | None, measure) -> dict:
        try:
            accuracy, deployed, seconds = measure()
        except ValueError as error:  # training diverged: NaN / Inf weights or activations
            return base | {
                "strategy": strategy,
                "bits": bits,
                "accuracy": None,
                "deployed_accuracy": None,
                "train_s": None,
                "error": str(error),
            }
        return base | {
            "strategy": strategy,
            "bits": bits,
            "accuracy": accuracy,
            "deployed_accuracy": deployed,
            "train_s": seconds,
        }

    trained = {}

    def float_model():
        trained["weights"], trained["seconds"] = fit("fp32", 8)
        accuracy, _ = evaluate(spec, trained["weights"], dataset.test)
        return accuracy, accuracy, trained["seconds"]

    def ptq(bits: int):  # what a PTQ client uploads after the same float training
        if "weights" not in trained:
            raise ValueError("the float training failed")
        upload = quantize_upload(trained["weights"], names, bits)
        return *scores(spec, upload, x_cal, dataset.test, bits), trained["seconds"]

    def qat(bits: int):
        upload, seconds = fit("qat", bits)
        return *scores(spec, upload, x_cal, dataset.test, bits), seconds

    rows = [row("fp32", None, float_model)]
    for bits in args.bits:
        rows += [row("ptq", bits, lambda b=bits: ptq(b)), row("qat", bits, lambda b=bits: qat(b))]
    return rows


def summarize(rows: list[dict]) -> tuple[list[dict], list[str]]:
    """Per dataset and width: mean and CI of each strategy, the paired QAT - PTQ
    difference of deployed accuracy, and the goal's verdicts (rows, printed lines)."""
    out, lines = [], []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        fp32 = [r for r in rows if r["dataset"] == dataset and r["strategy"] == "fp32"]
        m, ci = _mean_half(mean_ci(_percent(fp32, "accuracy")))
        lines.append(
            f"{dataset} ({fp32[0]['epochs']} epochs, {fp32[0]['train_samples']} train, n={len(fp32)} seeds): "
            f"float model {m:.2f} +- {ci:.2f}%{_diverged(fp32)}"
        )
        for bits in dict.fromkeys(r["bits"] for r in rows if r["bits"] is not None):
            by = {
                s: sorted(
                    (r for r in rows if r["dataset"] == dataset and r["bits"] == bits and r["strategy"] == s),
                    key=lambda r: r["seed"],
                )
                for s in ("ptq", "qat")
            }
            row = {"bench": "qat_recipe", "summary": True, "dataset": dataset, "bits": bits, "n": len(by["qat"])}
            for s, runs in by.items():
                for key in ("accuracy", "deployed_accuracy"):
                    row[f"{s}_{key}"], row[f"{s}_{key}_ci95"] = _mean_half(mean_ci(_percent(runs, key)))
                row[f"{s}_diverged"] = sum(r["deployed_accuracy"] is None for r in runs)
                lines.append(
                    f"  {bits}-bit {s.upper()}: float activations {row[f'{s}_accuracy']:6.2f} +- "
                    f"{row[f'{s}_accuracy_ci95']:.2f}%   deployed {row[f'{s}_deployed_accuracy']:6.2f} +- "
                    f"{row[f'{s}_deployed_accuracy_ci95']:.2f}%{_diverged(runs)}"
                )
            deployed = {
                s: [None if r["deployed_accuracy"] is None else 100 * r["deployed_accuracy"] for r in runs]
                for s, runs in by.items()
            }
            paired = paired_differences(deployed["qat"], deployed["ptq"])  # both sorted by seed
            row["qat_minus_ptq"], row["qat_minus_ptq_ci95"] = _mean_half(paired)
            row["goal_at_least_ptq"] = bool(row["qat_minus_ptq"] >= 0)  # nan (nothing paired): not met
            verdict = f"QAT >= PTQ -> {'MET' if row['goal_at_least_ptq'] else 'NOT MET'}"
            if dataset == "fashion-mnist" and bits == 4:
                low = row["qat_minus_ptq"] - row["qat_minus_ptq_ci95"]
                row["goal_clearly_above"] = bool(low > 0)  # nan (one seed) is not evidence
                verdict += f"; clearly above (interval > 0) -> {'MET' if row['goal_clearly_above'] else 'NOT MET'}"
            lines.append(
                f"  {bits}-bit QAT - PTQ deployed (paired): {row['qat_minus_ptq']:+.2f} +- "
                f"{row['qat_minus_ptq_ci95']:.2f} pts: {verdict}"
            )
            out.append(row)
    return out, lines


def _mean_half(ci: dict) -> tuple[float, float]:
    """(mean, half-width) of a fedhq.fl.summary.mean_ci result, nan where it has none."""
    return tuple(float("nan") if ci[k] is None else ci[k] for k in ("mean", "half_width"))


def _percent(runs: list[dict], key: str) -> list[float]:
    return [100 * r[key] for r in runs if r[key] is not None]


def _diverged(runs: list[dict]) -> str:
    failed = sum(r["deployed_accuracy"] is None for r in runs)
    return f" ({failed} of {len(runs)} diverged, left out)" if failed else ""


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    qat = QATConfig()
    common = {
        "bench": "qat_recipe",
        "lr": args.lr,
        "momentum": args.momentum,
        "batch_size": args.batch_size,
        "observer": qat.observer,
        "averaging_constant": qat.averaging_constant,
        "threads": args.threads,
        "machine": platform.node(),
        "torch": torch.__version__,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    print(
        f"QAT recipe: observer {qat.observer}, averaging constant {qat.averaging_constant}; "
        f"lr {args.lr}, momentum {args.momentum}, batch {args.batch_size}, seeds 0..{args.seeds - 1}",
        flush=True,
    )
    rows = []
    for dataset in args.datasets:
        for seed in range(args.seeds):
            try:
                new = run_seed(args, dataset, seed, common)
            except DatasetNotFoundError as error:
                print(f"{dataset}: skipped, {error}")
                break
            rows.extend(new)
            done = ", ".join(
                f"{r['strategy']}{r['bits'] or ''} "
                + (f"{100 * r['deployed_accuracy']:.1f}%" if r["deployed_accuracy"] is not None else "diverged")
                for r in new
            )
            print(f"  {dataset} seed {seed}: deployed {done}", flush=True)
    summary, lines = summarize(rows) if rows else ([], ["nothing ran"])
    print("\n".join(lines))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows + summary, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
