"""Runs several strategies on the same data, partition, devices and reference profile
(one measurement of this machine shared by all runs, so their simulated times are
comparable), and collects their results in one comparison document."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from fedhq.fl import engine
from fedhq.fl.config import STRATEGIES, ConfigError, RunConfig

COMPARE_SCHEMA = "fedhq.compare/1"
COMPARISON_FILE = "comparison.json"


def compare(
    config: RunConfig,
    strategies: Sequence[str] = STRATEGIES,
    *,
    resume: bool = False,
    echo: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
) -> dict:
    """Runs every strategy (output in output_dir/<strategy>/) and writes
    output_dir/comparison.json. With ``config.adjust``, fedhq runs twice, without and
    with the adjustment ("fedhq+adjust"), and every run holds out the same validation
    samples, so all train on the same client data."""
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown or not strategies:
        raise ConfigError(f"strategies must be a non-empty subset of {', '.join(STRATEGIES)}, got {list(strategies)}")
    out = Path(config.output_dir)
    dataset = engine.load_data(config)
    spec = engine.model_spec(config, dataset)
    _, reference = engine.reference_profile(config, spec, out, echo)
    plans = [(s, s, False) for s in dict.fromkeys(strategies)]
    if config.adjust:
        plans.insert([p[0] for p in plans].index("fedhq") + 1 if "fedhq" in strategies else 0,
                     ("fedhq+adjust", "fedhq", True))  # fmt: skip
    runs = {}
    for name, strategy, adjust in plans:
        run_config = config.replace(strategy=strategy, adjust=adjust, hold_out_validation=config.adjust,
                                    output_dir=str(out / name), reference_profile=reference)  # fmt: skip
        runs[name] = engine.run(run_config, resume=resume and (out / name / engine.CHECKPOINT_FILE).exists(), echo=echo)
    comparison = {"schema": COMPARE_SCHEMA, "runs": runs}
    (out / COMPARISON_FILE).write_text(json.dumps(comparison, indent=1) + "\n")
    return comparison
