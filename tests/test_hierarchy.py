"""Hierarchical systems and FedHQ's fine-grained adjustment: the tree, its
aggregation (a one-level tree is exactly the flat system), its time, detection,
Situation 1 and 2, the ranking model, snapshot isolation, and bad input."""

import json

import numpy as np
import pytest
import torch
from torch import nn

import fedhq_kernels as fk
from fedhq.allocation import adjust
from fedhq.fl import ConfigError, RunConfig, adjustment, engine
from fedhq.fl.client import Update, quantize_upload, quantized_names
from fedhq.fl.server import Server
from fedhq.fl.topology import Topology, TopologyError

# ---- the tree ----


def test_hierarchical_shape_levels_and_orders():
    t = Topology.hierarchical(3, 4)
    assert t.size == 15 and t.children(None) == [0, 1, 2] and t.children(1) == [7, 8, 9, 10]
    assert [t.level(n) for n in (0, 3, 14)] == [2, 3, 3]
    assert t.subtree(1) == [1, 7, 8, 9, 10]
    order = t.bottom_up()
    assert all(order.index(c) < order.index(p) for c, p in enumerate(t.parents) if p is not None)
    strategies = ["qat"] * 15
    strategies[3] = strategies[4] = "ptq"
    assert t.per_level([1, 3, 4], strategies) == [[], ["C1^QAT"], ["C3^PTQ", "C4^PTQ"]]
    assert Topology.flat(4).is_flat and not t.is_flat


def test_topology_from_a_file_and_bad_trees(tmp_path):
    path = tmp_path / "tree.json"
    path.write_text(json.dumps({"parents": [None, 0, 0, 1], "trains": [False, True, True, True]}))
    t = Topology.parse(str(path), 4)
    assert t.level(3) == 4 and t.trains[0] is False
    bad = [
        ((None, 2, 1), (True,) * 3, "cycle"),
        ((None, 1), (True,) * 2, "its own parent"),
        ((None, 5), (True,) * 2, "not a node id"),
        ((None, None), (True, False), "no data"),
        ((1, 0), (True,) * 2, "cycle"),
    ]
    for parents, trains, words in bad:
        with pytest.raises(TopologyError, match=words):
            Topology(parents, trains)
    with pytest.raises(TopologyError, match="has 15 nodes but the run has clients = 10"):
        Topology.parse("hierarchical:3x4", 10)
    with pytest.raises(TopologyError, match="neither"):
        Topology.parse("tree-please", 3)
    with pytest.raises(ConfigError, match="cycle"):
        path.write_text(json.dumps({"parents": [1, 0, None]}))
        engine.run(
            RunConfig(
                clients=3,
                rounds=1,
                topology=str(path),
                output_dir=str(tmp_path / "o"),
                reference_profile=str(tmp_path / "none.json"),
            ),
            echo=lambda s: None,
        )


def test_round_time_follows_the_tree():
    flat = Topology.flat(3)
    compute, upload = {0: 1.0, 1: 3.0, 2: 2.0}, {0: 0.5, 1: 0.5, 2: 2.0}
    assert flat.round_time(compute, upload) == (4.0, 2)
    tree = Topology((None, 0, 0), (True,) * 3)  # node 0 aggregates 1 and 2
    # node 0 waits for max(own 1.0, child 1: 3.5, child 2: 4.0) then uploads 0.5
    assert tree.round_time(compute, upload) == (4.5, 2)
    assert tree.round_time({0: 9.0, 1: 1.0, 2: 1.0}, upload) == (9.5, 0)


# ---- aggregation along the tree ----


@pytest.fixture
def updates(gen):
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    names = quantized_names(net)
    result = []
    for client in range(5):
        weights = {
            k: v + torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
            for k, v in net.state_dict().items()
        }
        result.append(Update(client, quantize_upload(weights, names, 8), 10 + 7 * client, 0.0, 1, 0.0))
    return net, names, result


