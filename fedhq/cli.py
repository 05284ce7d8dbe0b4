"""The ``fedhq`` command.

    fedhq profile [--quick] [--device cuda] [--out PATH] [--no-validate]
    fedhq run [--config FILE] [--strategy fedhq] [--dataset digits] ... [--resume | --overwrite] [--engine flower]
    fedhq compare [--config FILE] [--strategies fedhq,fedaqt,...] [--seeds 0-4] ... [--resume | --overwrite]

Subcommands are argparse subparsers, each registered by a ``_add_<name>`` function;
``run`` and ``compare`` share their settings (``_add_run_settings``): each flag overrides
the same-named setting of the JSON config file (fedhq.fl.config.RunConfig). ``main``
sets OMP_WAIT_POLICY=PASSIVE unless it is set, before torch loads (why, measured:
docs/profile.md, "Measured here").
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

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
    from fedhq.profile.cli import take_profile

    doc, _ = take_profile(args, log=lambda s: print(s, flush=True))
    if doc.get("models"):
        if args.validate and doc["device"]["type"] == "cpu":
            _print_validation(doc, args)
        _print_speed_examples(doc)
    return 0


def _add_profile(subparsers) -> None:
    from fedhq.profile.cli import add_arguments

    parser = subparsers.add_parser(
        "profile",
        help="measure this machine's hardware profile (feeds the speed model, Eq. 1-2)",
        description="Measures bandwidth, matmul throughput, dispatch overhead, the quantization ops and the "
        "training steps (FP32 for PTQ clients, fake-quant for QAT clients) of the project's models; writes a "
        "versioned JSON profile, prints its table, checks the speed model against a real training run.",
    )
    add_arguments(parser)
    parser.add_argument(
        "--no-validate",
        dest="validate",
        action="store_false",
        help="skip the predicted-vs-measured training run (CPU profiles only)",
    )
    parser.set_defaults(handler=_profile)


# ---- run / compare ----

# flag -> (RunConfig field, type, help); lists are comma-separated
_RUN_SETTINGS = {
    "--dataset": (
        "dataset",
        str,
        "digits (bundled, default), cifar10, cifar100, svhn (read from --data-root), "
        "fashion-mnist, mnist (IDX files; default root /usr/share/datasets/NAME), synthetic",
    ),
    "--data-root": ("data_root", str, "directory holding the dataset's files (nothing is downloaded)"),
    "--max-train": ("max_train", int, "keep a seeded stratified subset of this many training images"),
    "--max-test": ("max_test", int, "evaluate on a seeded stratified subset of this many test images"),
    "--model": ("model", str, "model spec name[@HxWxC][:classes]; default: the small CNN sized to the dataset"),
    "--clients": ("clients", int, "number of clients (default 10)"),
    "--rounds": ("rounds", int, "communication rounds (default 25)"),
    "--local-epochs": ("local_epochs", int, "local epochs per round (default 2)"),
    "--batch-size": ("batch_size", int, "local batch size, capped by each client's memory budget (default 16)"),
    "--lr": ("lr", float, "SGD learning rate (default 0.05)"),
    "--momentum": ("momentum", float, "SGD momentum (default 0.9)"),
    "--partition": ("partition", str, "iid, dirichlet (default) or quantity"),
    "--dirichlet-alpha": ("dirichlet_alpha", float, "Dirichlet label-skew concentration (default 0.5)"),
    "--quantity-sigma": ("quantity_sigma", float, "log-normal spread of client sizes for --partition quantity"),
    "--devices": ("devices", "list:str", "device presets or measured profile paths, assigned to clients in turn"),
    "--alphas": ("alphas", "list:float", "per-client memory fraction alpha in (0, 1]; default drawn from the seed"),
    "--betas": ("betas", "list:float", "per-client compute fraction beta in (0, 1]; default drawn from the seed"),
    "--xi": ("xi", float, "Theta's weight of speed significance (Eq. 6, default 0.2)"),
    "--area-threshold": ("area_threshold", float, "triangle area below which a client is PTQ (default 0.0625)"),
    "--round-slack": ("round_slack", float, "fedhq-rt: the round may last (1 + this) x the all-PTQ round (default 0)"),
    "--speed-orientation": (
        "speed_orientation",
        str,
        "read Sig_speed as 'speed' (default, measured better) or 'time' (Eq. 2 as printed)",
    ),
    "--acc-statistic": (
        "acc_statistic",
        str,
        "per-sample statistic of Sig_acc (default label_surprisal; docs/accuracy-significance.md compares the others)",
    ),
    "--bits": ("bits", int, "bits of the uploaded weights, 2..8 (default 8)"),
    "--seed": ("seed", int, "seed of the partition, clients, initialization and shuffling (default 0)"),
    "--output": (
        "output_dir",
        str,
        "output directory (default results/run for run, results/compare for compare); "
        "one that holds results is refused without --resume or --overwrite",
    ),
    "--reference-profile": ("reference_profile", str, "measured profile of this machine to reuse (else measured)"),
    "--uplink-mbps": ("uplink_mbps", float, "uplink of devices whose profile has none (default 20)"),
    "--client-timeout": ("client_timeout_s", float, "seconds after which a client's update is dropped"),
    "--max-weight-growth": (
        "max_weight_growth",
        float,
        "reject an update holding a weight above this many times the "
        "initial model's largest in that tensor, or 1.0 (default 100; null in a config file: no bound)",
    ),
    "--aggregation": (
        "aggregation",
        str,
        "the server's aggregation: mean (default), trimmed-mean:TRIM (TRIM in [0, 0.5), default 0.1) or median",
    ),
    "--threads": ("threads", int, "torch threads (default 2)"),
    "--clients-per-round": (
        "clients_per_round",
        "count-or-fraction",
        "K clients train per round, drawn (seeded) among the available ones: an int, or a fraction of "
        "--clients such as 0.05 (default: every client)",
    ),
    "--availability": (
        "availability",
        str,
        "CSV trace of who can train when: one row per client, one 0/1 column per round "
        "(default: every client, every round; docs/fl.md)",
    ),
    "--topology": ("topology", str, "hierarchical system: 'hierarchical:AxL' or a JSON file of parents (default flat)"),
    "--adjust-after": ("adjust_after", int, "rounds observed before the adjustment (default 2)"),
    "--adjust-time-tolerance": ("adjust_time_tolerance", float, "straggler: round time > (1 + tol) x median (0.5)"),
    "--adjust-acc-tolerance": ("adjust_acc_tolerance", float, "validation accuracy a client may cost (0.01)"),
    "--adjust-budget": ("adjust_budget", int, "candidate trainings the cost model may run (default 8; 0: leaves only)"),
    "--adjust-trial-rounds": ("adjust_trial_rounds", int, "rounds per candidate trial (default 1)"),
}


def _parse_count_or_fraction(text: str) -> int | float:
    """'50' -> 50 (a count), '0.05' -> 0.05 (a fraction); RunConfig checks the range."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    raise argparse.ArgumentTypeError(f"expected an int or a fraction, got {text!r}")


