"""A round's path, both engines: ``round_plan`` (what the server asks of a client),
the delivery (in this process: ``train_clients``; on Flower: fedhq.flower.strategy),
each update validated and aggregated as it arrives, then ``close_round`` (the new
global model, the topology's round time).
``play_round`` is all three in this process (the adjustment's trials)."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from torch import Tensor

import fedhq_kernels as fk
from fedhq.data.base import Split
from fedhq.fl.client import ClientState, RoundPlan, Update
from fedhq.fl.config import RunConfig
from fedhq.fl.server import Rejection, RoundIntake, Server
from fedhq.fl.timing import COST_STRATEGY, ClientDevice, ClientTime
from fedhq.fl.topology import Topology
from fedhq.models import ModelSpec
from fedhq_kernels.checks import MIN_BITS

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


@dataclass(frozen=True)
class Received:
    """What a round keeps of an update once the server has taken it in: its state only
    where the adjustment needs it (``keeps_states``), else None, so the round holds
    O(model) (docs/fl.md, "Streaming aggregation")."""

    client: int
    num_samples: int
    train_loss: float
    nbytes: int
    state: dict | None
    bits: dict[str, int]  # the width of each quantized entry of the update
    weight_bits: float  # its bits per weight: of the quantized entries, by size (32: a float upload)

    @classmethod
    def of(cls, update: Update, keep_state: bool) -> Received:
        state = update.state if keep_state else None
        entries = update.state.items() if isinstance(update.state, Mapping) else ()  # a bad update is rejected
        quantized = {k: v for k, v in entries if isinstance(v, fk.QuantizedTensor)}
        sizes = {k: math.prod(q.shape) for k, q in quantized.items()}
        total = sum(sizes.values())
        weight_bits = sum(q.bits * sizes[k] for k, q in quantized.items()) / total if total else 32.0
        bits = {k: q.bits for k, q in quantized.items()}
        return cls(update.client, update.num_samples, update.train_loss, update.nbytes, state, bits, weight_bits)


def keeps_states(config: RunConfig, r: int) -> bool:
    """Round ``r``'s updates are kept whole: the adjustment leaves each out in turn."""
    return config.adjust and r == config.adjust_after


@dataclass
class Replies:
    """What a round's messages brought back: the round's aggregation, fed as each
    update arrived, what was kept of the updates, the clients left out on the way, each
    trained client's simulated cost, and the uploads of inner nodes that only forwarded
    their subtree's aggregate."""

    intake: RoundIntake
    updates: list[Received]
    rejected: list[Rejection]
    times: dict[int, ClientTime]
    relay_upload_s: dict[int, float] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # engine-specific fields of the round's row


class InClientOrder:
    """A reorder buffer: replies go in as they arrive and come out in client order, so
    the running mean's float32 rounding (fedhq_kernels.mean) never depends on network
    timing. A reply waits only for those of the clients planned before it; ``skip``
    says a client will not reply (timed out). ``peak`` is the most replies held at once."""

    def __init__(self, clients: list[int]):
        self._order = sorted(clients)
        self._next = 0
        self._unheard = set(clients)
        self._held: dict[int, object] = {}
        self._gone: set[int] = set()
        self.peak = 0

    def put(self, client: int, reply: object) -> list[tuple[int, object]]:
        """Takes ``client``'s reply; returns the replies now due, in client order."""
        self._hear(client)
        self._held[client] = reply
        self.peak = max(self.peak, len(self._held))
        return self._due()

    def skip(self, client: int) -> list[tuple[int, object]]:
        """``client`` will not reply; returns the replies that were waiting for it."""
        self._hear(client)
        self._gone.add(client)
        return self._due()

    def _hear(self, client: int) -> None:
        """A reply held for a client out of the order, or a second one, would never come out."""
        if client not in self._unheard:
            known = client in self._order
            raise ValueError(f"client {client} " + ("replied twice" if known else "is not a client of this round"))
        self._unheard.remove(client)

    def _due(self) -> list[tuple[int, object]]:
        due = []
        while self._next < len(self._order):
            client = self._order[self._next]
            if client in self._held:
                due.append((client, self._held.pop(client)))
            elif client not in self._gone:
                break
            self._next += 1
        return due


