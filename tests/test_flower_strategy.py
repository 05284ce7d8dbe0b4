"""FedHQStrategy and the ClientApp on an in-process grid: the Flower engine gives the
embedded engine's numbers exactly (it is an adapter around the same client and
server code), and nodes that answer badly, not at all, or with non-finite
significance are logged, left out, and never stop the run or corrupt the model."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr", reason="the Flower adapter needs the flower extra: pip install 'fedhq[flower]'")

from flower_support import LocalGrid  # noqa: E402
from flwr.app import Array, Error, Message  # noqa: E402

from fedhq.fl import checkpoint, engine  # noqa: E402
from fedhq.fl.client import evaluate, quantized_names  # noqa: E402
from fedhq.fl.config import ConfigError, RunConfig  # noqa: E402
from fedhq.fl.server import Server  # noqa: E402
from fedhq.flower import client_app  # noqa: E402
from fedhq.flower.records import CODES, SCALES, ZERO_POINTS  # noqa: E402
from fedhq.flower.server_app import run_config_from_flower, run_on_grid  # noqa: E402

SUPERLINK_NODE_ID = 1  # flwr.common.constant (not public): the sender of the SuperLink's own replies


def quiet(line: str) -> None:
    pass


def tiny(reference, tmp_path, **changes) -> RunConfig:
    settings = {
        "clients": 4,
        "rounds": 2,
        "local_epochs": 1,
        "output_dir": str(tmp_path),
        "reference_profile": reference,
    }
    return RunConfig(**{**settings, **changes}).validated()


def test_flower_engine_gives_the_embedded_engines_numbers(reference, tmp_path):
    config = tiny(reference, tmp_path / "embedded", strategy="fedhq")
    embedded = engine.run(config, echo=quiet)
    flower = run_on_grid(LocalGrid(client_app.app, 4), config.replace(output_dir=str(tmp_path / "flower")), echo=quiet)
    # the last client's reply first, one per pull: each is held until those before it are in
    late = LocalGrid(client_app.app, 4, arrive=lambda replies: replies[-1:])
    reversed_ = run_on_grid(late, config.replace(output_dir=str(tmp_path / "reversed")), echo=quiet)
    assert [r["replies_held_peak"] for r in flower["rounds"]] == [1, 1]
    assert [r["replies_held_peak"] for r in reversed_["rounds"]] == [4, 4]
    assert reversed_["final_accuracy"] == flower["final_accuracy"] == embedded["final_accuracy"]
    assert flower["schema"] == embedded["schema"] and flower["engine"] == "flower" and flower["excluded"] == []
    assert flower["assignment_before"] == embedded["assignment_before"]
    assert {"ptq", "qat"} <= set(flower["assignment_before"])  # both strategies travel
    for f, e in zip(flower["clients"], embedded["clients"], strict=True):
        assert {k: f[k] for k in e} == e
    for f, e in zip(flower["rounds"], embedded["rounds"], strict=True):
        for key in ("accuracy", "loss", "upload_bytes", "participants", "sim_s", "train_loss", "slowest_client"):
            assert f[key] == e[key], key
        assert f["record_bytes"] > f["upload_bytes"]  # + npy headers, names, layout and metrics
    assert json.loads((tmp_path / "flower" / "results.json").read_text())["final_accuracy"] == flower["final_accuracy"]
    saved = checkpoint.load(tmp_path / "flower" / engine.CHECKPOINT_FILE)  # the driver checkpoints both engines
    assert saved["history"] == flower["rounds"] and saved["client_states"] == {}  # observers stay on the nodes


@pytest.mark.parametrize("strategy", ["fedhq-rt", "slackfill", "fedrh-matched"])
def test_flower_runs_the_round_aware_strategies_with_the_embedded_numbers(reference, tmp_path, strategy):
    config = tiny(reference, tmp_path / "embedded", strategy=strategy, clients=6, rounds=1)
    embedded = engine.run(config, echo=quiet)
    flower = run_on_grid(LocalGrid(client_app.app, 6), config.replace(output_dir=str(tmp_path / "flower")), echo=quiet)
    assert flower["assignment_before"] == embedded["assignment_before"]
    for f, e in zip(flower["clients"], embedded["clients"], strict=True):
        assert f["predicted_s"] == e["predicted_s"]
    assert [r["sim_s"] for r in flower["rounds"]] == [r["sim_s"] for r in embedded["rounds"]]
    assert flower["final_accuracy"] == embedded["final_accuracy"]


def test_a_node_builds_only_its_own_client_as_the_run_does(reference, tmp_path):
    config = tiny(reference, tmp_path, dirichlet_alpha=0.3, partition="dirichlet")
    dataset = engine.load_data(config)
    spec = engine.model_spec(config, dataset)
    profile = json.loads(Path(reference).read_text())
    everyone = engine.make_clients(config, engine.split_validation(config, dataset)[0], spec, profile)
    for cid in (0, 3):
        _, own = engine.client_setup(config, profile, cid)
        c = everyone[cid]
        assert (own.id, own.alpha, own.beta, own.batch, own.device_source) == (
            c.id,
            c.alpha,
            c.beta,
            c.batch,
            c.device_source,
        )
        assert np.array_equal(own.data.y.numpy(), c.data.y.numpy()) and np.array_equal(
            own.data.x.numpy(), c.data.x.numpy()
        )


def _not_for_query(fault):
    return lambda reply, msg: fault(reply, msg) if msg.metadata.message_type.startswith("train") else reply


def _delete(key):
    def fault(reply, msg):
        del reply.content["update"][key]
        return reply

    return fault


def _replace(key, array):
    def fault(reply, msg):
        reply.content["update"][key] = array
        return reply

    return fault


def _nan_scales(reply, msg):
    count = reply.content["update"][SCALES].shape[0]
    reply.content["update"][SCALES] = Array(np.full((count,), np.nan, dtype=np.float32))
    return reply


def _node_error(reply, msg):
    """What the SuperLink sends for a node that stopped: an error reply from itself."""
    error = Message(Error(code=5, reason="node unavailable"), reply_to=msg)
    error.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
    return error


def test_bad_replies_are_left_out_and_the_run_goes_on(reference, tmp_path, caplog):
    faults = {
        1: _delete(CODES),  # the quantized entries' codes missing
        2: _replace(CODES, Array(np.zeros((10, 128), dtype=np.float32))),  # wrong dtype
        3: _nan_scales,
        4: lambda reply, msg: None,  # disconnected: no reply before the timeout
        5: _node_error,  # disconnected: the SuperLink answers for it with an error
        6: _delete(ZERO_POINTS),
    }
    # client 4's silence costs the round its timeout
    config = tiny(reference, tmp_path, clients=7, strategy="fedfq", partition="iid", client_timeout_s=2.0)
    grid = LocalGrid(client_app.app, 7, {p: _not_for_query(f) for p, f in faults.items()})
    with caplog.at_level("WARNING", logger="fedhq"):
        results = run_on_grid(grid, config, echo=quiet)
    expected = {1: "missing", 2: "int8", 3: "finite", 4: "no reply", 5: "node unavailable", 6: "missing"}
    assert_only_zero_takes_part(results, expected)
    assert all(f"client {c} left out" in caplog.text for c in expected)
    initial = tiny_initial_accuracy(config)
    assert math.isfinite(results["final_accuracy"]) and results["final_accuracy"] > initial + 0.2


def _forge(key, dtype, shape, data):
    return _replace(key, Array(dtype=dtype, shape=shape, stype="numpy.ndarray", data=data))


def _npy_header(shape):
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _metric(key, value):
    def fault(reply, msg):
        reply.content["metrics"][key] = value
        return reply

    return fault


def _layout(key, index, value):
    def fault(reply, msg):
        values = list(reply.content["layout"][key])
        values[index] = value
        reply.content["layout"][key] = values
        return reply

    return fault


def test_forged_replies_are_left_out_and_the_run_goes_on(reference, tmp_path):
    """Issue 15: each of these ended the whole server run (EOFError, MemoryError,
    RuntimeError), gave one node all the weight, or stopped all learning."""
    faults = {
        1: _forge(CODES, "uint8", (1280,), b""),  # EOFError
        2: _forge(CODES, "uint8", (10**12,), _npy_header((10**12,))),  # claims 931 GiB
        3: _layout("shape", 0, "4294967296x4294967296"),  # numel() wraps to 0
        4: _metric("num-examples", 2**62),  # more than the node declared
        5: _metric("steps", 2.5),
        6: _layout("symmetric", 0, False),  # another scheme: used to stop all learning
    }
    config = tiny(reference, tmp_path, clients=7, strategy="fedfq", partition="iid")
    grid = LocalGrid(client_app.app, 7, {p: _not_for_query(f) for p, f in faults.items()})
    results = run_on_grid(grid, config, echo=quiet)
    expected = {1: CODES, 2: CODES, 3: "layout", 4: "num_samples", 5: "steps", 6: "layout"}
    assert_only_zero_takes_part(results, expected)
    assert results["final_accuracy"] > tiny_initial_accuracy(config) + 0.2


def test_a_reply_from_another_node_takes_no_ones_place(reference, tmp_path, caplog):
    """Node 2 answering node 1's message (before node 1 does) used to take node 1's
    place: node 1's own reply was ignored, and clients 2 and 3's replies, held for
    client 1's, were never aggregated nor rejected."""
    grid = None

    def also_forged(reply, msg):  # a copy claiming to come from node 2, ahead of node 1's own reply
        forged = Message(reply.content, reply_to=msg)
        forged.metadata.__dict__["_src_node_id"] = 1002
        grid.inbox.append(forged)
        return reply

    config = tiny(reference, tmp_path, clients=4, rounds=1, strategy="fedfq", partition="iid")
    grid = LocalGrid(client_app.app, 4, {1: _not_for_query(also_forged)})
    with caplog.at_level("WARNING", logger="fedhq"):
        results = run_on_grid(grid, config, echo=quiet)
    assert "node 1002 answered the message sent to node 1001" in caplog.text
    assert results["rounds"][0]["participants"] == [0, 1, 2, 3] and results["rounds"][0]["rejected"] == []


