"""quantize_mod + QuantizedStrategy on a Flower app written without FedHQ in mind
(tests/flower_quickstart.py): Flower's own FedAvg, FedProx, FedMedian and FedAdam,
wrapped, on an in-process grid (and FedAvg on the simulation engine), against the
same strategies unwrapped."""

import logging
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr", reason="the Flower adapter needs the flower extra: pip install 'fedhq[flower]'")

import flower_quickstart as quickstart  # noqa: E402
from flower_support import LocalGrid  # noqa: E402
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict  # noqa: E402
from flwr.clientapp.mod import fixedclipping_mod  # noqa: E402
from flwr.serverapp.strategy import (  # noqa: E402
    DifferentialPrivacyClientSideFixedClipping,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
)

from fedhq.flower.quantized import LAYOUT, QuantizedStrategy, make_quantize_mod, quantize_mod, record_bytes  # noqa: E402
from fedhq.flower.records import SCALES  # noqa: E402

NODES = 4
ROUNDS = 3
# Final accuracy on the 1000 held-out samples: wrapped (8 bits) vs unwrapped FedAvg,
# measured 0.000-0.002 apart over seeds 0-2 (one sample is 0.001); run-to-run noise
# of the unwrapped app across seeds is ~0.02.
ACCURACY_TOLERANCE = 0.01

quantized_app = quickstart.make_app([quantize_mod])


def run(strategy, app=quantized_app, seed: int = 0, faults=None, rounds: int = ROUNDS) -> float:
    result = strategy.start(
        grid=LocalGrid(app, NODES, faults),
        initial_arrays=quickstart.initial_arrays(seed),
        num_rounds=rounds,
        evaluate_fn=quickstart.central_evaluate,
    )
    return result.evaluate_metrics_serverapp[rounds]["accuracy"]


def train_message(arrays: ArrayRecord, message_type: str = MessageType.TRAIN) -> Message:
    LocalGrid(quickstart.plain_app, 1)  # sets the task identity Message() reads
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})})
    return Message(content, dst_node_id=1000, message_type=message_type)


def reply_of(app, msg: Message) -> Message:
    grid = LocalGrid(app, 1)
    return grid.send_and_receive([msg])[0]


def test_the_mod_quantizes_train_replies_to_a_quarter_and_an_eighth():
    arrays = quickstart.initial_arrays()
    plain = reply_of(quickstart.plain_app, train_message(arrays))
    sizes = {}
    for bits in (8, 4):
        reply = reply_of(quickstart.make_app([make_quantize_mod(bits=bits)]), train_message(arrays))
        assert LAYOUT in reply.content and reply.content[LAYOUT]["bits"] == [bits] * 10
        assert reply.content["metrics"]["num-examples"] == quickstart.SAMPLES  # metrics untouched
        sizes[bits] = record_bytes(plain.content) / record_bytes(reply.content)
    # 77k parameters: per-channel scales and zero points (8 bytes per output row), npy
    # headers and the layout cost ~10% at 4 bits (measured 3.59x, 6.49x); ResNet-18
    # size: bench/bench_flower_quantized.py
    assert 3.5 <= sizes[8] <= 4.0 and 6.2 <= sizes[4] <= 8.0, sizes


def test_other_messages_pass_through_and_options_are_checked():
    msg = train_message(quickstart.initial_arrays(), MessageType.EVALUATE)
    reply = reply_of(quantized_app, msg)
    assert set(reply.content) == {"metrics"}  # evaluate replies are left alone
    keep = make_quantize_mod(keep_float=["head.weight", "head.bias"])
    reply = reply_of(quickstart.make_app([keep]), train_message(quickstart.initial_arrays()))
    assert "head.weight" not in reply.content[LAYOUT]["quantized"]
    assert reply.content["arrays"]["head.weight"].dtype == "float32"
    for bad in (1, 9, 8.0):
        with pytest.raises((ValueError, TypeError)):
            make_quantize_mod(bits=bad)
    with pytest.raises(ValueError, match="no fused aggregation"):
        QuantizedStrategy(FedAdam(), aggregate="fused")


def test_fused_fedavg_keeps_the_unwrapped_accuracy_over_seeds():
    for seed in range(3):
        plain = run(FedAvg(fraction_evaluate=0.0), quickstart.plain_app, seed)
        wrapper = QuantizedStrategy(FedAvg(fraction_evaluate=0.0))
        wrapped = run(wrapper, seed=seed)
        assert wrapper.method == "mean" and wrapper.dropped == []
        assert abs(wrapped - plain) <= ACCURACY_TOLERANCE, (seed, wrapped, plain)
        assert wrapped > 0.7  # it learns (chance is 0.1)