def _parse_list(kind: str, text: str) -> list:
    cast = float if kind == "list:float" else str
    items = [t.strip() for t in text.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list without empty items, got {text!r}")
    try:
        return [cast(t) for t in items]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of numbers, got {text!r}") from None


def _add_run_settings(parser) -> None:
    parser.add_argument("--config", help="JSON file of settings (flags override it)")
    for flag, (dest, kind, help_text) in _RUN_SETTINGS.items():
        if kind == "count-or-fraction":
            parser.add_argument(flag, dest=dest, type=_parse_count_or_fraction, help=help_text)
        elif isinstance(kind, str):
            parser.add_argument(flag, dest=dest, type=lambda t, k=kind: _parse_list(k, t), help=help_text)
        else:
            parser.add_argument(flag, dest=dest, type=kind, help=help_text)
    parser.add_argument(
        "--adjust",
        action="store_true",
        default=None,
        help="FedHQ's fine-grained adjustment after --adjust-after rounds (strategy fedhq)",
    )
    parser.add_argument("--resume", action="store_true", help="continue from the output directory's checkpoint")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the results an earlier command left in the output directory"
    )


def _run_config(args, **fixed):
    from fedhq.fl.config import RunConfig

    dests = [dest for dest, _, _ in _RUN_SETTINGS.values()] + ["adjust"]
    overrides = {dest: getattr(args, dest) for dest in dests if getattr(args, dest) is not None}
    overrides.update(fixed)
    if args.config:
        return RunConfig.from_file(args.config, overrides)
    return RunConfig.from_dict(overrides, where="flags")


def _run(args) -> int:
    fixed = {"strategy": args.strategy} if args.strategy else {}
    config = _run_config(args, **fixed)  # checked before the engine loads

    from fedhq import report
    from fedhq.fl import engine
    from fedhq.fl.outputs import claim_output

    claim_output(
        config.output_dir, (engine.RESULTS_FILE, engine.CHECKPOINT_FILE), resume=args.resume, overwrite=args.overwrite
    )
    if args.engine == "flower":
        results = _flower_run(config, args.resume)
    else:
        results = engine.run(config, resume=args.resume)
    print(report.format_run_table(results))
    paths = report.write_run_report(results, config.output_dir)
    print(f"wrote {config.output_dir}/{engine.RESULTS_FILE}, " + ", ".join(str(p) for p in paths))
    return 0


