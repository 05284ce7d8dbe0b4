"""FedHQStrategy: FedHQ's server as a Flower strategy (Message API).

Before training, a query round: ``configure_query`` sends every node the run's
settings and the server's reference profile; ``aggregate_query`` keeps each node
that answers with a finite T_m > 0 and Sig_acc and a partition of its own (anything
else is logged and leaves the node out of the run); ``allocate`` turns the answers
into Sig_speed (Eq. 2) and runs the embedded engine's allocation
(``fedhq.fl.engine.allocate``: ``global_init`` for fedhq; fedaqt, fedfq, fedrh and fp32
as baselines of the same strategy).

Every round, ``configure_train`` sends each node the global model with message type
``train.<its strategy>``; ``aggregate_train`` checks each reply (an error reply, an
unknown or repeated sender, malformed records) and hands the rest to
``fedhq.fl.server.Server``, which validates them as the embedded engine does and
aggregates with ``fedhq_kernels.aggregate_state_dicts``. A node with no reply before
the round's timeout is left out of that round. Flower's FedAvg helpers are not used:
they end the run on one malformed reply and would average raw int8 codes.

Replies are matched to nodes by the message they answer (``reply_to_message_id``),
not by their sender: when a node disconnects, the SuperLink answers for it with an
error reply whose sender is the SuperLink itself.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedhq.analysis.speed import speed_significance
from fedhq.fl import engine
from fedhq.fl.client import Update
from fedhq.fl.config import ConfigError, RunConfig
from fedhq.fl.rounds import RoundOutcome
from fedhq.fl.server import Rejection, Server
from fedhq.fl.timing import ClientTime, synchronous_round
from fedhq.flower.records import RecordError, decode_state, encode_state
from fedhq.models import ModelSpec

log = logging.getLogger("fedhq.flower")

# What a node says about itself in the query round, for the report: name -> type.
ABOUT = {"partition-id": int, "device": str, "device-name": str, "alpha": float, "beta": float, "batch": int,
         "samples": int}  # fmt: skip
TRAIN_METRICS = ("num-examples", "train-loss", "steps", "wall-s", "compute-s", "upload-s")


@dataclass
class Member:
    """A node the query round admitted: client ``client`` of the run."""

    node_id: int
    client: int
    time_s: float
    acc_sig: float
    about: dict
    strategy: str = ""


class FedHQStrategy(Strategy):
    """The server of a FedHQ run on a Flower grid; ``config`` is the run's settings,
    ``reference`` the measured profile the nodes' speed models are scaled from."""

    def __init__(self, config: RunConfig, spec: ModelSpec, reference: dict):
        if config.topology is not None or config.adjust:
            raise ConfigError("the Flower engine runs flat systems without --adjust (use the embedded engine)")
        self.config, self.reference = config, reference
        self.server = Server.for_run(config, engine.initial_model(config, spec))
        self.members: dict[int, Member] = {}
        self.excluded: list[dict] = []
        self.client_rows: list[dict] = []
        self.outcome: RoundOutcome | None = None
        self._sent: list[tuple[Message, int]] = []  # (message, node id) of the round under way
        self._round_started = 0.0

    # ---- the query round ----

    def configure_query(self, node_ids: Iterable[int]) -> list[Message]:
        setup = ConfigRecord({"run-config": json.dumps(self.config.to_dict()), "reference": json.dumps(self.reference)})
        return self._track([(Message(RecordDict({"setup": setup}), dst_node_id=nid, message_type=MessageType.QUERY), nid)
                            for nid in node_ids])  # fmt: skip

    def aggregate_query(self, replies: Iterable[Message]) -> None:
        """Admits every node with a usable answer; logs and records the others."""
        expected, answered = {nid for _, nid in self._sent}, set()
        by_client: dict[int, Member] = {}
        for msg, nid in self._match(replies, "query round"):
            answered.add(nid)
            member, reason = _read_answer(msg, nid, self.config.clients)
            if member is not None and member.client in by_client:
                reason = f"partition {member.client} is already node {by_client[member.client].node_id}'s"
            if reason:
                self._exclude(nid, reason)
            else:
                by_client[member.client] = member
        for nid in sorted(expected - answered):
            self._exclude(nid, "no answer to the query round")
        self.members = {m.node_id: m for _, m in sorted(by_client.items())}

    def allocate(self) -> list[str]:
        """PTQ/QAT per admitted node (in partition order), as the embedded engine allocates."""
        if not self.members:
            raise RuntimeError("no node answered the query round usably: nothing to train")
        members = list(self.members.values())
        times, acc_sig = [m.time_s for m in members], [m.acc_sig for m in members]
        speed_sig = speed_significance(times)
        strategies = engine.allocate(self.config, speed_sig, acc_sig)
        norm_speed, norm_acc = engine.normalized_significance(self.config, speed_sig, acc_sig)
        self.client_rows = []
        for i, (m, strategy) in enumerate(zip(members, strategies)):
            m.strategy = strategy
            a = m.about
            self.client_rows.append({
                "id": m.client, "node_id": m.node_id, "device": a["device"], "device_name": a["device-name"],
                "alpha": a["alpha"], "beta": a["beta"], "samples": a["samples"], "batch": a["batch"],
                "strategy": strategy, "speed_time_s": m.time_s, "speed_sig": speed_sig[i], "acc_sig": m.acc_sig,
                "norm_speed": norm_speed[i], "norm_acc": norm_acc[i],
            })  # fmt: skip
        return strategies

    # ---- training rounds ----

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per admitted node. The model sent is the strategy's own global
        state with its layout (an ArrayRecord alone cannot say how it is quantized), so
        ``arrays`` is not read; ``config`` travels in the message's "plan"."""
        self._round_started = time.perf_counter()
        global_arrays, layout = encode_state(self.server.state)
        plan = ConfigRecord({**config, "round": server_round})
        return self._track([
            (Message(RecordDict({"global": global_arrays, "layout": layout, "plan": plan}), dst_node_id=m.node_id,
                     message_type=f"{MessageType.TRAIN}.{m.strategy}", group_id=str(server_round)), m.node_id)
            for m in self.members.values()
        ])  # fmt: skip

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregates the usable replies into the global model; ``self.outcome`` keeps
        the round (updates, rejections, simulated times) for the results."""
        updates: list[Update] = []
        rejected: list[Rejection] = []
        times: dict[int, ClientTime] = {}
        record_bytes, seen = 0, set()
        for msg, nid in self._match(replies, f"round {server_round}"):
            member = self.members[nid]
            seen.add(nid)
            if msg.has_error():
                rejected.append(Server.reject(member.client, f"node error {msg.error.code}: {msg.error.reason}"))
                continue
            try:
                update, cost, size = _read_update(member.client, msg.content)
            except RecordError as error:
                rejected.append(Server.reject(member.client, f"malformed reply: {error}"))
                continue
            updates.append(update)
            times[member.client] = cost
            record_bytes += size
        for m in self.members.values():
            if m.node_id not in seen:
                rejected.append(Server.reject(m.client, "no reply before the round's timeout (disconnected or too slow)"))
        updates.sort(key=lambda u: u.client)  # arrival order varies: aggregate in the embedded engine's order
        accepted, bad = self.server.aggregate(updates)
        sim_s, slowest = synchronous_round(times)
        self.outcome = RoundOutcome(server_round, updates, accepted, rejected + bad, times, sim_s, slowest,
                                    time.perf_counter() - self._round_started, {"record_bytes": record_bytes})  # fmt: skip
        arrays, _ = encode_state(self.server.state)
        return arrays, MetricRecord({"accepted": len(accepted), "rejected": len(rejected) + len(bad)})

    # ---- evaluation happens on the server (the embedded engine's test split) ----

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        counts = {s: sum(m.strategy == s for m in self.members.values()) for s in ("ptq", "qat", "fp32")}
        log.info("FedHQStrategy: %s, %d nodes %s, %d excluded", self.config.strategy, len(self.members), counts,
                 len(self.excluded))  # fmt: skip

    def _track(self, sent: list[tuple[Message, int]]) -> list[Message]:
        self._sent = sent
        return [msg for msg, _ in sent]

    def _match(self, replies: Iterable[Message], where: str) -> list[tuple[Message, int]]:
        """(reply, node id) for the first reply to each message sent. The grid gives a
        message its id when it pushes it, so ids are read here, after sending."""
        pending = {msg.metadata.message_id: nid for msg, nid in self._sent}
        matched = []
        for reply in replies:
            nid = pending.pop(reply.metadata.reply_to_message_id, None)
            if nid is None:
                log.warning("%s: ignoring a reply to no message of this round (from node %d)", where,
                            reply.metadata.src_node_id)  # fmt: skip
            elif not reply.has_error() and reply.metadata.src_node_id != nid:
                log.warning("%s: node %d answered the message sent to node %d", where, reply.metadata.src_node_id, nid)
            else:
                matched.append((reply, nid))
        return matched

    def _exclude(self, node_id: int, reason: str) -> None:
        log.warning("node %d left out of the run: %s", node_id, reason)
        self.excluded.append({"node_id": node_id, "reason": reason})


def _read_answer(msg: Message, node_id: int, clients: int) -> tuple[Member | None, str | None]:
    """(member, None) for a usable query answer, else (None, why not)."""
    if msg.has_error():
        return None, f"node error {msg.error.code}: {msg.error.reason}"
    significance, about = msg.content.get("significance"), msg.content.get("node")
    if not isinstance(significance, MetricRecord) or not isinstance(about, ConfigRecord):
        return None, "the answer lacks its 'significance' MetricRecord or 'node' ConfigRecord"
    time_s, acc = significance.get("time-s"), significance.get("acc")
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (time_s, acc)) or time_s <= 0:
        return None, f"significance must be finite (T_m > 0), got T_m={time_s!r}, Sig_acc={acc!r}"
    wrong = [k for k, kind in ABOUT.items() if not isinstance(about.get(k), kind) or isinstance(about.get(k), bool)]
    if wrong:
        return None, f"the node description lacks or mistypes {wrong}"
    if not 0 <= about["partition-id"] < clients:
        return None, f"partition-id {about['partition-id']} is outside [0, {clients})"
    info = {k: about[k] for k in ABOUT}
    return Member(node_id, about["partition-id"], float(time_s), float(acc), info), None


def _read_update(client: int, content: RecordDict) -> tuple[Update, ClientTime, int]:
    """(update, simulated time, records' bytes) of a training reply; RecordError if malformed."""
    arrays, layout, metrics = content.get("update"), content.get("layout"), content.get("metrics")
    if not isinstance(metrics, MetricRecord):
        raise RecordError("the reply has no 'metrics' MetricRecord")
    missing = [k for k in TRAIN_METRICS if not isinstance(metrics.get(k), (int, float))]
    if missing:
        raise RecordError(f"metrics {missing} missing")
    costs = [float(metrics[k]) for k in ("compute-s", "upload-s")]
    if not all(math.isfinite(c) and c >= 0 for c in costs):
        raise RecordError(f"simulated times must be finite and >= 0, got {costs}")
    state = decode_state(arrays, layout)
    update = Update(client, state, metrics["num-examples"], float(metrics["train-loss"]), int(metrics["steps"]),
                    float(metrics["wall-s"]))  # fmt: skip
    return update, ClientTime(*costs), arrays.count_bytes() + layout.count_bytes() + metrics.count_bytes()
