"""The Flower engine against the embedded engine, and what INT8 saves on Flower's wire.

    python bench/bench_flower.py [--clients 10] [--rounds 25] [--threads 2] [--out results/bench-flower]

1. Records: one client's upload as Flower records (ArrayRecord + ConfigRecord bytes),
   float32 against INT8 and packed INT4, for the small CNN and ResNet-18.
2. Engines: one config run by the embedded engine and by Flower's simulation engine:
   allocation, accuracy and wall time per round, and the Flower run's one-off cost.
   ``--threads`` is each client's threads on both engines.

Prints markdown tables and writes ``<out>/bench_flower.json`` with the load average
before and after (docs/flower.md, "Measured").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from fedhq.fl import engine
from fedhq.fl.client import quantize_upload, quantized_names
from fedhq.fl.config import RunConfig
from fedhq.flower import simulation
from fedhq.flower.records import encode_state
from fedhq.models import ModelSpec

MODELS = ("small_cnn@8x8x1:10", "resnet18@32x32x3:10")


def record_sizes() -> list[dict]:
    rows = []
    for key in MODELS:
        model = ModelSpec.parse(key).build()
        names = quantized_names(model)
        fp32, int8, int4 = (
            sum(r.count_bytes() for r in encode_state(state))
            for state in (
                model.state_dict(),
                quantize_upload(model.state_dict(), names, 8),
                quantize_upload(model.state_dict(), names, 4),
            )
        )
        rows.append(
            {
                "model": key,
                "fp32_bytes": fp32,
                "int8_bytes": int8,
                "int4_bytes": int4,
                "ratio": fp32 / int8,
                "int8_over_int4": int8 / int4,
            }
        )
    return rows


def engines(config: RunConfig, out: Path) -> dict:
    quiet = lambda line: None  # noqa: E731
    started = time.perf_counter()
    embedded = engine.run(config.replace(output_dir=str(out / "embedded")), echo=quiet)
    embedded_s = time.perf_counter() - started
    started = time.perf_counter()
    flower = simulation.run(config.replace(output_dir=str(out / "flower")), echo=quiet)
    flower_s = time.perf_counter() - started
    rows = []
    for e, f in zip(embedded["rounds"], flower["rounds"], strict=True):
        rows.append(
            {
                "round": e["round"],
                "embedded_acc": e["accuracy"],
                "flower_acc": f["accuracy"],
                "embedded_wall_s": e["wall_s"],
                "flower_wall_s": f["wall_s"],
                "upload_bytes": f["upload_bytes"],
                "record_bytes": f["record_bytes"],
            }
        )
    return {
        "same_allocation": embedded["assignment_before"] == flower["assignment_before"],
        "allocation": flower["assignment_before"],
        "max_accuracy_gap": max(abs(r["embedded_acc"] - r["flower_acc"]) for r in rows),
        "final": {"embedded": embedded["final_accuracy"], "flower": flower["final_accuracy"]},
        "median_round_s": {
            "embedded": statistics.median(r["embedded_wall_s"] for r in rows),
            "flower": statistics.median(r["flower_wall_s"] for r in rows),
        },
        "total_s": {"embedded": embedded_s, "flower": flower_s},
        "flower_outside_rounds_s": flower_s - sum(r["flower_wall_s"] for r in rows),
        "rounds": rows,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="results/bench-flower")
    args = parser.parse_args(argv)
    out = Path(args.out)
    load_before = os.getloadavg()[0]
    sizes = record_sizes()
    print("| model | fp32 records, bytes | INT8 records, bytes | fp32 / INT8 | INT4 records, bytes | INT8 / INT4 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in sizes:
        print(
            f"| {r['model']} | {r['fp32_bytes']:,} | {r['int8_bytes']:,} | {r['ratio']:.2f}x | {r['int4_bytes']:,} | "
            f"{r['int8_over_int4']:.2f}x |"
        )
    config = RunConfig(clients=args.clients, rounds=args.rounds, threads=args.threads, output_dir=str(out / "embedded"))
    config = config.replace(reference_profile=_reference(config, out))
    result = engines(config, out)
    med, tot, final = result["median_round_s"], result["total_s"], result["final"]
    print(
        f"\n{args.clients} clients, {args.rounds} rounds, {args.threads} threads: "
        f"same allocation: {result['same_allocation']} {result['allocation']}; "
        f"largest per-round accuracy gap {100 * result['max_accuracy_gap']:.2f} points; "
        f"final {100 * final['embedded']:.2f}% (embedded) / {100 * final['flower']:.2f}% (Flower)"
    )
    print("| engine | median round, s | whole run, s |")
    print("| --- | --- | --- |")
    print(f"| embedded | {med['embedded']:.2f} | {tot['embedded']:.1f} |")
    print(
        f"| Flower simulation | {med['flower']:.2f} | {tot['flower']:.1f} "
        f"(of which {result['flower_outside_rounds_s']:.1f} outside the rounds) |"
    )
    doc = {
        "records": sizes,
        "engines": result,
        "clients": args.clients,
        "rounds": args.rounds,
        "threads": args.threads,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "cpus": os.cpu_count(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_flower.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\nload average {load_before:.1f} before, {doc['load_after']:.1f} after; wrote {out / 'bench_flower.json'}")
    return 0


def _reference(config: RunConfig, out: Path) -> str:
    """One measured reference profile for both engines (simulated times agree)."""
    spec = engine.model_spec(config, engine.load_data(config))
    return engine.reference_profile(config, spec, out, echo=print)[1]


if __name__ == "__main__":
    raise SystemExit(main())