def _flower_run(config, resume: bool) -> dict:
    if resume:
        raise ValueError(
            "--resume: the Flower engine cannot resume (its nodes keep their QAT observers); "
            "resume runs on the embedded engine"
        )
    try:
        from fedhq.flower import simulation
    except ImportError as error:
        raise RuntimeError(f"--engine flower needs Flower: pip install 'fedhq[flower]' ({error})") from None
    return simulation.run(config)


def _file_sets(path: str | None, key: str) -> bool:
    """Whether the JSON config file at ``path`` sets ``key`` (RunConfig.from_file has
    already read it, so it is readable)."""
    import json

    return bool(path) and key in json.loads(Path(path).read_text())


def _compare(args) -> int:
    from fedhq import report
    from fedhq.fl.compare import COMPARISON_FILE, DEFAULT_OUTPUT, compare, parse_seeds

    if args.seeds is not None and args.seed is not None:
        raise ValueError("--seed runs one seed and --seeds several: pass one of them")
    config = _run_config(args)
    if args.output_dir is None and not _file_sets(args.config, "output_dir"):
        config = config.replace(output_dir=DEFAULT_OUTPUT)  # run's default folder stays run's
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    strategies = args.strategies or list(_strategies(paper=True))
    comparison = compare(config, strategies, seeds=seeds, resume=args.resume, overwrite=args.overwrite)
    print(report.format_comparison_table(comparison))
    out = Path(config.output_dir)
    paths = report.write_report(comparison, out)
    top = [p.name for p in paths if p.parent == out]
    per_seed = "; each seed's table and plots in its seed<S>/ folder" if len(comparison["seeds"]) > 1 else ""
    print(
        f"wrote {out}/: {', '.join([COMPARISON_FILE, *top])}{per_seed}; every run's files in seed<S>/<strategy>/ "
        f"(results.json, checkpoint.pt, {report.ROUNDS_CSV})"
    )
    return 0


def _strategies(paper: bool = False):
    from fedhq.fl.config import PAPER_STRATEGIES, STRATEGIES

    return PAPER_STRATEGIES if paper else STRATEGIES


def _add_run(subparsers) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run federated training with one strategy",
        description="Federated training where each client is PTQ or QAT (strategy fedhq: chosen by FedHQ's "
        "analysis; fedaqt: all QAT; fedfq: all PTQ; fedrh: random; fp32: no quantization; fedhq-rt: "
        "round-aware FedHQ; slackfill: QAT where the round is not lengthened; fedrh-matched: random with "
        "fedhq's QAT count). Writes "
        "results.json, a checkpoint after every round, and plots to the output directory.",
    )
    parser.add_argument("--strategy", help="fedhq (default), fedaqt, fedfq, fedrh or fp32")
    parser.add_argument(
        "--engine",
        choices=("embedded", "flower"),
        default="embedded",
        help="embedded (default): every client in this process; flower: Flower's simulation "
        "engine, clients in Ray actors of --threads CPUs (pip install 'fedhq[flower]'; docs/flower.md)",
    )
    _add_run_settings(parser)
    parser.set_defaults(handler=_run)


def _add_compare(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="run every strategy on the same partition and devices and compare them",
        description="Runs fedhq, fedaqt, fedfq, fedrh and fp32 (or --strategies) on the same data, partition, "
        "devices and reference profile, on one seed or several (--seeds); prints one table (accuracy, wall and "
        "simulated time, bytes, PTQ/QAT per client; with several seeds, mean and 95%% confidence interval over "
        "them and FedHQ's paired differences) and writes comparison.json, rounds.csv and PNG plots.",
    )
    parser.add_argument(
        "--strategies",
        type=lambda t: _parse_list("list:str", t),
        help="comma-separated, of fedhq,fedaqt,fedfq,fedrh,fp32 (the default: the paper's five) and "
        "fedhq-rt,slackfill,fedrh-matched",
    )
    parser.add_argument(
        "--seeds",
        help="run every strategy on each of these seeds and report mean and 95%% "
        "confidence interval over them: a list and/or ranges, e.g. 0,1,2 or 0-4 "
        "(default: --seed)",
    )
    _add_run_settings(parser)
    parser.set_defaults(handler=_compare)


class _Parser(argparse.ArgumentParser):
    """argparse, except that a bad argument is one line (no usage block), exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (--help for usage)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedhq", description="FedHQ: hybrid runtime quantization for federated learning")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_profile(subparsers)
    _add_run(subparsers)
    _add_compare(subparsers)
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
    except OSError as error:  # a file-system error the checks did not foresee: still one line
        where = f" {error.filename}" if error.filename else ""
        print(f"fedhq {args.command}: error:{where}: {error.strerror or error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
