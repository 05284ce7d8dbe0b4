"""The attack suite (fedhq.fl.attacks): client 0 of 10 attacks, every aggregation.

    python bench/bench_attacks.py [--rounds 15] [--seeds 0 1 2] [--out bench/results/attacks.json]

For each aggregation a clean run per seed, then one run per attack and seed on the
embedded engine: rounds completed, rounds the attacker was rejected in and why, whether
every honest client's update was used in every round, and the final deployed accuracy
against the clean run's of the same seed (paired difference, Student-t CI over seeds).
Prints the README's markdown table and writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from fedhq.fl import engine
from fedhq.fl.attacks import ATTACKS, attack_report, attacking
from fedhq.fl.client import train_local
from fedhq.fl.config import RunConfig
from fedhq.fl.summary import mean_ci, paired_differences

AGGREGATIONS = ("mean", "trimmed-mean:0.1", "median")
WITHIN = 0.02  # the goal: robust aggregation within 2 points of the clean run


def run_one(config: RunConfig, attack: str | None) -> dict:
    train_fn = attacking(ATTACKS[attack]) if attack else train_local
    results = engine.run(config, echo=lambda line: None, train_fn=train_fn)
    return attack_report(results)


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def row_text(row: dict, rounds: int) -> str:
    diff = row["vs_clean"]
    ci = f" ± {pct(diff['half_width'])}" if diff["half_width"] is not None else ""
    rejected = f"{row['rejected_rounds']}/{row['runs'] * rounds}" + (f" ({row['why']})" if row["why"] else "")
    return (
        f"| {row['attack']} | {row['aggregation']} | {row['rounds_completed']}/{rounds} | {rejected} | "
        f"{'yes' if row['honest_used'] else '**no**'} | {pct(row['accuracy']['mean'])} | "
        f"{pct(diff['mean'])}{ci} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--strategy", default="fedfq")  # PTQ only: the cheapest to run
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=list(ATTACKS))
    parser.add_argument("--aggregations", nargs="+", default=list(AGGREGATIONS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench/results/attacks.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-attacks-"))
    base = RunConfig(strategy=args.strategy, clients=10, rounds=args.rounds, threads=args.threads)
    reference = engine.reference_profile(base, engine.model_spec(base, engine.load_data(base)), work, print)[1]
    started, load = time.perf_counter(), os.getloadavg()
    rows, clean = [], {}
    for aggregation in args.aggregations:
        for attack in [None, *args.attacks]:
            reports = []
            for seed in args.seeds:
                out = work / f"{aggregation}-{attack or 'clean'}-{seed}"
                config = base.replace(
                    seed=seed, aggregation=aggregation, output_dir=str(out), reference_profile=reference
                )
                reports.append(run_one(config, attack))
            accuracy = [r["final_deployed_accuracy"] for r in reports]
            if attack is None:
                clean[aggregation] = accuracy
            why = sorted({reason for r in reports for reason in r["reasons"]})
            rows.append(
                {
                    "attack": attack or "none (clean)",
                    "aggregation": aggregation,
                    "runs": len(reports),
                    "rounds_completed": min(r["rounds_completed"] for r in reports),
                    "rejected_rounds": sum(r["attacker_rejected"] for r in reports),
                    "why": ATTACKS[attack].rejected if attack and why and ATTACKS[attack].rejected else "",
                    "reasons": why,
                    "honest_used": all(r["honest_used"] for r in reports),
                    "accuracy": mean_ci(accuracy),
                    "vs_clean": paired_differences(accuracy, clean[aggregation]),
                }
            )
            print(row_text(rows[-1], args.rounds), flush=True)
    header = (
        "| attack | aggregation | rounds completed | attacker rejected (rounds) | honest updates all used | "
        "final deployed accuracy, % | vs clean, points (95% CI) |\n| --- | --- | --- | --- | --- | --- | --- |"
    )
    print("\n" + header + "\n" + "\n".join(row_text(r, args.rounds) for r in rows))
    document = {
        "settings": vars(args) | {"clients": 10, "attacker": 0, "dataset": base.dataset},
        "load_average_before": load,
        "load_average_after": os.getloadavg(),
        "wall_s": time.perf_counter() - started,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(document, indent=1) + "\n")
    print(f"wrote {args.out} ({document['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