def _equal(a, b):
    for name, value in a.items():
        if isinstance(value, fk.QuantizedTensor):
            assert torch.equal(value.data, b[name].data) and torch.equal(value.scale, b[name].scale), name
        else:
            assert torch.equal(value, b[name]), name


def test_one_level_tree_equals_flat_aggregation(updates):
    net, names, ups = updates
    flat = Server(net.state_dict(), bits=8, quantized=names)
    flat.aggregate(ups)
    tree = Server(net.state_dict(), bits=8, quantized=names)
    _equal(tree.combine_tree(ups, Topology.flat(5)), flat.state)
    _equal(flat.state, fk.aggregate_state_dicts([u.state for u in ups], [u.num_samples for u in ups]))


def test_two_level_tree_aggregates_bottom_up(updates):
    net, names, ups = updates
    topology = Topology((None, None, 0, 0, 1), (True,) * 5)
    server = Server(net.state_dict(), bits=8, quantized=names)
    server.aggregate(ups, topology)
    w = [u.num_samples for u in ups]
    node0 = fk.aggregate_state_dicts([ups[0].state, ups[2].state, ups[3].state], [w[0], w[2], w[3]])
    node1 = fk.aggregate_state_dicts([ups[1].state, ups[4].state], [w[1], w[4]])
    _equal(server.state, fk.aggregate_state_dicts([node0, node1], [w[0] + w[2] + w[3], w[1] + w[4]]))


# ---- the adjustment's parts ----


def test_detection():
    times = {0: 1.0, 1: 1.1, 2: 3.0, 3: 0.9}
    flags = adjust.detect(times, {0: 0.0, 1: -0.05, 2: 0.01, 3: 0.0}, time_tolerance=0.5, acc_tolerance=0.01)
    assert [(f.client, [r.split(":")[0] for r in f.reasons]) for f in flags] == [(1, ["accuracy"]), (2, ["time"])]
    assert adjust.detect(times, {}, time_tolerance=10, acc_tolerance=0.01) == []
    with pytest.raises(ValueError, match="tolerances must be >= 0"):
        adjust.detect(times, {}, time_tolerance=-1, acc_tolerance=0)


def test_situation_1_flips_toward_what_helps():
    time_flag = adjust.Flag(3, ["time: slow"])
    acc_flag = adjust.Flag(3, ["accuracy: hurts"])
    assert adjust.flip_leaf(time_flag, "qat")[0] == "ptq"
    assert adjust.flip_leaf(acc_flag, "ptq")[0] == "qat"
    new, why = adjust.flip_leaf(time_flag, "ptq")
    assert new == "ptq" and "would not help" in why


def test_ranked_search_finds_the_best_subtree_with_few_trainings():
    """Time grows with each QAT node by a node-specific amount; accuracy needs node 2
    to be QAT. The best assignment (only node 2 QAT) must be found by training a
    fraction of the 2^4 candidates of the leaf level, ranked by the regression."""
    levels = [[0], [1, 2, 3, 4]]
    cost = {0: 3.0, 1: 1.0, 2: 0.5, 3: 2.0, 4: 1.5}
    calls = []

    def trial(assignment):
        calls.append(dict(assignment))
        seconds = 1.0 + sum(cost[n] for n, s in assignment.items() if s == "qat")
        return seconds, 0.9 if assignment[2] == "qat" else 0.8

    current = {n: "qat" for n in range(5)}
    report = adjust.search_subtree(levels, current, trial, budget=8, acc_tolerance=0.01, rng=np.random.default_rng(0))
    assert report.chosen == {0: "ptq", 1: "ptq", 2: "qat", 3: "ptq", 4: "ptq"}
    assert report.trained == len(calls) <= 8 and report.ranked > report.trained
    assert report.prediction_error() is not None and report.as_dict()["prediction_error"]["accuracy_abs"] >= 0
    none = adjust.search_subtree(levels, current, trial, budget=0, acc_tolerance=0.01, rng=np.random.default_rng(0))
    assert none.chosen == current and none.trained == 0 and len(calls) == report.trained


# ---- in a run ----