def assert_only_zero_takes_part(results: dict, expected: dict[int, str]) -> None:
    """Every round: client 0 alone aggregated, each other client rejected with its words."""
    for row in results["rounds"]:
        assert row["participants"] == [0]
        reasons = {r["client"]: r["reason"] for r in row["rejected"]}
        assert sorted(reasons) == sorted(expected)
        for client, words in expected.items():
            assert words in reasons[client], (client, reasons[client])


def tiny_initial_accuracy(config: RunConfig) -> float:
    """The accuracy of the run's initial global model (INT8, as the server holds it)."""
    dataset = engine.load_data(config)
    spec = engine.model_spec(config, dataset)
    model = engine.initial_model(config, spec)
    server = Server(model.state_dict(), bits=config.bits, quantized=quantized_names(model))
    return evaluate(spec, server.global_weights(), dataset.test)[0]


def test_when_every_reply_is_bad_the_model_is_kept(reference, tmp_path):
    config = tiny(reference, tmp_path, clients=2)
    grid = LocalGrid(client_app.app, 2, {p: _not_for_query(_node_error) for p in range(2)})
    results = run_on_grid(grid, config, echo=quiet)
    initial = tiny_initial_accuracy(config)
    assert [row["accuracy"] for row in results["rounds"]] == [initial, initial]
    assert all(row["participants"] == [] and len(row["rejected"]) == 2 for row in results["rounds"])


