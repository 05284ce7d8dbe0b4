"""The federated layer: clients, server, simulated heterogeneous time, and the run
driver of both engines (``fedhq.fl.engine.run``; Flower: fedhq.flower). ``run`` is
imported on first use, so checking a config does not load the engine."""

from fedhq.fl.config import STRATEGIES, ConfigError, RunConfig

__all__ = ["STRATEGIES", "ConfigError", "RunConfig", "run"]


def __getattr__(name: str):
    if name == "run":
        from fedhq.fl.engine import run

        return run
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
