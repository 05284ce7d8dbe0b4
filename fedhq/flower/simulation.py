"""``fedhq run --engine flower``: a run on Flower's simulation engine in this process.

The ServerApp runs ``run_on_grid`` in a thread here; the ClientApp runs in Ray actors
of ``config.threads`` CPUs each (Ray sets OMP_NUM_THREADS to an actor's CPUs), as many
at once as this machine's cores hold: one at a time on a 2-core machine with the default
2 threads. Every client then trains with the embedded engine's thread count, so both
engines do the same float arithmetic and give the same numbers (measured: with 1-thread
actors against 2 embedded threads, accuracies after one round differed by up to 5
points on 2 clients). ``flwr.simulation.run_simulation`` is deprecated in favour of ``flwr run``,
which installs the app's dependencies at run time and leaves a SuperLink running; the
in-process API does neither.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from fedhq.fl.config import RunConfig
from fedhq.flower import client_app
from fedhq.flower.server_app import echo_stderr, run_on_grid


def run(config: RunConfig, *, echo: Callable[[str], None] = echo_stderr) -> dict:
    """Runs ``config`` with ``config.clients`` simulated nodes; returns the results
    (also written to output_dir/results.json)."""
    config = config.validated()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    done: dict = {}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        done["results"] = run_on_grid(grid, config, echo=echo)

    cpus = max(config.threads, os.cpu_count() or 1)
    backend = {"client_resources": {"num_cpus": config.threads, "num_gpus": 0.0}, "init_args": {"num_cpus": cpus}}
    run_simulation(server, client_app.app, num_supernodes=config.clients, backend_config=backend)
    if "results" not in done:
        raise RuntimeError("the Flower simulation ended without results (its log above says why)")
    return done["results"]
