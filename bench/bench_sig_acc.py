"""Does Sig_acc predict what PTQ costs a client? One rank correlation per statistic.

    python bench/bench_sig_acc.py [--datasets digits,fashion-mnist] [--seeds 5]
        [--clients 10] [--alpha 0.5] [--epochs 2] [--repeats 3] [--bits 4]
        [--warmup-epochs 0] [--json out.json] [--quick]

Per seed and statistic: Spearman's rho between Sig_acc and acc(QAT) - acc(PTQ) over
the clients of a Dirichlet partition (the rule needs rho < 0). The protocol and the
results, with the default they chose: docs/accuracy-significance.md.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from datetime import datetime, timezone

import numpy as np
import torch
from scipy import stats

import fedhq_kernels as fk
from fedhq.analysis.accuracy import DEFAULT_A, DEFAULT_STATISTIC, STATISTICS, client_significance
from fedhq.data import load_dataset, partition
from fedhq.data.base import stratified_test_indices
from fedhq.data.registry import DATASETS, dataset_key
from fedhq.fl import seeds as streams  # "seeds" names the seed lists below
from fedhq.fl.client import RoundPlan, evaluate, train_local
from fedhq.fl.summary import mean_ci
from fedhq.models import ModelSpec
from fedhq.quant import calibration_split, evaluate_deployed

SIZE = "client size"  # the control row: V alone
PER_CLASS = 20  # samples per class of the balanced client in two_class_check
# deployed: INT-bits weights and activations (fedhq.quant.deploy, the main measure);
# weights: the dequantized upload with float activations
METRICS = ("deployed", "weights")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default="digits,fashion-mnist", help="comma-separated dataset names")
    p.add_argument("--data-root", default=None, help="directory of a file-based dataset (default: its loader's)")
    p.add_argument("--max-train", type=int, default=5000, help="seeded stratified subset of a file-based training set")
    p.add_argument("--max-test", type=int, default=1000, help="seeded stratified subset of the test set")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration of the label skew")
    p.add_argument("--epochs", type=int, default=2, help="local epochs from the common start")
    p.add_argument(
        "--warmup-epochs",
        type=int,
        default=0,
        help="float epochs on the whole training set before the common start (0: the initial model)",
    )
    p.add_argument(
        "--repeats", type=int, default=3, help="trainings per client and strategy (shuffling seeds), averaged"
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    # INT4: at INT8 what PTQ's rounding costs is below the training's noise (docs/accuracy-significance.md)
    p.add_argument("--bits", type=int, default=4, help="bits of the upload and of QAT's fake quantization (default 4)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="write every client's row and the summary here")
    p.add_argument("--quick", action="store_true", help="smoke test: digits, 2 seeds, 4 clients, 1 epoch")
    args = p.parse_args(argv)
    if args.quick:
        args.datasets, args.seeds, args.clients, args.epochs, args.repeats = "digits", 2, 4, 1, 1
    if args.seeds < 2:
        p.error("--seeds must be >= 2: the confidence interval needs two seeds")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.clients < 3:
        p.error("--clients must be >= 3: a rank correlation needs three clients")
    return args


def load(name: str, args, seed: int):
    """The dataset, its training set cut to --max-train if it is read from files (the
    bundled ones are small), and a stratified --max-test of its test set."""
    key = dataset_key(name)
    options = {"seed": seed}
    if key is not None and hasattr(DATASETS[key], "LAYOUT"):
        options["max_train"] = args.max_train
    data = load_dataset(name, args.data_root, **options)
    labels = data.test.y.numpy()
    keep = stratified_test_indices(labels, min(args.max_test, labels.size), np.random.default_rng(seed))
    test = data.test.subset(keep)
    return data, test


def client_rows(name: str, seed: int, args) -> list[dict]:
    """Every client of one seed: size, Sig_acc per statistic, accuracy after PTQ and QAT."""
    data, test = load(name, args, seed)

    def plan(round_: int, strategy: str, epochs: int) -> RoundPlan:
        return RoundPlan(
            round=round_,
            strategy=strategy,
            epochs=epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            momentum=args.momentum,
            bits=args.bits,
            seed=seed,
        )

    c, h, w = data.input_shape
    spec = ModelSpec.parse(f"small_cnn@{h}x{w}x{c}:{data.num_classes}")
    parts = partition("dirichlet", data.train.y.numpy(), args.clients, seed, alpha=args.alpha)
    torch.manual_seed(seed)
    start = spec.build().state_dict()
    if args.warmup_epochs:  # a global model partway through training, instead of round 1's
        start = train_local(spec, start, data.train, plan(0, "fp32", args.warmup_epochs), client=-1)[0].state
    calibration_x = calibration_split(data.train, streams.generator(seed, "calibration"))  # the same for every upload
    rows = []
    for cid, indices in enumerate(parts):
        local = data.train.subset(indices)
        x, y = local.x.numpy(), local.y.numpy()
        row = {
            "dataset": name,
            "seed": seed,
            "client": cid,
            "samples": len(local),
            "classes": int(np.unique(y).size),
            "sig": {},
        }
        for stat in STATISTICS:
            row["sig"][stat] = client_significance(x, y, statistic=stat)
        runs = {(m, st): [] for m in METRICS for st in ("ptq", "qat")}
        for strategy in ("ptq", "qat"):
            for repeat in range(args.repeats):  # PTQ and QAT see the same shuffling in each repeat
                update, _ = train_local(spec, start, local, plan(1 + repeat, strategy, args.epochs), cid)
                runs["weights", strategy].append(evaluate(spec, fk.dequantize_state_dict(update.state), test)[0])
                deployed = evaluate_deployed(spec.build(), update.state, calibration_x, test, bits=args.bits)
                runs["deployed", strategy].append(deployed[0])
        row["acc"] = {m: {st: float(np.mean(runs[m, st])) for st in ("ptq", "qat")} for m in METRICS}
        row["ptq_loss"] = {m: row["acc"][m]["qat"] - row["acc"][m]["ptq"] for m in METRICS}
        row["ptq_loss_runs"] = {m: [q - p for p, q in zip(runs[m, "ptq"], runs[m, "qat"])] for m in METRICS}
        rows.append(row)
    return rows


def two_class_check(name: str, args, per_class: int = PER_CLASS) -> list[dict]:
    """Requirement 2 on real images: Sig_acc of a balanced client (per_class samples of
    every class) against the highest-scoring client of the same size holding two classes."""
    data, _ = load(name, args, 0)
    x, y = data.train.x.numpy(), data.train.y.numpy()
    rng = np.random.default_rng(0)
    k = data.num_classes
    pools = [np.flatnonzero(y == c) for c in range(k)]
    balanced = np.concatenate([rng.choice(p, per_class, replace=False) for p in pools])
    half = per_class * k // 2

    def draw(c: int) -> np.ndarray:
        return rng.choice(pools[c], half, replace=False)

    pairs = [(a, b, np.concatenate([draw(a), draw(b)])) for a in range(k) for b in range(a + 1, k)]
    rows = []
    for stat in STATISTICS:
        ref = client_significance(x[balanced], y[balanced], statistic=stat)
        scores = [(client_significance(x[i], y[i], statistic=stat), a, b) for a, b, i in pairs]
        top, a, b = max(scores)
        above = sum(sc > ref for sc, _, _ in scores)
        rows.append(
            {
                "statistic": stat,
                "balanced": ref,
                "top_two_class": top,
                "top_classes": [int(a), int(b)],
                "pairs_above": above,
                "pairs": len(pairs),
            }
        )
    return rows


def spearman(x, y) -> float:
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")  # no ranking to correlate
    return float(stats.spearmanr(x, y).statistic)


def _finite(values) -> list[float]:
    """The values a mean is taken over: a seed without a ranking (nan) is left out."""
    return [x for x in values if math.isfinite(x)]


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value


def summarize(rows: list[dict], seeds: list[int], metric: str) -> list[dict]:
    summary = []
    by_seed = [[r for r in rows if r["seed"] == s] for s in seeds]
    losses = [[r["ptq_loss"][metric] for r in seed_rows] for seed_rows in by_seed]
    for stat in [*STATISTICS, SIZE]:
        rhos, spread_rhos = [], []
        for seed_rows, loss in zip(by_seed, losses):
            sig = [r["samples"] if stat == SIZE else r["sig"][stat] for r in seed_rows]
            rhos.append(spearman(sig, loss))
            if stat != SIZE:  # Eq. 3 without its V^(1-a) factor: what the statistic adds to the client's size
                size_free = [g / r["samples"] ** (1 - DEFAULT_A) for g, r in zip(sig, seed_rows)]
                spread_rhos.append(spearman(size_free, loss))
        rho, spread = mean_ci(_finite(rhos)), mean_ci(_finite(spread_rhos))
        mean, half, n = _nan(rho["mean"]), _nan(rho["half_width"]), rho["n"]
        spread_mean, spread_half = _nan(spread["mean"]), _nan(spread["half_width"])
        summary.append(
            {
                "statistic": stat,
                "rho_mean": mean,
                "rho_ci95": half,
                "seeds_used": n,
                "rho_per_seed": rhos,
                "ci_below_zero": bool(math.isfinite(half) and mean + half < 0),
                "size_free_rho_mean": spread_mean,
                "size_free_rho_ci95": spread_half,
            }
        )
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = list(range(args.seeds))
    out = {
        "args": vars(args),
        "machine": platform.node(),
        "torch": torch.__version__,
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "datasets": {},
    }
    print(f"# python {' '.join(sys.argv)}")
    for name in [d.strip() for d in args.datasets.split(",") if d.strip()]:
        started = time.perf_counter()
        rows = [r for s in seeds for r in client_rows(name, s, args)]
        print(
            f"\n## {name}: {args.seeds} seeds x {args.clients} clients, Dirichlet {args.alpha}, "
            f"{args.epochs} epochs, "
            f"INT{args.bits} ({time.perf_counter() - started:.0f} s)"
        )
        out["datasets"][name] = {"clients": rows, "summary": {}, "ptq_loss": {}}
        for metric in METRICS:
            summary = out["datasets"][name]["summary"][metric] = summarize(rows, seeds, metric)
            loss = [r["ptq_loss"][metric] for r in rows]
            loss_ci = mean_ci(_finite(loss))
            loss_mean, loss_half = _nan(loss_ci["mean"]), _nan(loss_ci["half_width"])
            out["datasets"][name]["ptq_loss"][metric] = {"mean": loss_mean, "ci95": loss_half}
            print(f"\n### {metric} accuracy\n")
            print(
                f"PTQ loss acc(QAT) - acc(PTQ) over clients: mean {100 * loss_mean:+.2f} +/- "
                f"{100 * loss_half:.2f} pp, range {100 * min(loss):+.2f} .. {100 * max(loss):+.2f} pp, "
                f"sd {100 * np.std(loss, ddof=1):.2f} pp"
            )
            if args.repeats > 1:  # how much of that spread is the training's own noise
                within = math.sqrt(np.mean([np.var(r["ptq_loss_runs"][metric], ddof=1) for r in rows]) / args.repeats)
                print(
                    f"noise of one client's loss (sd over its {args.repeats} repeats / sqrt({args.repeats})): "
                    f"{100 * within:.2f} pp"
                )
            print(
                "\n| statistic | rho(Sig_acc, PTQ loss): mean +/- 95% CI | per seed | CI below 0 | "
                "rho(Sig_acc / V^(1-a), PTQ loss) |"
            )
            print("| --- | --- | --- | --- | --- |")
            for s in summary:
                label = s["statistic"] + (" (default)" if s["statistic"] == DEFAULT_STATISTIC else "")
                per_seed = " ".join(f"{r:+.2f}" for r in s["rho_per_seed"])
                size_free = f"{s['size_free_rho_mean']:+.3f} +/- {s['size_free_rho_ci95']:.3f}"
                size_free = "" if s["statistic"] == SIZE else size_free
                print(
                    f"| {label} | {s['rho_mean']:+.3f} +/- {s['rho_ci95']:.3f} (n={s['seeds_used']}) | {per_seed} | "
                    f"{'yes' if s['ci_below_zero'] else 'no'} | {size_free} |"
                )
        check = two_class_check(name, args)
        print(
            f"\nRequirement 2 on {name}'s images: a balanced client ({PER_CLASS} per class) against the "
            "two-class clients of its size"
        )
        print("\n| statistic | balanced | highest two-class (classes) | two-class clients above balanced |")
        print("| --- | --- | --- | --- |")
        for c in check:
            print(
                f"| {c['statistic']} | {c['balanced']:.2f} | {c['top_two_class']:.2f} {tuple(c['top_classes'])} | "
                f"{c['pairs_above']} of {c['pairs']} |"
            )
        out["datasets"][name]["two_class_check"] = check
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
