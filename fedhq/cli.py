"""The ``fedhq`` command.

    fedhq profile [--quick] [--device cuda] [--out PATH] [--no-validate]

Subcommands are argparse subparsers, each registered by a ``_add_<name>`` function
below; later issues add ``run`` and ``compare`` the same way.

OpenMP threads: unless OMP_WAIT_POLICY is already set, ``main`` sets it to PASSIVE
before torch is imported. Measured on a 2-core machine shared with other jobs: with
the default (spinning) policy a 2-thread OpenMP team stalls whenever another process
holds a core, and a small-CNN training step took ~300 ms instead of ~7 ms; with PASSIVE
it did not stall. Every ``fedhq`` subcommand runs under the same policy, so a profile
and the runs it predicts agree; the profile records the policy in ``conditions``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

# Example client for the speed-model table printed after a profile (Eq. 1).
EXAMPLE_CLIENT = {"alpha": 0.5, "beta": 1.0, "samples": 5000, "epochs": 5}


def _validation_batch(batches: list[int], quick: bool) -> int:
    """A batch size between two measured ones (so the check exercises the
    interpolation, not a measured point): the two largest, or with --quick the two
    smallest (a shorter run)."""
    if len(batches) < 2:
        return batches[0]
    a, b = sorted(batches)[:2] if quick else sorted(batches)[-2:]
    return max(1, int(round(math.sqrt(a * b))))


def _print_validation(doc: dict, args) -> list[dict]:
    from fedhq.analysis import speed

    key = next(iter(doc["models"]))
    measured = sorted(r["batch"] for r in doc["models"][key]["strategies"]["ptq"]["batches"])
    batch = _validation_batch(measured, args.quick)
    samples = batch * (16 if args.quick else 32)
    print(
        f"\nValidation (Eq. 1 vs a real training run on this machine): {key}, batch {batch} "
        f"(measured at {measured}), {samples} samples, 1 epoch, median of 3 runs"
    )
    rows = speed.validate_against_training(doc, key, batch=batch, samples=samples, epochs=1, runs=3)
    print("| strategy | predicted s | measured s | error |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['strategy']} | {r['predicted_s']:.3f} | {r['measured_s']:.3f} | {r['error'] * 100:+.1f}% |")
    return rows


def _print_speed_examples(doc: dict) -> None:
    from fedhq.analysis import speed
    from fedhq.devices import preset_names

    if not doc.get("models"):
        return
    c = EXAMPLE_CLIENT
    print(
        f"\nSpeed model (Eq. 1) for a client with alpha={c['alpha']}, beta={c['beta']}, V={c['samples']}, "
        f"E={c['epochs']}: this machine measured, presets scaled from it (estimates)"
    )
    print("| device | model | strategy | B_m | step ms | T_m s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in ["(this machine)", *preset_names()]:
        model = speed.SpeedModel(doc) if name == "(this machine)" else speed.SpeedModel(name, reference=doc)
        for key in doc["models"]:
            for strategy in doc["models"][key]["strategies"]:
                try:
                    e = model.estimate(key, strategy, **c)
                except ValueError as error:
                    print(f"| {model.device} | {key} | {strategy} | - | - | {error} |")
                    continue
                print(f"| {model.device} | {key} | {strategy} | {e.batch} | {e.step_s * 1e3:.2f} | {e.time_s:.1f} |")


def _profile(args) -> int:
    from fedhq_kernels.profile.cli import take_profile

    doc, _ = take_profile(args, log=lambda s: print(s, flush=True))
    if doc.get("models"):
        if args.validate and doc["device"]["type"] == "cpu":
            _print_validation(doc, args)
        _print_speed_examples(doc)
    return 0


def _add_profile(subparsers) -> None:
    from fedhq_kernels.profile.cli import add_arguments

    parser = subparsers.add_parser(
        "profile",
        help="measure this machine's hardware profile (feeds the speed model, Eq. 1-2)",
        description="Measures bandwidth, matmul throughput, dispatch overhead, the quantization ops and the "
        "training steps (FP32 for PTQ clients, fake-quant for QAT clients) of the project's models; writes a "
        "versioned JSON profile, prints its table, checks the speed model against a real training run.",
    )
    add_arguments(parser)
    parser.add_argument(
        "--no-validate", dest="validate", action="store_false",
        help="skip the predicted-vs-measured training run (CPU profiles only)",
    )  # fmt: skip
    parser.set_defaults(handler=_profile)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedhq", description="FedHQ: hybrid runtime quantization for federated learning"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_profile(subparsers)
    return parser


def main(argv=None) -> int:
    if "torch" not in sys.modules:  # libgomp reads it once, when torch loads it
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except (ValueError, RuntimeError) as error:
        print(f"fedhq {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
