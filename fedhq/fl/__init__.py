"""The federated layer: clients, server, simulated heterogeneous time, and the run
driver of both engines (``fedhq.fl.engine.run``; Flower: fedhq.flower)."""

from fedhq.fl.config import STRATEGIES, ConfigError, RunConfig
from fedhq.fl.engine import run

__all__ = ["STRATEGIES", "ConfigError", "RunConfig", "run"]
