"""FedHQStrategy: the Flower transport of the run driver (``fedhq.fl.engine.run``).

It turns the driver's query and round plans into Flower messages, pushes them to the
grid and reads the replies strictly as they come in, offering each training reply to
the round's aggregation in client order; the driver times, evaluates and checkpoints
as for the embedded engine (docs/flower.md, "Server memory").
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator

from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedhq.fl.client import RoundPlan, Update
from fedhq.fl.config import ConfigError
from fedhq.fl.engine import Answer, Setup
from fedhq.fl.rounds import Downloads, InClientOrder, Received, Replies, RoundOutcome, upload_bits
from fedhq.fl.server import MAX_SAMPLES, Server
from fedhq.fl.timing import ClientTime
from fedhq.flower.records import Expected, RecordError, decode_state, encode_state, expect
from fedhq_kernels.checks import MAX_BITS, MIN_BITS, is_int, is_real, valid_bits

log = logging.getLogger("fedhq.flower")

# Used when the run sets no client_timeout_s: how long a round waits for replies.
DEFAULT_ROUND_TIMEOUT_S = 600.0
# How often a round asks the SuperLink for replies that came in.
PULL_INTERVAL_S = 0.1
# How long the run waits for its nodes to connect to the SuperLink.
NODE_WAIT_S = 120.0
# What a node says about itself in the query round (its client row): name -> type.
ABOUT = {
    "partition-id": int,
    "device": str,
    "device-name": str,
    "bit-budget": int,
    "alpha": float,
    "beta": float,
    "batch": int,
    "samples": int,
}
TRAIN_METRICS = ("num-examples", "train-loss", "steps", "wall-s", "compute-s", "upload-s")
# Bounds of a reply's steps and of its seconds (wall-s, compute-s, upload-s): beyond
# them a metric is absurd, and the reply is left out (docs/flower.md).
MAX_STEPS = 2**31 - 1
MAX_SECONDS = 1e9
# The round plan's fields in a training message ("strategy" travels as the message
# type; the optional ones as JSON, PLAN_JSON_FIELDS: None travels).
PLAN_FIELDS = {
    "round": "round",
    "epochs": "epochs",
    "batch-size": "batch_size",
    "lr": "lr",
    "momentum": "momentum",
    "bits": "bits",
    "seed": "seed",
}
PLAN_JSON_FIELDS = {"upload-bits": "upload_bits", "download-bits": "download_bits", "act-bits": "act_bits"}


def plan_record(plan: RoundPlan) -> dict:
    """A round plan as a training message's ConfigRecord values (``read_plan`` inverts it)."""
    values = {key: getattr(plan, attr) for key, attr in PLAN_FIELDS.items()}
    for key, attr in PLAN_JSON_FIELDS.items():
        values[key] = json.dumps(getattr(plan, attr))
    return values


def read_plan(strategy: str, values: ConfigRecord) -> RoundPlan:
    """The round plan of a training message (what ``plan_record`` wrote)."""
    maps = {attr: json.loads(values[key]) for key, attr in PLAN_JSON_FIELDS.items()}
    return RoundPlan(strategy=strategy, **{attr: values[key] for key, attr in PLAN_FIELDS.items()}, **maps)


