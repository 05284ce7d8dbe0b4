"""quantize_mod + QuantizedStrategy against an unwrapped Flower app, at ResNet-18 size.

    python bench/bench_flower_quantized.py [--clients 10] [--repeats 5] [--json out.json]

1. Bytes of one train reply (``count_bytes`` of its records): Flower's float32 reply
   against quantize_mod's 8- and 4-bit replies.
2. Server aggregation time, steady state (median of ``--repeats`` after one warm-up),
   from the replies as received to the new global ArrayRecord: Flower's FedAvg and
   FedMedian (NumPy) against QuantizedStrategy wrapping each (reads and checks every
   reply and adds it to a streaming ``Aggregator``; FedAvg's result is the float mean,
   FedMedian's is requantized by the kernels and dequantized).

Prints a markdown table (README, "Use it in your Flower app").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import uuid

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as fedhq/cli.py: before torch loads (shared cores)

import torch  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp.strategy import FedAvg, FedMedian  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

import fedhq_kernels as fk  # noqa: E402
from fedhq.flower.quantized import QuantizedStrategy, make_quantize_mod, record_bytes  # noqa: E402
from fedhq.models import ModelSpec  # noqa: E402

MODEL = "resnet18@32x32x3:10"


class NodeList:
    """What FedAvg.configure_train asks of a grid."""

    def __init__(self, count: int):
        self.ids = list(range(1, count + 1))

    def get_node_ids(self) -> list[int]:
        return self.ids


def replies(global_state: dict, clients: int, bits: int | None) -> list[Message]:
    """One train reply per client (its model: the global one plus noise), as Flower's
    quickstart ClientApp returns it, through quantize_mod when ``bits`` is given."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    mod = make_quantize_mod(bits=bits) if bits else None
    out = []
    for c in range(clients):
        g = torch.Generator().manual_seed(c)
        state = {
            k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for k, v in global_state.items()
        }
        msg = Message(
            RecordDict({"arrays": ArrayRecord(global_state), "config": ConfigRecord({"server-round": 1})}),
            dst_node_id=c + 1,
            message_type=MessageType.TRAIN,
        )
        msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex

        def app(m, context, state=state, c=c):
            metrics = MetricRecord({"train_loss": 1.0, "num-examples": 100 + 10 * c})
            return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": metrics}), reply_to=m)

        out.append(mod(msg, None, app) if mod else app(msg, None))
    return out


def fresh(messages: list[Message], contents: list[RecordDict]) -> list[Message]:
    """The replies with copies of ``contents`` (FedMedian pops the arrays it reads)."""
    for m, content in zip(messages, contents, strict=True):
        m.content = RecordDict({k: type(r)(dict(r.items())) for k, r in content.items()})
    return messages


def timed(strategy, messages: list[Message], repeats: int) -> float:
    samples, contents = [], [m.content for m in messages]
    for _ in range(repeats + 1):  # the first is the warm-up
        batch = fresh(messages, contents)
        start = time.perf_counter()
        arrays, _ = strategy.aggregate_train(1, batch)
        samples.append(time.perf_counter() - start)
        assert arrays is not None
    return statistics.median(samples[1:])


def aggregated(wrapper: QuantizedStrategy, states: list[dict], weights: list[float]) -> dict:
    """The wrapper's aggregation step alone: every update added to an Aggregator, the
    result as the wrapper takes it (the float mean; the robust methods requantized)."""
    aggregator = fk.Aggregator(wrapper._template, method=wrapper.method, **wrapper._buffer())
    for state, weight in zip(states, weights):
        aggregator.add(state, weight)
    return aggregator.result(requantize=wrapper.method != "mean")


def _seconds(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    global_state = ModelSpec.parse(MODEL).build().state_dict()
    arrays = ArrayRecord(global_state)
    params = sum(v.numel() for v in global_state.values() if v.is_floating_point())
    plain, q8, q4 = (replies(global_state, args.clients, bits) for bits in (None, 8, 4))
    sizes = {name: record_bytes(r[0].content) for name, r in (("float32", plain), ("8 bits", q8), ("4 bits", q4))}
    rows = []
    for make in (FedAvg, FedMedian):
        wrapper = QuantizedStrategy(make(), bits=8)
        wrapper.configure_train(1, arrays, ConfigRecord(), NodeList(args.clients))
        flower_s = timed(make(), plain, args.repeats)
        ours_s = timed(wrapper, q8, args.repeats)
        assert wrapper.dropped == [], wrapper.dropped
        # the aggregation alone, on the decoded replies (the rest: reading and checking
        # every record, dequantizing a requantized result, building the ArrayRecord)
        states = [wrapper._read(m)[0] for m in q8]
        weights = [1.0 + c for c in range(len(states))]
        kernel_s = statistics.median(_seconds(aggregated, wrapper, states, weights) for _ in range(args.repeats + 1))
        rows.append(
            {
                "strategy": make.__name__,
                "flower_s": flower_s,
                "wrapped_s": ours_s,
                "kernel_s": kernel_s,
                "speedup": flower_s / ours_s,
                "kernel_speedup": flower_s / kernel_s,
            }
        )
    result = {
        "model": MODEL,
        "float_params": params,
        "clients": args.clients,
        "repeats": args.repeats,
        "reply_bytes": sizes,
        "reply_ratio": {k: sizes["float32"] / v for k, v in sizes.items()},
        "aggregation": rows,
        "torch_threads": torch.get_num_threads(),
        "loadavg": os.getloadavg(),
    }
    print(f"ResNet-18 ({params / 1e6:.2f}M float values), {args.clients} clients, median of {args.repeats}\n")
    print("| reply | bytes | smaller by |\n| --- | ---: | ---: |")
    for name, size in sizes.items():
        print(f"| {name} | {size:,} | {sizes['float32'] / size:.2f}x |")
    print(
        "\n| aggregation | Flower (NumPy) | QuantizedStrategy (8 bits) | faster by | aggregation alone | faster by |",
        "\n| --- | ---: | ---: | ---: | ---: | ---: |",
        sep="",
    )
    for r in rows:
        print(
            f"| {r['strategy']} | {r['flower_s'] * 1e3:.0f} ms | {r['wrapped_s'] * 1e3:.0f} ms | {r['speedup']:.1f}x"
            f" | {r['kernel_s'] * 1e3:.0f} ms | {r['kernel_speedup']:.1f}x |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