def _significance(key, value):
    def fault(reply, msg):
        reply.content["significance"][key] = value
        return reply

    return fault


def _claims_partition(partition):
    def fault(reply, msg):
        reply.content["node"]["partition-id"] = partition
        return reply

    return fault


def _drop_record(reply, msg):
    del reply.content["node"]
    return reply


def test_nodes_with_unusable_significance_are_left_out_of_the_run(reference, tmp_path, caplog):
    faults = {
        1: _significance("acc", float("nan")),
        2: _significance("time-s", float("inf")),
        6: _significance("ptq-s", float("nan")),
        3: _drop_record,
        4: _claims_partition(0),
        5: lambda reply, msg: None,
    }
    config = tiny(reference, tmp_path, clients=8, rounds=1)
    with caplog.at_level("WARNING", logger="fedhq"):
        results = run_on_grid(LocalGrid(client_app.app, 8, faults), config, echo=quiet)
    reasons = {e["node_id"] - 1000: e["reason"] for e in results["excluded"]}
    assert sorted(reasons) == [1, 2, 3, 4, 5, 6]
    for node, words in {1: "finite", 2: "finite", 3: "lacks", 4: "already", 5: "no answer", 6: "PTQ"}.items():
        assert words in reasons[node], (node, reasons[node])
    assert [c["id"] for c in results["clients"]] == [0, 7]
    assert results["rounds"][0]["participants"] == [0, 7]
    assert "left out of the run" in caplog.text


def _about(key, value):
    def fault(reply, msg):
        if "node" in reply.content:  # the query round's answer
            reply.content["node"][key] = value
        return reply

    return fault


def test_a_nodes_bit_budget_comes_from_its_own_device(reference, tmp_path):
    """The server used to load each node's declared device itself for aqfl's budgets: a
    profile file on the node (or any string a node sent) ended the server's run."""
    faults = {1: _about("device", "/on/the/node/only/profile.json"), 2: _about("bit-budget", 9)}
    config = tiny(reference, tmp_path, clients=3, rounds=1, strategy="aqfl")
    results = run_on_grid(LocalGrid(client_app.app, 3, faults), config, echo=quiet)
    assert [(e["node_id"], "bit-budget" in e["reason"]) for e in results["excluded"]] == [(1002, True)]
    embedded = engine.run(config.replace(output_dir=str(tmp_path / "embedded")), echo=quiet)
    assert [c["bit_budget"] for c in results["clients"]] == [c["bit_budget"] for c in embedded["clients"][:2]]
    assert results["rounds"][0]["participants"] == [0, 1]


