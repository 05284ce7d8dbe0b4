"""``fedhq compare``: several strategies on the same data, partition, devices and
reference profile, on one or more seeds; their results and statistics over seeds in
one comparison document (outputs: docs/fl.md, "Results")."""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from fedhq.fl import engine
from fedhq.fl.config import MAX_SEED, PAPER_STRATEGIES, STRATEGIES, ConfigError, RunConfig
from fedhq.fl.outputs import claim_output
from fedhq.fl.sampling import Sampler
from fedhq.fl.summary import summarize
from fedhq_kernels.checks import is_int

# /2: runs grouped by seed ("runs_by_seed": seed -> strategy -> run) and a "summary";
# /1 held one seed's runs by strategy ("runs").
COMPARE_SCHEMA = "fedhq.compare/2"
COMPARISON_FILE = "comparison.json"
DEFAULT_OUTPUT = "results/compare"
# what marks a folder as holding an earlier comparison's results
RESULT_PATTERNS = (COMPARISON_FILE, "seed*/*/" + engine.RESULTS_FILE, "seed*/*/" + engine.CHECKPOINT_FILE)
MAX_SEEDS = 1000  # a typo such as 0-10000 should not start ten thousand runs


def parse_seeds(text: str) -> list[int]:
    """'0,1,2', '0-4' or a mix ('0-2,7') -> sorted distinct seeds; ValueError on bad input."""
    seeds: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not match:
            raise ValueError(f"seeds: expected numbers and ranges such as 0,1,2 or 0-4, got {part!r} in {text!r}")
        low, high = int(match[1]), int(match[2] or match[1])
        if high < low:
            raise ValueError(f"seeds: range {part!r} runs backwards")
        if high - low + 1 + len(seeds) > MAX_SEEDS:
            raise ValueError(f"seeds: {text!r} is more than {MAX_SEEDS} seeds")
        seeds.update(range(low, high + 1))
    return sorted(seeds)


def seed_dir(out: str | Path, seed: int) -> Path:
    """The folder of one seed's runs."""
    return Path(out) / f"seed{seed}"


def run_dir(out: str | Path, seed: int, name: str) -> Path:
    """Where the run of strategy ``name`` on ``seed`` writes its files."""
    return seed_dir(out, seed) / name.replace("+", "_")


def plans(config: RunConfig, strategies: Sequence[str]) -> list[tuple[str, str, bool]]:
    """(name, strategy, adjust) per run of one seed. With ``config.adjust``, fedhq runs
    twice, without and with the adjustment ("fedhq+adjust")."""
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown or not strategies:
        raise ConfigError(f"strategies must be a non-empty subset of {', '.join(STRATEGIES)}, got {list(strategies)}")
    result = [(s, s, False) for s in dict.fromkeys(strategies)]
    if config.adjust:
        at = [p[0] for p in result].index("fedhq") + 1 if "fedhq" in strategies else 0
        result.insert(at, ("fedhq+adjust", "fedhq", True))
    return result


def _finished(path: Path, config: RunConfig) -> dict | None:
    """The run's results.json if it finished with exactly ``config``, else None."""
    try:
        results = json.loads((path / engine.RESULTS_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    done = results.get("config") == json.loads(json.dumps(config.to_dict())) and len(results["rounds"]) == config.rounds
    return results if done else None


def _duration(seconds: float) -> str:
    minutes, s = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{s:02d}s"


def compare(
    config: RunConfig,
    strategies: Sequence[str] = PAPER_STRATEGIES,
    *,
    seeds: Sequence[int] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    echo: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
) -> dict:
    """Runs every strategy on every seed (``seeds``; default ``config.seed``) and
    writes output_dir/comparison.json. ``resume`` reuses finished runs and continues
    interrupted ones from their checkpoints. Every run of a seed trains on the same
    client data: with ``config.adjust`` every run holds out the same validation samples."""
    seeds = sorted(set(seeds)) if seeds else [config.seed]
    if any(not is_int(s) or not 0 <= s <= MAX_SEED for s in seeds):
        raise ConfigError(f"seeds must be ints in [0, {MAX_SEED}], got {list(seeds)}")
    runs_of_seed = plans(config, strategies)
    out = Path(config.output_dir)
    claim_output(out, RESULT_PATTERNS, resume=resume, overwrite=overwrite)
    engine.parse_topology(config)  # a bad setting fails before the data loads and the profile is measured
    Sampler.of(config)  # and so does a bad availability trace
    dataset = engine.load_data(config)
    spec = engine.model_spec(config, dataset)
    _, reference = engine.reference_profile(config, spec, out, echo, reuse_saved=resume)

    # when one run needs the server's validation split, every run holds it out: the
    # clients of a seed train on the same samples whatever the strategy
    hold_out = config.adjust or config.hold_out_validation or any(engine.needs_validation(s) for s in strategies)
    todo = [(seed, *plan) for seed in seeds for plan in runs_of_seed]
    started, trained, trained_s = time.perf_counter(), 0, 0.0
    runs_by_seed: dict[int, dict[str, dict]] = {seed: {} for seed in seeds}
    for k, (seed, name, strategy, adjust) in enumerate(todo, start=1):
        path = run_dir(out, seed, name)
        run_config = config.replace(
            seed=seed,
            strategy=strategy,
            adjust=adjust,
            hold_out_validation=hold_out,
            output_dir=str(path),
            reference_profile=reference,
        )
        left = f", about {_duration(trained_s / trained * (len(todo) - k + 1))} left" if trained else ""
        header = f"[run {k}/{len(todo)}] seed {seed}, {name} (elapsed {_duration(time.perf_counter() - started)}{left})"
        done = _finished(path, run_config) if resume else None
        if done is not None:
            echo(f"{header}: finished earlier, reused {path / engine.RESULTS_FILE}")
            runs_by_seed[seed][name] = done
            continue
        echo(header)
        t0 = time.perf_counter()
        continuing = resume and (path / engine.CHECKPOINT_FILE).exists()
        runs_by_seed[seed][name] = engine.run(run_config, resume=continuing, echo=echo)
        trained, trained_s = trained + 1, trained_s + time.perf_counter() - t0
    echo(f"{len(todo)} runs done in {_duration(time.perf_counter() - started)}")

    comparison = {
        "schema": COMPARE_SCHEMA,
        "seeds": seeds,
        "strategies": [name for name, _, _ in runs_of_seed],
        "runs_by_seed": {str(seed): runs for seed, runs in runs_by_seed.items()},
        "summary": summarize(runs_by_seed),
    }
    (out / COMPARISON_FILE).write_text(json.dumps(comparison, indent=1) + "\n")
    return comparison
