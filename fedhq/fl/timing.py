"""A client's simulated time: T = steps * step_time(B) / beta (Eq. 1), the step time
this machine's measured one scaled to the client's device (``SpeedModel``), plus its
upload over the device's uplink. A round's time follows the tree:
``fedhq.fl.topology.Topology.round_time`` (docs/fl.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from fedhq.analysis.speed import SpeedModel
from fedhq_kernels.checks import is_real

# The cost model of each client strategy: fp32 clients train like PTQ clients, FedMPQ's
# bit-plane layers (mpq) at least like QAT's.
COST_STRATEGY = {"ptq": "ptq", "qat": "qat", "fp32": "ptq", "mpq": "qat"}


def upload_seconds(nbytes: int, uplink_mbps: float) -> float:
    """Seconds ``nbytes`` take over an uplink of ``uplink_mbps`` megabits per second."""
    return nbytes * 8 / (uplink_mbps * 1e6)


def upload_budget(upload_s: float, uplink_mbps: float) -> int:
    """The most whole bytes an uplink of ``uplink_mbps`` sends within ``upload_s``
    seconds: ``upload_seconds``'s inverse, rounded down so that it never exceeds them."""
    if not (is_real(upload_s) and upload_s >= 0):
        raise ValueError(f"upload_s must be a finite number of seconds >= 0, got {upload_s!r}")
    if not (is_real(uplink_mbps) and uplink_mbps > 0):
        raise ValueError(f"uplink_mbps must be a finite number > 0, got {uplink_mbps!r}")
    nbytes = math.floor(Fraction(upload_s) * Fraction(uplink_mbps) * 125_000)  # exact: 10^6 / 8 bytes per Mbit
    for _ in range(4):  # upload_seconds rounds in float: it may time the exact floor a hair over upload_s
        if nbytes == 0 or upload_seconds(nbytes, uplink_mbps) <= upload_s:
            break
        nbytes -= 1
    return nbytes


@dataclass
class ClientTime:
    compute_s: float
    upload_s: float

    @property
    def total_s(self) -> float:
        return self.compute_s + self.upload_s


class ClientDevice:
    """A client's device: its speed model (measured profile or preset, scaled from
    ``reference``), its compute share ``beta`` and its uplink."""

    def __init__(self, source: Any, reference: dict, *, beta: float, default_uplink_mbps: float):
        self.speed = SpeedModel(source, reference=reference)
        self.beta = beta
        network = self.speed.profile.get("network", {}).get("uplink_mbps", {})
        self.uplink_mbps = float(network.get("median", default_uplink_mbps))

    @property
    def name(self) -> str:
        return self.speed.device

    def compute_seconds(self, model_key: str, strategy: str, batch: int, steps: int) -> float:
        return steps * self.speed.step_time(model_key, COST_STRATEGY[strategy], batch) / self.beta

    def upload_seconds(self, nbytes: int) -> float:
        return upload_seconds(nbytes, self.uplink_mbps)

    def round_time(self, model_key: str, strategy: str, batch: int, steps: int, nbytes: int) -> ClientTime:
        return ClientTime(self.compute_seconds(model_key, strategy, batch, steps), self.upload_seconds(nbytes))