def test_settings_from_a_flower_run_config(reference, tmp_path):
    file = tmp_path / "run.json"
    file.write_text(json.dumps({"rounds": 7, "lr": 0.01, "seed": 3}))
    values = {
        "config-file": str(file),
        "rounds": 2,
        "local-epochs": 1,
        "devices": "rtx-a6000, jetson-orin-nano-8gb",
        "alphas": "0.5,1",
        "model": "",
        "client-timeout-s": 30.0,
        "clients-per-round": 0.5,
        "availability": "",
    }
    config = run_config_from_flower({**values, "clients": 2})
    assert (config.clients_per_round, config.per_round, config.availability) == (0.5, 1, None)
    assert (config.rounds, config.lr, config.seed, config.local_epochs) == (2, 0.01, 3, 1)
    assert config.devices == ["rtx-a6000", "jetson-orin-nano-8gb"] and config.alphas == [0.5, 1.0]
    assert config.model is None and config.client_timeout_s == 30.0
    with pytest.raises(ConfigError, match="alphas"):
        run_config_from_flower({"alphas": "0.5,x"})
    with pytest.raises(ConfigError, match="unknown setting"):
        run_config_from_flower({"roundz": 3})
    with pytest.raises(ConfigError, match="flat systems"):
        run_on_grid(LocalGrid(client_app.app, 2), tiny(reference, tmp_path, topology="hierarchical:2x1"), echo=quiet)


def test_a_plans_bit_maps_travel_in_the_training_message():
    from flwr.app import ConfigRecord

    from fedhq.fl.client import RoundPlan
    from fedhq.flower.strategy import plan_record, read_plan

    values = {"round": 3, "epochs": 1, "batch_size": 8, "lr": 0.1, "momentum": 0.9, "bits": 6, "seed": 4}
    for maps in ({}, {"upload_bits": {"0.weight": 2}}, {"upload_bits": {"a": 3}, "download_bits": {"b": 5}}):
        plan = RoundPlan(strategy="qat", **values, **maps)
        assert read_plan("qat", ConfigRecord(plan_record(plan))) == plan


@pytest.mark.parametrize("strategy", ["aqfl", "fedhq-budget", "fedlq"])
def test_flower_runs_the_mixed_precision_strategies_with_the_embedded_numbers(reference, tmp_path, strategy):
    config = tiny(reference, tmp_path / "embedded", strategy=strategy, clients=6, rounds=1)
    embedded = engine.run(config, echo=quiet)
    flower = run_on_grid(LocalGrid(client_app.app, 6), config.replace(output_dir=str(tmp_path / "flower")), echo=quiet)
    assert flower["rounds"][0]["rejected"] == [] and flower["rounds"][0]["participants"] == list(range(6))
    for key in ("accuracy", "upload_bytes", "sim_s"):
        assert flower["rounds"][0][key] == embedded["rounds"][0][key], key


def test_flower_refuses_fedmpq(reference, tmp_path):
    with pytest.raises(ConfigError, match="does not run fedmpq"):
        run_on_grid(LocalGrid(client_app.app, 2), tiny(reference, tmp_path, clients=2, strategy="fedmpq"), echo=quiet)


def test_each_node_receives_the_global_model_at_its_plans_bits(reference, tmp_path, monkeypatch):
    """Per-client downlink on both engines: client 1 asks for its first layer at 3 bits
    and uploads it at 5; the numbers are the embedded engine's."""
    import dataclasses

    from fedhq.fl import precision

    class OwnBits(precision.Uniform):
        def plan(self, client, plan):
            if client != 1:
                return plan
            return dataclasses.replace(plan, download_bits={"conv1.weight": 3}, upload_bits={"conv1.weight": 5})

    monkeypatch.setattr(engine, "precision_policy", lambda config, *args: OwnBits(config))
    config = tiny(reference, tmp_path / "embedded", strategy="fedfq", clients=3, rounds=2)
    embedded = engine.run(config, echo=quiet)
    sent = {}

    def capture(reply, msg):
        layout = msg.content["layout"]
        sent.setdefault(msg.metadata.dst_node_id - 1000, set()).add(
            dict(zip(layout["quantized"], layout["bits"]))["conv1.weight"]
        )
        return reply

    grid = LocalGrid(client_app.app, 3, {p: _not_for_query(capture) for p in range(3)})
    flower = run_on_grid(grid, config.replace(output_dir=str(tmp_path / "flower")), echo=quiet)
    assert sent == {0: {8}, 1: {3}, 2: {8}}
    assert all(row["rejected"] == [] for row in flower["rounds"])
    for f, e in zip(flower["rounds"], embedded["rounds"], strict=True):
        assert (f["accuracy"], f["upload_bytes"]) == (e["accuracy"], e["upload_bytes"])
