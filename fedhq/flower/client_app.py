"""The FedHQ ClientApp: the run's client code behind Flower messages (docs/flower.md).

- ``query``: the node builds its own client from the run settings and reference
  profile in the message and replies with (T_m, Sig_acc) and its client row.
- ``train.ptq`` / ``train.qat`` / ``train.fp32``: ``train_local`` from the global model
  and plan in the message; the reply holds the upload and the round's costs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

import fedhq_kernels as fk
from fedhq.fl import engine
from fedhq.fl.client import ClientState, train_local
from fedhq.fl.config import RunConfig
from fedhq.fl.rounds import Client
from fedhq.flower.records import decode_state, encode_state
from fedhq.flower.strategy import read_plan
from fedhq.models import ModelSpec
from fedhq.mpq import device_budget

SETUP = "fedhq-setup"  # context.state: the query's setup record, for the training rounds
OBSERVERS = "fedhq-observers"  # context.state: the QAT observers' ranges (ClientState)

app = ClientApp()


@dataclass(frozen=True)
class Node:
    config: RunConfig
    spec: ModelSpec
    client: Client


@lru_cache(maxsize=4)
def _load_node(run_config: str, reference: str, partition: int, device: str) -> Node:
    """This node's client alone, exactly as the run builds client ``partition``
    (``device``, a preset name or a profile file on the node, replaces its device)."""
    config = RunConfig.from_dict(json.loads(run_config), where="run settings from the server")
    if not 0 <= partition < config.clients:
        raise ValueError(f"partition-id {partition} is outside [0, {config.clients}) of this run")
    if device:
        devices = [config.devices[i % len(config.devices)] for i in range(config.clients)]
        devices[partition] = device
        config = config.replace(devices=devices)
    spec, client = engine.client_setup(config, json.loads(reference), partition)
    return Node(config, spec, client)


def _node(context: Context) -> Node:
    if SETUP not in context.state:
        raise RuntimeError("this node has not answered the query round of the run")
    setup = context.state[SETUP]
    partitions = context.node_config.get("num-partitions")
    node = _load_node(
        str(setup["run-config"]),
        str(setup["reference"]),
        int(context.node_config["partition-id"]),
        str(context.node_config.get("device", "")),
    )
    if partitions is not None and int(partitions) != node.config.clients:
        raise ValueError(f"num-partitions is {partitions}, but the run has {node.config.clients} clients")
    return node


@app.query()
def query(msg: Message, context: Context) -> Message:
    context.state[SETUP] = ConfigRecord(dict(msg.content["setup"]))
    context.state.pop(OBSERVERS, None)
    node = _node(context)
    time_s, acc_sig = engine.client_analysis(node.client, node.spec, node.config)
    ptq_s, upload_s = engine.client_costs(node.client, node.spec, node.config)
    c = node.client
    about = {
        "partition-id": c.id,
        "device": c.device_source,
        "device-name": c.device.name,
        "bit-budget": device_budget(c.device.speed.profile),
        "alpha": c.alpha,
        "beta": c.beta,
        "batch": c.batch,
        "samples": len(c.data),
    }
    content = RecordDict(
        {
            "significance": MetricRecord({"time-s": time_s, "acc": acc_sig, "ptq-s": ptq_s, "upload-s": upload_s}),
            "node": ConfigRecord(about),
        }
    )
    return Message(content, reply_to=msg)


def train(msg: Message, context: Context) -> Message:
    node = _node(context)
    c = node.client
    strategy = msg.metadata.message_type.split(".", 1)[1]
    weights = fk.dequantize_state_dict(decode_state(msg.content["global"], msg.content["layout"]))
    plan = read_plan(strategy, msg.content["plan"])
    observers = context.state[OBSERVERS].to_torch_state_dict() if OBSERVERS in context.state else {}
    update, state = train_local(node.spec, weights, c.data, plan, c.id, ClientState(dict(observers)))
    if state.observers:
        context.state[OBSERVERS] = ArrayRecord(state.observers)
    cost = c.device.round_time(node.spec.key, plan.strategy, plan.batch_size, update.steps, update.nbytes)
    arrays, layout = encode_state(update.state)
    metrics = MetricRecord(
        {
            "num-examples": update.num_samples,
            "train-loss": update.train_loss,
            "steps": update.steps,
            "wall-s": update.wall_s,
            "compute-s": cost.compute_s,
            "upload-s": cost.upload_s,
        }
    )
    return Message(RecordDict({"update": arrays, "layout": layout, "metrics": metrics}), reply_to=msg)


for _strategy in ("ptq", "qat", "fp32"):
    app.train(_strategy)(train)