class FedHQStrategy:
    """The clients of a run are the nodes of ``grid``: one admitted node per partition."""

    name = "flower"

    def __init__(self, grid: Grid, setup: Setup, *, node_wait_s: float = NODE_WAIT_S):
        config = setup.config
        if config.topology is not None or config.adjust:
            raise ConfigError("the Flower engine runs flat systems without --adjust (use the embedded engine)")
        if config.strategy == "fedmpq":  # its clients may prune: replies of widths decode_state cannot expect
            raise ConfigError("the Flower engine does not run fedmpq yet (use the embedded engine)")
        self.grid, self.config, self.reference = grid, config, setup.reference
        self.timeout = config.client_timeout_s or DEFAULT_ROUND_TIMEOUT_S
        self.node_ids = wait_for_nodes(grid, config.clients, node_wait_s, setup.echo)
        self.nodes: dict[int, int] = {}  # client (partition) -> node id, of the admitted nodes
        self.excluded: list[dict] = []
        self._sent: list[tuple[Message, int]] = []  # (message, node id) of the exchange under way

    # ---- the query round ----

    def analyze(self) -> list[Answer]:
        """Asks every node for its analysis; admits each node with a usable answer and
        a partition of its own, logs and records the others."""
        setup = ConfigRecord({"run-config": json.dumps(self.config.to_dict()), "reference": json.dumps(self.reference)})
        sent = self._track(
            [
                (Message(RecordDict({"setup": setup}), dst_node_id=nid, message_type=MessageType.QUERY), nid)
                for nid in self.node_ids
            ]
        )
        replies = self.grid.send_and_receive(sent, timeout=self.timeout)
        expected, answered = {nid for _, nid in self._sent}, set()
        by_client: dict[int, tuple[int, Answer]] = {}
        for msg, nid in self._match(replies, "query round", self._waiting()):
            answered.add(nid)
            answer, reason = _read_answer(msg, nid, self.config.clients)
            if answer is not None and answer.client in by_client:
                reason = f"partition {answer.client} is already node {by_client[answer.client][0]}'s"
            if reason:
                self._exclude(nid, reason)
            else:
                by_client[answer.client] = nid, answer
        for nid in sorted(expected - answered):
            self._exclude(nid, "no answer to the query round")
        if not by_client:
            raise RuntimeError("no node answered the query round usably: nothing to train")
        self.nodes = {client: nid for client, (nid, _) in sorted(by_client.items())}
        return [answer for _, (_, answer) in sorted(by_client.items())]

    # ---- training rounds ----

    def train(self, server: Server, plans: dict[int, RoundPlan]) -> Replies:
        """Sends each planned node the global model (arrays + layout) and its plan, as
        message type ``train.<strategy>``; reads the replies. A node with no reply
        before the timeout is left out of the round."""
        downloads, encoded = Downloads(server), {}
        messages = []
        for client, plan in plans.items():
            sent = downloads.state(plan)
            if id(sent) not in encoded:  # one encoding per distinct model sent
                encoded[id(sent)] = encode_state(sent)
            global_arrays, layout = encoded[id(sent)]
            record = ConfigRecord(plan_record(plan))
            content = RecordDict({"global": global_arrays, "layout": layout, "plan": record})
            messages.append(
                (
                    Message(
                        content,
                        dst_node_id=self.nodes[client],
                        group_id=str(plan.round),
                        message_type=f"{MessageType.TRAIN}.{plan.strategy}",
                    ),
                    self.nodes[client],
                )
            )
        round_name = f"round {next(iter(plans.values())).round}" if plans else "round"
        clients = {nid: client for client, nid in self.nodes.items()}
        bits = upload_bits(server, plans)
        replies = Replies(server.open_round(upload_bits=bits), [], [], {}, extra={"record_bytes": 0})
        layouts: dict[int, Expected] = {}  # one per distinct upload bit map
        expected = {}
        for client in plans:
            model = downloads.at(bits[client])  # the layout its reply must have
            if id(model) not in layouts:
                layouts[id(model)] = expect(model)
            expected[client] = layouts[id(model)]
        order = InClientOrder(list(plans))
        for client, msg in self._receive(messages, round_name, order, clients):
            self._take(client, msg, expected[client], replies)
        replies.extra["replies_held_peak"] = order.peak
        return replies

    def _receive(
        self, messages: list[tuple[Message, int]], where: str, order: InClientOrder, clients: dict[int, int]
    ) -> Iterator[tuple[int, Message | None]]:
        """Pushes ``messages`` and pulls their replies until all are in or the timeout
        passes; yields (client, reply) in client order as each becomes due, and
        (client, None) for a node with no reply in time. A reply is held only while a
        client before it has not replied (docs/flower.md, "Server memory")."""
        self.grid.push_messages(self._track(messages))
        waiting = self._waiting()
        deadline = time.monotonic() + self.timeout
        while waiting:
            for reply, nid in self._match(self.grid.pull_messages(list(waiting)), where, waiting):
                yield from order.put(clients[nid], reply)
            if not waiting or time.monotonic() >= deadline:
                break
            time.sleep(PULL_INTERVAL_S)
        for nid in waiting.values():
            yield clients[nid], None
            yield from order.skip(clients[nid])

    def _take(self, client: int, msg: Message | None, expected: Expected, replies: Replies) -> None:
        """Reads one training reply into the round (aggregated at once, then dropped)
        or records why it was left out."""
        if msg is None:
            reason = "no reply before the round's timeout (disconnected or too slow)"
            replies.rejected.append(Server.reject(client, reason))
            return
        if msg.has_error():
            replies.rejected.append(Server.reject(client, f"node error {msg.error.code}: {msg.error.reason}"))
            return
        try:
            update, cost, size = _read_update(client, msg.content, expected)
        except RecordError as error:
            replies.rejected.append(Server.reject(client, f"malformed reply: {error}"))
            return
        except Exception as error:  # noqa: BLE001  one reply must never end the run
            replies.rejected.append(Server.reject(client, f"unreadable reply ({type(error).__name__}): {error}"))
            return
        replies.intake.offer(update)
        replies.updates.append(Received.of(update, keep_state=False))
        replies.times[client] = cost
        replies.extra["record_bytes"] += size

    # ---- what the nodes keep to themselves ----

    def local_state(self) -> dict:
        return {}  # the QAT observers stay on the nodes

    def restore(self, states: dict) -> None:
        raise ConfigError(
            "--resume: the Flower engine cannot resume (the nodes keep their QAT observers); "
            "resume runs on the embedded engine"
        )

    def adjust(self, server: Server, strategies: dict[int, str], outcome: RoundOutcome, next_round: int) -> dict:
        raise ConfigError("the Flower engine runs without --adjust (use the embedded engine)")

    def _track(self, sent: list[tuple[Message, int]]) -> list[Message]:
        self._sent = sent
        return [msg for msg, _ in sent]

    def _waiting(self) -> dict[str, int]:
        """Message id -> node id of the exchange under way (the grid gives a message
        its id when it pushes it, so ids are read after sending)."""
        return {msg.metadata.message_id: nid for msg, nid in self._sent}

    def _match(self, replies: Iterable[Message], where: str, waiting: dict[str, int]) -> list[tuple[Message, int]]:
        """(reply, node id) for the first reply to each message in ``waiting`` (which
        loses it), matched by the message it answers: a disconnected node's error reply
        comes from the SuperLink. A reply from another node leaves the message waiting
        for its own node's reply (or the timeout)."""
        matched = []
        for reply in replies:
            msg_id = reply.metadata.reply_to_message_id
            nid = waiting.get(msg_id)
            if nid is None:
                log.warning(
                    "%s: ignoring a reply to no message of this round (from node %d)", where, reply.metadata.src_node_id
                )
            elif not reply.has_error() and reply.metadata.src_node_id != nid:
                log.warning("%s: node %d answered the message sent to node %d", where, reply.metadata.src_node_id, nid)
            else:
                matched.append((reply, waiting.pop(msg_id)))
        return matched

    def _exclude(self, node_id: int, reason: str) -> None:
        log.warning("node %d left out of the run: %s", node_id, reason)
        self.excluded.append({"node_id": node_id, "reason": reason})


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


