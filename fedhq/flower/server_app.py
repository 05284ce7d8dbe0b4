"""The FedHQ ServerApp: ``run_on_grid`` is the run driver (``fedhq.fl.engine.run``)
with ``FedHQStrategy`` as its transport; ``app`` is the ServerApp that ``flwr run``
starts, its settings from the Flower run config (``run_config_from_flower``)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedhq.fl import engine
from fedhq.fl.config import ConfigError, RunConfig
from fedhq.flower.strategy import FedHQStrategy

LIST_SETTINGS = {"devices": str, "alphas": float, "betas": float}

app = ServerApp()


def echo_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_on_grid(grid: Grid, config: RunConfig, *, echo: Callable[[str], None] = echo_stderr) -> dict:
    """Runs ``config`` on the nodes of ``grid``; returns the results (also written to
    output_dir/results.json, with a checkpoint after every round)."""
    return engine.run(config, echo=echo, transport=lambda setup: FedHQStrategy(grid, setup))


def run_config_from_flower(values: Mapping[str, object]) -> RunConfig:
    """RunConfig from a Flower run config: keys are RunConfig's settings with '-' for
    '_' ("local-epochs"); "config-file" names a JSON settings file that the other keys
    override; an empty string leaves a setting to the file or its default; devices,
    alphas and betas are comma-separated."""
    settings = {k.replace("-", "_"): v for k, v in values.items() if v != ""}
    path = settings.pop("config_file", None)
    for name, kind in LIST_SETTINGS.items():
        text = settings.get(name)
        if isinstance(text, str):
            try:
                settings[name] = [kind(t.strip()) for t in text.split(",") if t.strip()]
            except ValueError:
                raise ConfigError(f"{name} must be comma-separated {kind.__name__}s, got {text!r}") from None
    if path:
        return RunConfig.from_file(str(path), settings)
    return RunConfig.from_dict(settings, where="Flower run config")


@app.main()
def main(grid: Grid, context: Context) -> None:
    from fedhq import report

    config = run_config_from_flower(context.run_config)
    results = run_on_grid(grid, config)
    report.write_run_report(results, config.output_dir)
