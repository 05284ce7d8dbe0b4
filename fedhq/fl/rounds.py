"""One synchronous round over a (flat or hierarchical) system: every training client
trains from the global model and uploads; the server validates and aggregates along
the tree; the simulated time follows the tree. Used by the main run and, on
snapshots, by the adjustment's candidate trials."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fedhq.data.base import Split
from fedhq.fl.client import ClientState, RoundPlan, Update
from fedhq.fl.config import RunConfig
from fedhq.fl.server import Rejection, Server
from fedhq.fl.timing import ClientDevice, ClientTime
from fedhq.fl.topology import Topology
from fedhq.models import ModelSpec

TrainFn = Callable[..., tuple[Update, ClientState]]


@dataclass
class Client:
    id: int
    data: Split
    device: ClientDevice
    device_source: str
    alpha: float
    beta: float
    batch: int
    strategy: str = "ptq"


@dataclass
class RoundContext:
    """Everything a round reads and updates: the server's model and the clients'
    local state are changed in place."""

    config: RunConfig
    spec: ModelSpec
    server: Server
    clients: list[Client]
    states: dict[int, ClientState]
    topology: Topology
    train_fn: TrainFn


@dataclass
class RoundOutcome:
    round: int
    updates: list[Update]
    accepted: list[int]
    rejected: list[Rejection]
    times: dict[int, ClientTime]
    sim_s: float
    critical: int | None
    wall_s: float
    extra: dict = field(default_factory=dict)

    def row(self, accuracy: float, loss: float, epochs: int) -> dict:
        """The round's line of results.json."""
        epoch_s = max((t.compute_s for t in self.times.values()), default=0.0) / epochs
        losses = [u.train_loss for u in self.updates if u.client in self.accepted and math.isfinite(u.train_loss)]
        return {
            "round": self.round, "accuracy": accuracy, "loss": loss, "wall_s": self.wall_s, "sim_s": self.sim_s,
            "sim_epoch_s": epoch_s, "upload_bytes": sum(u.nbytes for u in self.updates), "participants": self.accepted,
            "rejected": [x.as_dict() for x in self.rejected], "slowest_client": self.critical,
            "train_loss": sum(losses) / len(losses) if losses else None,
        }  # fmt: skip


def play_round(ctx: RoundContext, r: int) -> RoundOutcome:
    started = time.perf_counter()
    config = ctx.config
    global_weights = ctx.server.global_weights()
    updates: list[Update] = []
    rejected: list[Rejection] = []
    times: dict[int, ClientTime] = {}
    for c in ctx.clients:
        if not ctx.topology.trains[c.id]:
            continue
        plan = RoundPlan(round=r, strategy=c.strategy, epochs=config.local_epochs, batch_size=c.batch, lr=config.lr,
                         momentum=config.momentum, bits=config.bits, seed=config.seed)  # fmt: skip
        try:
            update, new_state = ctx.train_fn(ctx.spec, global_weights, c.data, plan, c.id, ctx.states[c.id])
        except Exception as error:  # a failing client must not end the round
            rejected.append(Server.reject(c.id, f"client raised {type(error).__name__}: {error}"))
            continue
        if config.client_timeout_s is not None and update.wall_s > config.client_timeout_s:
            rejected.append(Server.reject(c.id, f"timed out: {update.wall_s:.2f} s > {config.client_timeout_s} s"))
            continue
        ctx.states[c.id] = new_state
        updates.append(update)
        times[c.id] = c.device.round_time(ctx.spec.key, c.strategy, c.batch, update.steps, update.nbytes)
    accepted, bad = ctx.server.aggregate(updates, ctx.topology)
    rejected.extend(bad)
    # the synchronous round waits for every client that trained, accepted or not; an
    # inner node that does not train still uploads its subtree's aggregate
    upload = {cid: t.upload_s for cid, t in times.items()}
    if updates:
        size = statistics.median(u.nbytes for u in updates)
        for c in ctx.clients:
            if c.id not in upload and ctx.topology.children(c.id):
                upload[c.id] = c.device.upload_seconds(size)
    sim_s, critical = ctx.topology.round_time({cid: t.compute_s for cid, t in times.items()}, upload)
    return RoundOutcome(r, updates, accepted, rejected, times, sim_s, critical, time.perf_counter() - started)