@pytest.mark.parametrize(
    "make, method",
    [
        (lambda: FedMedian(fraction_evaluate=0.0), "median"),
        (lambda: FedTrimmedAvg(fraction_evaluate=0.0, beta=0.25), "trimmed-mean"),
        (lambda: FedProx(fraction_evaluate=0.0, proximal_mu=0.1), "mean"),  # FedAvg's aggregation
        (lambda: FedAdam(fraction_evaluate=0.0, eta=0.01), None),  # its own, on dequantized replies
    ],
)
def test_flowers_strategies_keep_their_behaviour_wrapped(make, method):
    plain = run(make(), quickstart.plain_app)
    wrapper = QuantizedStrategy(make())
    wrapped = run(wrapper)
    assert wrapper.method == method and wrapper.dropped == []
    assert abs(wrapped - plain) <= ACCURACY_TOLERANCE, (wrapped, plain)
    assert set(wrapper.aggregate_s) == set(range(1, ROUNDS + 1))


def test_a_quantized_downlink_and_federated_evaluation():
    wrapper = QuantizedStrategy(FedAvg(), quantize_downlink=True)
    assert abs(run(wrapper) - run(FedAvg(), quickstart.plain_app)) <= ACCURACY_TOLERANCE
    assert wrapper.dropped == []


def test_malformed_and_unquantized_replies_are_dropped_with_a_reason(caplog):
    def no_layout(reply, msg):
        del reply.content[LAYOUT]
        return reply

    def wrong_bits(reply, msg):
        reply.content[LAYOUT]["bits"] = [4] * len(reply.content[LAYOUT]["bits"])
        return reply

    def no_weight(reply, msg):
        reply.content["metrics"]["num-examples"] = float("nan")
        return reply

    def nan_scales(reply, msg):  # well-formed: refused by the aggregator's value checks
        (arrays,) = reply.content.array_records.values()
        arrays[SCALES] = Array(np.full(arrays[SCALES].shape, np.nan, dtype=np.float32))
        return reply

    for make, how in ((FedAvg, "auto"), (FedMedian, "auto"), (FedAvg, "strategy")):
        wrapper = QuantizedStrategy(make(fraction_evaluate=0.0), aggregate=how)
        run(wrapper, faults={1: nan_scales}, rounds=1)
        assert [d["node_id"] - 1000 for d in wrapper.dropped] == [1], make
        assert "scale must be finite and > 0" in wrapper.dropped[0]["reason"], make
    wrapper = QuantizedStrategy(FedAvg(fraction_evaluate=0.0))
    with caplog.at_level(logging.WARNING, logger="fedhq.flower"):
        accuracy = run(wrapper, faults={1: no_layout, 2: wrong_bits, 3: no_weight}, rounds=1)
    reasons = {d["node_id"] - 1000: d["reason"] for d in wrapper.dropped}
    assert set(reasons) == {1, 2, 3} and all(d["round"] == 1 for d in wrapper.dropped)
    assert "is quantize_mod in the ClientApp's mods" in reasons[1]
    assert "is not the global model's" in reasons[2]
    assert "num-examples" in reasons[3]
    assert "left out" in caplog.text and accuracy > 0.3  # node 0's update alone
    # a ClientApp without the mod: every reply dropped, the model stays as it was
    wrapper = QuantizedStrategy(FedAvg(fraction_evaluate=0.0))
    run(wrapper, app=quickstart.plain_app, rounds=1)
    assert len(wrapper.dropped) == NODES


def test_it_composes_with_client_side_dp_clipping():
    app = quickstart.make_app([quantize_mod, fixedclipping_mod])  # quantize_mod outermost
    dp = DifferentialPrivacyClientSideFixedClipping(
        FedAvg(fraction_evaluate=0.0), noise_multiplier=0.01, clipping_norm=10.0, num_sampled_clients=NODES
    )
    wrapper = QuantizedStrategy(dp, quantize_downlink=True)
    assert wrapper.method is None  # the DP wrapper aggregates (and adds its noise)
    assert run(wrapper, app=app) > 0.5 and wrapper.dropped == []


def test_fedavg_wrapped_on_the_simulation_engine(monkeypatch):
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    tests = str(Path(__file__).parent)  # the Ray workers import the app from here
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    done = {}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        wrapper = QuantizedStrategy(FedAvg(fraction_evaluate=0.5))
        result = wrapper.start(
            grid=grid, initial_arrays=quickstart.initial_arrays(), num_rounds=2, evaluate_fn=quickstart.central_evaluate
        )
        done["accuracy"], done["dropped"] = result.evaluate_metrics_serverapp[2]["accuracy"], wrapper.dropped
        done["evaluated"] = result.evaluate_metrics_clientapp

    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}}
    run_simulation(server, quantized_app, num_supernodes=NODES, backend_config=backend)
    assert done["dropped"] == [] and set(done["evaluated"]) == {1, 2}
    assert abs(done["accuracy"] - run(FedAvg(fraction_evaluate=0.0), quickstart.plain_app, rounds=2)) <= 0.03
