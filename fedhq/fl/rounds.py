"""A round's path, both engines: ``round_plan`` (what the server asks of a client),
the delivery (in this process: ``train_clients``; on Flower: fedhq.flower.strategy),
then ``close_round`` (validate, aggregate along the tree, the topology's round time).
``play_round`` is all three in this process (the adjustment's trials)."""

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
from fedhq.fl.timing import COST_STRATEGY, ClientDevice, ClientTime
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


def predicted_compute_s(c: Client, spec: ModelSpec, strategy: str, epochs: int, batchnorm: bool) -> float:
    """Eq. 1 of client ``c`` for ``strategy`` (fp32 costs as PTQ), in whole batches as trained."""
    estimate = c.device.speed.estimate(
        spec.key,
        COST_STRATEGY[strategy],
        alpha=c.alpha,
        beta=c.beta,
        samples=len(c.data),
        epochs=epochs,
        batch=c.batch,
        drop_single=batchnorm,
    )
    return estimate.time_s


@dataclass
class RoundContext:
    """Everything an in-process round reads and updates: the server's model and the
    clients' local state are changed in place."""

    config: RunConfig
    spec: ModelSpec
    server: Server
    clients: list[Client]
    states: dict[int, ClientState]
    topology: Topology
    train_fn: TrainFn


@dataclass
class Replies:
    """What a round's messages brought back: the updates, the clients left out on the
    way, each trained client's simulated cost, and the uploads of inner nodes that only
    forwarded their subtree's aggregate."""

    updates: list[Update]
    rejected: list[Rejection]
    times: dict[int, ClientTime]
    relay_upload_s: dict[int, float] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # engine-specific fields of the round's row


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
            "round": self.round,
            "accuracy": accuracy,
            "loss": loss,
            "wall_s": self.wall_s,
            "sim_s": self.sim_s,
            "sim_epoch_s": epoch_s,
            "upload_bytes": sum(u.nbytes for u in self.updates),
            "participants": self.accepted,
            "rejected": [x.as_dict() for x in self.rejected],
            "slowest_client": self.critical,
            "train_loss": sum(losses) / len(losses) if losses else None,
        }


def round_plan(config: RunConfig, r: int, strategy: str, batch: int) -> RoundPlan:
    return RoundPlan(
        round=r,
        strategy=strategy,
        epochs=config.local_epochs,
        batch_size=batch,
        lr=config.lr,
        momentum=config.momentum,
        bits=config.bits,
        seed=config.seed,
    )


def train_clients(ctx: RoundContext, plans: dict[int, RoundPlan]) -> Replies:
    """Delivery in this process: each planned client trains from the global model."""
    config = ctx.config
    global_weights = ctx.server.global_weights()
    clients = {c.id: c for c in ctx.clients}
    updates: list[Update] = []
    rejected: list[Rejection] = []
    times: dict[int, ClientTime] = {}
    for cid, plan in plans.items():
        c = clients[cid]
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
        times[c.id] = c.device.round_time(ctx.spec.key, plan.strategy, plan.batch_size, update.steps, update.nbytes)
    relay: dict[int, float] = {}
    if updates:  # an inner node that did not train still uploads its subtree's aggregate
        size = statistics.median(u.nbytes for u in updates)
        relay = {
            c.id: c.device.upload_seconds(size)
            for c in ctx.clients
            if c.id not in times and ctx.topology.children(c.id)
        }
    return Replies(updates, rejected, times, relay)


def close_round(server: Server, topology: Topology, r: int, replies: Replies, started: float) -> RoundOutcome:
    """The server's side of a round: validate and aggregate (in client order, along the
    tree), and the round's simulated time (``Topology.round_time``: it waits for every
    client that trained, accepted or not)."""
    updates = sorted(replies.updates, key=lambda u: u.client)
    accepted, bad = server.aggregate(updates, topology)
    upload = {cid: t.upload_s for cid, t in replies.times.items()} | replies.relay_upload_s
    sim_s, critical = topology.round_time({cid: t.compute_s for cid, t in replies.times.items()}, upload)
    return RoundOutcome(
        r,
        updates,
        accepted,
        replies.rejected + bad,
        replies.times,
        sim_s,
        critical,
        time.perf_counter() - started,
        dict(replies.extra),
    )


def play_round(ctx: RoundContext, r: int) -> RoundOutcome:
    """One whole round in this process with the clients' current strategies."""
    started = time.perf_counter()
    plans = {c.id: round_plan(ctx.config, r, c.strategy, c.batch) for c in ctx.clients if ctx.topology.trains[c.id]}
    return close_round(ctx.server, ctx.topology, r, train_clients(ctx, plans), started)