def _read_answer(msg: Message, node_id: int, clients: int) -> tuple[Answer | None, str | None]:
    """(answer, None) for a usable query answer, else (None, why not)."""
    if msg.has_error():
        return None, f"node error {msg.error.code}: {msg.error.reason}"
    significance, about = msg.content.get("significance"), msg.content.get("node")
    if not isinstance(significance, MetricRecord) or not isinstance(about, ConfigRecord):
        return None, "the answer lacks its 'significance' MetricRecord or 'node' ConfigRecord"
    time_s, acc = significance.get("time-s"), significance.get("acc")
    if not (is_real(time_s) and is_real(acc)) or time_s <= 0:
        return None, f"significance must be finite (T_m > 0), got T_m={time_s!r}, Sig_acc={acc!r}"
    costs = significance.get("ptq-s"), significance.get("upload-s")
    if not all(is_real(v) and v >= 0 for v in costs):
        return None, f"the predicted PTQ and upload seconds must be finite and >= 0, got {costs!r}"
    checks = {int: is_int, float: is_real, str: lambda v: isinstance(v, str)}
    wrong = [k for k, kind in ABOUT.items() if not checks[kind](about.get(k))]
    if wrong:
        return None, f"the node description lacks or mistypes {wrong}"
    if not 0 <= about["partition-id"] < clients:
        return None, f"partition-id {about['partition-id']} is outside [0, {clients})"
    if not 0 < about["samples"] <= MAX_SAMPLES:  # what bounds its replies' num-examples
        return None, f"samples must be in [1, {MAX_SAMPLES}], got {about['samples']}"
    if not valid_bits(about["bit-budget"]):
        return None, f"bit-budget must be in [{MIN_BITS}, {MAX_BITS}], got {about['bit-budget']}"
    row = {
        "node_id": node_id,
        "device": about["device"],
        "device_name": about["device-name"],
        "bit_budget": about["bit-budget"],
        "alpha": about["alpha"],
        "beta": about["beta"],
        "samples": about["samples"],
        "batch": about["batch"],
    }
    return Answer(about["partition-id"], float(time_s), float(acc), row, *map(float, costs)), None


