"""Peak memory of the server side of one round: N synthetic INT8 updates of ResNet-18
(CIFAR) size, made one at a time, each offered to the server as it arrives (validated
and aggregated at once: fedhq.fl.server.RoundIntake), then the round closed.

    python bench/bench_server_memory.py [--clients 1000] [--width 64] [--bits 8] [--engine flower] [--out FILE.json]

``--engine flower`` runs the round through the Flower transport
(fedhq.flower.strategy.FedHQStrategy.train) on a grid whose nodes answer with the
synthetic updates as Flower records, made when the server pulls them, ``--per-pull``
per pull in a random order: the server's memory then includes the global model's
message, the reply records and the reorder buffer that keeps aggregation in client order.

Each measurement runs in a fresh subprocess. The baseline is the process's resident
size once the server holds its global model (the float initial model it bounds updates
by and the quantized global one); the peak resets to it (/proc/self/clear_refs) and
VmHWM after the round is the round's peak. The bound: the peak above the baseline
within 3x the float32 model's size. Without streaming the round held every update:
N x the INT8 update size, printed beside it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

BOUND = 3.0  # the round's peak above the baseline, in float32 model sizes


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(clients: int, width: int, bits: int, engine: str = "embedded", per_pull: int = 4) -> dict:
    """The round in this process (call it in a fresh one: ``main`` does)."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from resnet18_shapes import resnet18_cifar_shapes

    import fedhq_kernels as fk
    from fedhq.fl.client import Update
    from fedhq.fl.server import Server

    torch.manual_seed(0)
    shapes = resnet18_cifar_shapes(width=width)
    initial = {name: torch.randn(shape) * 0.1 for name, shape in shapes.items()}
    server = Server(initial, bits=bits, quantized=set(shapes))
    params = sum(t.numel() for t in initial.values())
    qmin, qmax = fk.quant_range(bits)

    def synthetic_update(client: int) -> Update:
        """Fresh random codes with the global model's scales: an INT8 upload."""
        state = {}
        for name, g in server.state.items():
            codes = torch.randint(qmin, qmax + 1, g.shape, dtype=torch.int8)
            state[name] = fk.QuantizedTensor(
                codes, g.scale.clone(), g.zero_point.clone(), g.bits, g.axis, g.symmetric, g.dtype, g.shape
            )
        return Update(client, state, 100 + client % 7, 0.0, 1, 0.0)

    update_bytes = synthetic_update(0).nbytes
    if engine == "flower":  # imports and the grid before the baseline: they are not the round's
        play_round = _flower_round(server, synthetic_update, clients, per_pull)
    else:
        play_round = _embedded_round(server, synthetic_update, clients)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    baseline = _status_kib("VmRSS") * 1024
    offer_s, close_s, extra = play_round()
    peak = _status_kib("VmHWM") * 1024
    model_bytes = 4 * params
    return {
        "engine": engine,
        "clients": clients,
        "width": width,
        "bits": bits,
        "params": params,
        "float32_model_bytes": model_bytes,
        "update_bytes": update_bytes,
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": peak,
        "peak_above_baseline_bytes": peak - baseline,
        "peak_above_baseline_models": (peak - baseline) / model_bytes,
        "bound_models": BOUND,
        "within_bound": peak - baseline <= BOUND * model_bytes,
        "buffered_updates_bytes": clients * update_bytes,
        "offer_ms_per_update": 1000 * offer_s / clients,  # validate + aggregate, the server's work
        "close_s": close_s,
        **extra,
    }


def _check_all_accepted(accepted: list, rejected: list, clients: int) -> None:
    if len(accepted) != clients or rejected:
        raise RuntimeError(f"the round refused synthetic updates: {[r.reason for r in rejected][:3]}")


def _embedded_round(server, synthetic_update, clients: int) -> Callable[[], tuple[float, float, dict]]:
    """The in-process engine's round: each update offered to the round as it is made."""

    def play() -> tuple[float, float, dict]:
        intake, offer_s = server.open_round(), 0.0
        for client in range(clients):
            update = synthetic_update(client)
            started = time.perf_counter()
            intake.offer(update)
            offer_s += time.perf_counter() - started
            del update
        started = time.perf_counter()
        accepted, rejected = intake.close()
        close_s = time.perf_counter() - started
        _check_all_accepted(accepted, rejected, clients)
        return offer_s, close_s, {}

    return play


def _flower_round(server, synthetic_update, clients: int, per_pull: int) -> Callable[[], tuple[float, float, dict]]:
    """FedHQStrategy.train on a grid of synthetic nodes (``_synthetic_grid``); the
    server's time per update is the round's wall time less the nodes' (making and
    encoding the synthetic updates)."""
    from types import SimpleNamespace

    from fedhq.fl.client import RoundPlan
    from fedhq.fl.config import RunConfig
    from fedhq.flower import strategy

    grid = _synthetic_grid(synthetic_update, clients, per_pull)
    setup = SimpleNamespace(config=RunConfig(clients=clients), reference={}, echo=print)
    transport = strategy.FedHQStrategy(grid, setup, node_wait_s=0)
    transport.nodes = {client: NODE0 + client for client in range(clients)}  # what the query round admits
    plan = RoundPlan(round=1, strategy="ptq", epochs=1, batch_size=32, lr=0.1, momentum=0.9, bits=8, seed=0)

    def play() -> tuple[float, float, dict]:
        started = time.perf_counter()
        replies = transport.train(server, dict.fromkeys(range(clients), plan))
        offer_s = time.perf_counter() - started - grid.nodes_s
        started = time.perf_counter()
        accepted, rejected = replies.intake.close()
        close_s = time.perf_counter() - started
        _check_all_accepted(accepted, replies.rejected + rejected, clients)
        return offer_s, close_s, {"per_pull": per_pull, "replies_held_peak": replies.extra["replies_held_peak"]}

    return play