def hierarchical(reference, tmp_path, **changes):
    settings = dict(
        clients=6,
        topology="hierarchical:2x2",
        rounds=3,
        local_epochs=1,
        batch_size=16,
        adjust=True,
        adjust_after=1,
        adjust_budget=4,
        output_dir=str(tmp_path / "run"),
        reference_profile=reference,
    )
    settings.update(changes)
    return RunConfig(**settings).validated()


def test_adjustment_in_a_run_situations_ranking_and_snapshot_isolation(reference, tmp_path, monkeypatch):
    """Detection is forced to flag aggregator 0 (Situation 2) and leaf 5 (Situation 1);
    every candidate trial must leave the main run's model and client state untouched."""
    monkeypatch.setattr(
        adjustment,
        "detect",
        lambda *a, **k: [
            adjust.Flag(0, ["time: forced by the test"]),
            adjust.Flag(5, ["accuracy: forced by the test"]),
        ],
    )
    real_trial, checked = adjustment.trial, []

    def isolated_trial(ctx, assignment, first_round, validation):
        before = {
            k: (v.data.clone() if isinstance(v, fk.QuantizedTensor) else v.clone()) for k, v in ctx.server.state.items()
        }
        states = {c: {k: v.clone() for k, v in s.observers.items()} for c, s in ctx.states.items()}
        strategies = [c.strategy for c in ctx.clients]
        result = real_trial(ctx, assignment, first_round, validation)
        for k, v in ctx.server.state.items():
            assert torch.equal(v.data if isinstance(v, fk.QuantizedTensor) else v, before[k]), k
        assert all(torch.equal(ctx.states[c].observers[k], v) for c, s in states.items() for k, v in s.items())
        assert [c.strategy for c in ctx.clients] == strategies
        checked.append(assignment)
        return result

    monkeypatch.setattr(adjustment, "trial", isolated_trial)
    results = engine.run(hierarchical(reference, tmp_path), echo=lambda s: None)
    report = results["adjustment"]
    situations = {f["client"]: f["situation"] for f in report["flagged"]}
    assert situations == {0: 2, 5: 1}
    leaf = results["assignment_before"][5]
    assert results["assignment_after"][5] == "qat" and (leaf == "qat" or 5 in report["changed"])
    assert 1 <= report["trained"] <= 4 and len(checked) == report["trained"] and report["ranked"] >= 1
    assert report["searches"][0]["node"] == 0 and set(report["searches"][0]["chosen"]) == {"0", "2", "3"}
    assert results["timing"]["adjustment_s"] > 0 and len(results["rounds"]) == 3
    assert results["topology"]["levels"] == [2, 2, 3, 3, 3, 3]


def test_everyone_flagged_adjusts_nobody(reference, tmp_path, monkeypatch):
    monkeypatch.setattr(adjustment, "detect", lambda times, *a, **k: [adjust.Flag(c, ["time: x"]) for c in range(6)])
    results = engine.run(hierarchical(reference, tmp_path, rounds=2), echo=lambda s: None)
    assert "every client was flagged" in results["adjustment"]["note"]
    assert results["assignment_before"] == results["assignment_after"]


def test_adjust_settings_are_validated():
    with pytest.raises(ConfigError, match="needs strategy fedhq"):
        RunConfig(strategy="fedaqt", adjust=True).validated()
    with pytest.raises(ConfigError, match="adjust_after"):
        RunConfig(adjust=True, rounds=2, adjust_after=2).validated()
    with pytest.raises(ConfigError, match="adjust_budget must be an int >= 0"):
        RunConfig(adjust=True, adjust_budget=-1).validated()


def test_detection_against_the_prediction():
    times = {0: 1.0, 1: 1.0, 2: 1.0}
    flags = adjust.detect(times, {}, time_tolerance=0.2, acc_tolerance=0.01, predicted={0: 1.0, 1: 0.5, 2: 0.9})
    assert [f.client for f in flags] == [1] and "predicted 0.5" in flags[0].reasons[0]
