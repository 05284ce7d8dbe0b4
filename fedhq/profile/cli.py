"""Command line of the hardware profile, shared by ``python -m fedhq.profile``
and ``fedhq profile``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fedhq.profile import run, schema


def default_out(device: str) -> Path:
    return Path("results") / f"profile-{device.split(':')[0]}.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick", action="store_true", help="small sizes, few repeats: a smoke test (< 30 s on 2 CPU cores)"
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument(
        "--models",
        default=",".join(run.DEFAULT_MODELS),
        help="comma-separated model specs name[@HxWxC][:classes] (default %(default)s), or 'none'",
    )
    parser.add_argument("--batches", help="comma-separated batch sizes for every model (default: per model and mode)")
    parser.add_argument("--repeats", type=int, help="timed repeats per figure (default 10; --quick: 3)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own choice)")
    parser.add_argument("--out", type=Path, help="where to write the JSON (default results/profile-<device>.json)")


def parse_list(text: str | None, kind=str) -> list | None:
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    return [kind(t) for t in items]


def take_profile(args: argparse.Namespace, log=print) -> tuple[dict, Path]:
    """Runs the profile the arguments describe, writes it, prints its table."""
    models = [] if args.models.strip().lower() == "none" else parse_list(args.models)
    try:
        batches = parse_list(args.batches, int)
    except ValueError as error:
        raise ValueError(f"--batches must be comma-separated integers ({error})") from None
    if args.repeats is not None and args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    from fedhq.fl.outputs import check_writable_file

    out = args.out or default_out(args.device)
    check_writable_file(out, "--out")  # before the measurement, not after it
    start = time.perf_counter()
    doc = run.run_profile(
        device=args.device,
        quick=args.quick,
        models=models,
        batches=batches,
        repeats=args.repeats,
        threads=args.threads,
        log=log,
    )
    out = schema.dump(doc, out)
    print()
    print(run.format_table(doc))
    print(f"\nwrote {out} ({time.perf_counter() - start:.1f} s)")
    return doc, out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedhq.profile",
        description="Hardware profile for FedHQ's speed model: bandwidth, matmul, dispatch overhead, the "
        "quantization ops, and training steps (FP32 and fake-quant) of the project's models.",
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        take_profile(args, log=lambda s: print(s, flush=True))
    except (ValueError, RuntimeError) as error:
        print(f"profile: error: {error}", file=sys.stderr)
        return 2
    return 0