NODE0 = 1000  # the synthetic nodes' ids: NODE0 + client
UNUSED = "the benchmark's grid only pushes messages and pulls replies"


def _synthetic_grid(synthetic_update, clients: int, per_pull: int):
    """A Flower Grid whose node NODE0 + c answers a training message with a synthetic
    update, encoded as the ClientApp does, when the server pulls it. The records are
    encoded once, before the round (a node's work, not the server's), and each reply
    gets fresh copies of their bytes, as a reply read off the network does."""
    import random

    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.serverapp import Grid
    from flwr.supercore.task_identity import TaskIdentity

    from fedhq.flower.records import encode_state

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1  # Message() reads it
    arrival = random.Random(0)
    templates = [encode_state(synthetic_update(client).state) for client in range(min(clients, 3))]

    def reply(msg: Message) -> Message:
        client = msg.metadata.dst_node_id - NODE0
        arrays, layout = templates[client % len(templates)]
        received = ArrayRecord(
            {
                name: Array(dtype=a.dtype, shape=a.shape, stype=a.stype, data=bytes(memoryview(a.data)))
                for name, a in arrays.items()
            }
        )
        metrics = {"num-examples": 100 + client % 7, "train-loss": 0.0, "steps": 1}
        metrics.update({"wall-s": 0.0, "compute-s": 1.0, "upload-s": 1.0})
        content = RecordDict({"update": received, "layout": layout, "metrics": MetricRecord(metrics)})
        return Message(content, reply_to=msg)

    class SyntheticGrid(Grid):
        def __init__(self):
            self.pending: list[Message] = []
            self.nodes_s = 0.0  # time spent making replies

        def get_node_ids(self):
            return [NODE0 + c for c in range(clients)]

        def push_messages(self, messages):
            for number, msg in enumerate(messages):
                msg.metadata.__dict__["_message_id"] = f"m{number}"  # what Flower's grids do on push
                self.pending.append(msg)
            return [msg.metadata.message_id for msg in self.pending]

        def pull_messages(self, message_ids):
            started = time.perf_counter()
            batch, self.pending = self.pending[:per_pull], self.pending[per_pull:]
            arrival.shuffle(batch)
            replies = [reply(msg) for msg in batch]
            self.nodes_s += time.perf_counter() - started
            return replies

        def send_and_receive(self, messages, *, timeout=None):
            raise NotImplementedError(UNUSED)

        # Grid's other abstract methods: FedHQStrategy.train never calls them
        def set_run(self, run):
            raise NotImplementedError(UNUSED)

        @property
        def run(self):
            raise NotImplementedError(UNUSED)

        def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
            raise NotImplementedError(UNUSED)

    return SyntheticGrid()


def run_fresh(clients: int, width: int, bits: int, engine: str = "embedded", per_pull: int = 4) -> dict:
    """``measure`` in a fresh interpreter, so nothing earlier sets its peak."""
    code = (
        f"import json, sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); "
        f"import bench_server_memory as b; "
        f"print(json.dumps(b.measure({clients}, {width}, {bits}, {engine!r}, {per_pull})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--width", type=int, default=64, help="ResNet-18 width (64: the real model)")
    parser.add_argument("--bits", type=int, default=8)
    parser.add_argument("--engine", choices=("embedded", "flower"), default="embedded")
    parser.add_argument("--per-pull", type=int, default=4, help="flower: replies per pull, in a random order")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    result = run_fresh(args.clients, args.width, args.bits, args.engine, args.per_pull)
    mib = 2**20
    print(
        f"{result['engine']} engine, {result['clients']} clients, "
        f"ResNet-18 width {result['width']} ({result['params']:,} params, "
        f"float32 {result['float32_model_bytes'] / mib:.1f} MiB, INT{result['bits']} update "
        f"{result['update_bytes'] / mib:.1f} MiB): baseline {result['baseline_rss_bytes'] / mib:.0f} MiB, "
        f"round peak +{result['peak_above_baseline_bytes'] / mib:.1f} MiB = "
        f"{result['peak_above_baseline_models']:.2f}x the float32 model (bound {BOUND:g}x: "
        f"{'met' if result['within_bound'] else 'NOT met'}); holding every update would take "
        f"{result['buffered_updates_bytes'] / mib:,.0f} MiB; server time {result['offer_ms_per_update']:.1f} ms per "
        f"update (validate + aggregate), close {result['close_s']:.2f} s"
        + (f"; at most {result['replies_held_peak']} replies held" if args.engine == "flower" else "")
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