@dataclass
class RoundOutcome:
    round: int
    updates: list[Received]
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
            "weight_bits": statistics.mean(u.weight_bits for u in self.updates) if self.updates else None,
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
    """Delivery in this process: each planned client trains from the global model,
    and the server takes its update in as soon as it is done."""
    config, server = ctx.config, ctx.server
    clients = {c.id: c for c in ctx.clients}
    intake = server.open_round(ctx.topology, upload_bits(server, plans))
    downloads = Downloads(server)
    updates: list[Received] = []
    rejected: list[Rejection] = []
    times: dict[int, ClientTime] = {}
    for cid, plan in plans.items():
        c = clients[cid]
        try:
            global_weights = downloads.weights(plan)
            update, new_state = ctx.train_fn(ctx.spec, global_weights, c.data, plan, c.id, ctx.states[c.id])
        except Exception as error:  # a failing client must not end the round
            rejected.append(Server.reject(c.id, f"client raised {type(error).__name__}: {error}"))
            continue
        if config.client_timeout_s is not None and update.wall_s > config.client_timeout_s:
            rejected.append(Server.reject(c.id, f"timed out: {update.wall_s:.2f} s > {config.client_timeout_s} s"))
            continue
        ctx.states[c.id] = new_state
        intake.offer(update)
        updates.append(Received.of(update, keeps_states(config, plan.round)))
        times[c.id] = c.device.round_time(ctx.spec.key, plan.strategy, plan.batch_size, update.steps, update.nbytes)
        del update  # the server has it: nothing here holds the state any more
    relay: dict[int, float] = {}
    if updates:  # an inner node that did not train still uploads its subtree's aggregate
        size = statistics.median(u.nbytes for u in updates)
        relay = {
            c.id: c.device.upload_seconds(size)
            for c in ctx.clients
            if c.id not in times and ctx.topology.children(c.id)
        }
    return Replies(intake, updates, rejected, times, relay)


def upload_bits(server: Server, plans: dict[int, RoundPlan]) -> dict[int, dict[str, int | range]]:
    """The bits each planned client must upload each quantized entry at, which the
    server checks its update against: its plan's; a FedMPQ client (``mpq``) may have
    pruned a layer to fewer, down to the narrowest width."""
    expected: dict[int, dict[str, int | range]] = {}
    for cid, plan in plans.items():
        bits = plan.upload_map(server.quantized)
        expected[cid] = {n: range(MIN_BITS, b + 1) for n, b in bits.items()} if plan.strategy == "mpq" else bits
    return expected


class Downloads:
    """The global model at the bits a round asks for (``Server.download``), made once
    per distinct bit map in a round."""

    def __init__(self, server: Server):
        self.server = server
        self._states: dict[tuple, dict] = {}
        self._weights: dict[int, dict] = {}  # id of a state in _states -> it dequantized

    def at(self, bits: Mapping[str, int] | None) -> dict:
        """The global model quantized at ``bits`` (None: as the server holds it)."""
        key = () if bits is None else tuple(sorted(bits.items()))
        if key not in self._states:
            self._states[key] = self.server.download(bits)
        return self._states[key]

    def state(self, plan: RoundPlan) -> dict:
        """The quantized state dict sent to ``plan``'s client."""
        return self.at(plan.download_map(self.server.quantized))

    def weights(self, plan: RoundPlan) -> dict[str, Tensor]:
        """What the client loads: that state dict dequantized."""
        sent = self.state(plan)
        if id(sent) not in self._weights:
            self._weights[id(sent)] = fk.dequantize_state_dict(sent)
        return self._weights[id(sent)]


def close_round(topology: Topology, r: int, replies: Replies, started: float) -> RoundOutcome:
    """The server's side of a round: install the aggregate of the updates taken in as
    they arrived (``RoundIntake``), and the round's simulated time
    (``Topology.round_time``: it waits for every client that trained, accepted or not)."""
    updates = sorted(replies.updates, key=lambda u: u.client)
    accepted, bad = replies.intake.close()
    accepted = sorted(accepted)
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
    return close_round(ctx.topology, r, train_clients(ctx, plans), started)
