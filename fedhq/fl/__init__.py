"""The federated layer: clients, server, simulated heterogeneous time and the embedded
round loop (``fedhq.fl.engine.run``). The Flower adapter (fedhq.flower) reuses the
same client and server code."""

from fedhq.fl.config import STRATEGIES, ConfigError, RunConfig
from fedhq.fl.engine import run

__all__ = ["STRATEGIES", "ConfigError", "RunConfig", "run"]
