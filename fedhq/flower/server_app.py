"""The FedHQ ServerApp, and the run loop that both Flower engines share.

``run_on_grid(grid, config)`` is the embedded engine's ``run`` over a Flower grid:
the same setup (data for the server's evaluation, model, reference profile, initial
model), a query round and the allocation (``FedHQStrategy``), then synchronous
rounds, the global model evaluated on the test split after each (float and deployed:
``engine.evaluate_global``), and
output_dir/results.json in the embedded engine's schema (fedhq.run/2), with
``"engine": "flower"``, the nodes left out of the run under ``"excluded"`` and each
round's ``record_bytes``: the bytes of the usable replies' records as Flower counts
them.

``app`` is the ServerApp that ``flwr run`` starts in a deployment; its settings come
from the Flower run config (``run_config_from_flower``).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedhq.fl import engine
from fedhq.fl.config import ConfigError, RunConfig
from fedhq.fl.topology import Topology
from fedhq.flower.strategy import FedHQStrategy

# Used when the run sets no client_timeout_s: how long a round waits for replies.
DEFAULT_ROUND_TIMEOUT_S = 600.0
# How long the run waits for its nodes to connect to the SuperLink.
NODE_WAIT_S = 120.0
LIST_SETTINGS = {"devices": str, "alphas": float, "betas": float}

app = ServerApp()


def echo_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_on_grid(grid: Grid, config: RunConfig, *, echo: Callable[[str], None] = echo_stderr) -> dict:
    """Runs ``config`` on the nodes of ``grid``; returns the results (also written to
    output_dir/results.json)."""
    config = config.validated()
    torch.set_num_threads(config.threads)
    out = Path(config.output_dir)
    started = time.perf_counter()
    dataset = engine.load_data(config)
    spec = engine.model_spec(config, dataset)
    reference, reference_path = engine.reference_profile(config, spec, out, echo)
    calibration_x = engine.calibration_images(config, dataset)
    strategy = FedHQStrategy(config, spec, reference)
    node_ids = wait_for_nodes(grid, config.clients, NODE_WAIT_S, echo)
    setup_s = time.perf_counter() - started
    timeout = config.client_timeout_s or DEFAULT_ROUND_TIMEOUT_S

    t0 = time.perf_counter()
    strategy.aggregate_query(grid.send_and_receive(strategy.configure_query(node_ids), timeout=timeout))
    analysis_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    strategies = strategy.allocate()
    allocation_s = time.perf_counter() - t0
    strategy.summary()
    echo(f"{config.strategy} on Flower: {dataset.summary()}; model {spec.key}; {len(strategies)} nodes "
         f"({strategies.count('ptq')} PTQ, {strategies.count('qat')} QAT), {len(strategy.excluded)} left out")  # fmt: skip

    history: list[dict] = []
    for r in range(1, config.rounds + 1):
        messages = strategy.configure_train(r, ArrayRecord(), ConfigRecord(), grid)
        strategy.aggregate_train(r, grid.send_and_receive(messages, timeout=timeout))
        outcome = strategy.outcome
        metrics = engine.evaluate_global(spec, strategy.server, dataset.test, calibration_x)
        row = outcome.row(metrics["accuracy"], metrics["loss"], config.local_epochs) | metrics
        row = engine.add_round(history, row)
        row["record_bytes"] = outcome.extra["record_bytes"]
        engine.echo_progress(echo, row, config.rounds)

    timing = {"setup_s": setup_s, "analysis_s": analysis_s, "allocation_s": allocation_s, "adjustment_s": 0.0,
              "training_s": sum(h["wall_s"] for h in history)}  # fmt: skip
    results = engine.results_document(config, spec, dataset.name, strategy.client_rows, strategies,
                                      Topology.flat(config.clients), None, history, timing, reference_path)  # fmt: skip
    results["engine"] = "flower"
    results["excluded"] = strategy.excluded
    out.mkdir(parents=True, exist_ok=True)
    (out / engine.RESULTS_FILE).write_text(json.dumps(results, indent=1) + "\n")
    return results


def wait_for_nodes(grid: Grid, wanted: int, wait_s: float, echo: Callable[[str], None]) -> list[int]:
    """The connected nodes' ids once ``wanted`` are connected, or those connected
    after ``wait_s`` seconds (at least one)."""
    deadline = time.monotonic() + wait_s
    while True:
        node_ids = sorted(grid.get_node_ids())
        if len(node_ids) >= wanted or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if not node_ids:
        raise RuntimeError(f"no node connected within {wait_s:.0f} s")
    if len(node_ids) < wanted:
        echo(f"only {len(node_ids)} of {wanted} nodes connected within {wait_s:.0f} s; going on with them")
    return node_ids


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