def _read_update(client: int, content: RecordDict, expected: Expected) -> tuple[Update, ClientTime, int]:
    """(update, simulated time, records' bytes) of a training reply; RecordError if it is
    malformed or does not fit ``expected``, the client's planned upload (``decode_state``)."""
    arrays, layout, metrics = content.get("update"), content.get("layout"), content.get("metrics")
    if not isinstance(metrics, MetricRecord):
        raise RecordError("the reply has no 'metrics' MetricRecord")
    # a client with no training step reports a NaN loss
    wrong = [
        k
        for k in TRAIN_METRICS
        if not (is_real(metrics.get(k)) or k == "train-loss" and isinstance(metrics.get(k), float))
    ]
    if wrong:
        raise RecordError(f"metrics {wrong} missing or not finite numbers")
    if not is_int(metrics["num-examples"]):
        raise RecordError(f"num-examples must be an int, got {metrics['num-examples']!r}")
    if not (metrics["steps"] == int(metrics["steps"]) and 0 <= metrics["steps"] <= MAX_STEPS):
        raise RecordError(f"steps must be a whole number in [0, {MAX_STEPS}], got {metrics['steps']!r}")
    seconds = {k: float(metrics[k]) for k in ("wall-s", "compute-s", "upload-s")}
    if not all(0 <= v <= MAX_SECONDS for v in seconds.values()):
        raise RecordError(f"times must be in [0, {MAX_SECONDS:g}] s, got {seconds}")
    costs = [seconds["compute-s"], seconds["upload-s"]]
    state = decode_state(arrays, layout, expected, copy=False)  # the server only reads an update
    update = Update(
        client,
        state,
        metrics["num-examples"],
        float(metrics["train-loss"]),
        int(metrics["steps"]),
        float(metrics["wall-s"]),
    )
    return update, ClientTime(*costs), arrays.count_bytes() + layout.count_bytes() + metrics.count_bytes()
