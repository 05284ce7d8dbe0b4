"""The embedded FL engine end to end: strategies, bad clients, timeouts, checkpoint and
resume, reproducibility, config errors and the CLI. Tiny runs: digits, 3-4 clients."""

import json
import math

import pytest
import torch

import fedhq_kernels as fk
from fedhq import cli
from fedhq.fl import ConfigError, RunConfig, checkpoint, engine
from fedhq.fl.client import Update, train_local
from fedhq.models import ModelSpec


def tiny(reference, tmp_path, **changes) -> RunConfig:
    settings = dict(
        clients=4,
        rounds=2,
        local_epochs=2,
        batch_size=16,
        output_dir=str(tmp_path / "run"),
        reference_profile=reference,
    )
    settings.update(changes)
    return RunConfig(**settings).validated()


def quiet(config, **kwargs):
    return engine.run(config, echo=lambda s: None, **kwargs)


@pytest.mark.parametrize("strategy", ["fedhq", "fedaqt", "fedfq", "fedrh", "fp32"])
def test_every_strategy_runs_and_reports(reference, tmp_path, strategy):
    results = quiet(tiny(reference, tmp_path, strategy=strategy))
    assert results["schema"] == "fedhq.run/2" and len(results["rounds"]) == 2
    assert json.loads((tmp_path / "run" / "results.json").read_text())["final_accuracy"] == results["final_accuracy"]
    assert results["final_accuracy"] > 0.3  # 10 classes: well above chance after 2 rounds
    strategies = [c["strategy"] for c in results["clients"]]
    expected = {"fedaqt": {"qat"}, "fedfq": {"ptq"}, "fp32": {"fp32"}}.get(strategy)
    if expected:
        assert set(strategies) == expected
    assert sorted(results["allocation"]["ptq"] + results["allocation"]["qat"]) == (
        [] if strategy == "fp32" else list(range(4))
    )
    for row in results["rounds"]:
        assert row["participants"] == [0, 1, 2, 3] and row["rejected"] == []
        assert row["sim_s"] > 0 and row["upload_bytes"] > 0
        assert 0 < row["deployed_accuracy"] <= 1 and math.isfinite(row["deployed_loss"])
        if strategy == "fp32":  # the float model is what fp32 deploys
            assert (row["deployed_accuracy"], row["deployed_loss"]) == (row["accuracy"], row["loss"])
        else:  # INT8 activations move the loss, a little
            assert row["deployed_loss"] != row["loss"] and abs(row["deployed_accuracy"] - row["accuracy"]) < 0.05
    assert results["final_deployed_accuracy"] == results["rounds"][-1]["deployed_accuracy"]
    for c in results["clients"]:
        assert 0 < c["norm_speed"] < 1 and 0 < c["norm_acc"] < 1 and c["batch"] >= 1


def test_int8_upload_is_about_four_times_smaller(reference, tmp_path):
    int8 = quiet(tiny(reference, tmp_path / "a", strategy="fedfq", rounds=1))
    fp32 = quiet(tiny(reference, tmp_path / "b", strategy="fp32", rounds=1))
    ratio = fp32["upload_bytes"] / int8["upload_bytes"]
    assert 3.5 < ratio < 4.0  # 4 bytes -> 1 byte per weight, plus per-channel scales and zero points


def test_fedrh_is_seeded(reference, tmp_path):
    first = quiet(tiny(reference, tmp_path / "a", strategy="fedrh", clients=8, rounds=1))
    again = quiet(tiny(reference, tmp_path / "b", strategy="fedrh", clients=8, rounds=1))
    other = [
        quiet(tiny(reference, tmp_path / f"s{s}", strategy="fedrh", clients=8, rounds=1, seed=s)) for s in (1, 2, 3)
    ]
    assert first["allocation"] == again["allocation"]
    assert any(o["allocation"]["ptq"] != first["allocation"]["ptq"] for o in other)


def test_same_seed_same_numbers(reference, tmp_path):
    a = quiet(tiny(reference, tmp_path / "a"))
    b = quiet(tiny(reference, tmp_path / "b"))
    keys = ("accuracy", "loss", "train_loss", "sim_s", "upload_bytes")
    assert [[r[k] for k in keys] for r in a["rounds"]] == [[r[k] for k in keys] for r in b["rounds"]]
    c = quiet(tiny(reference, tmp_path / "c", seed=7))
    assert [r["loss"] for r in c["rounds"]] != [r["loss"] for r in a["rounds"]]


def test_giving_the_drawn_alphas_changes_nothing_else(reference, tmp_path):
    drawn = quiet(tiny(reference, tmp_path / "a", rounds=1))
    given = quiet(tiny(reference, tmp_path / "b", rounds=1, alphas=[c["alpha"] for c in drawn["clients"]]))
    assert given["clients"] == drawn["clients"]  # betas, partition, batches, allocation
    keys = ("accuracy", "loss", "train_loss", "sim_s")
    assert [given["rounds"][0][k] for k in keys] == [drawn["rounds"][0][k] for k in keys]  # shuffles too


def test_resume_equals_an_uninterrupted_run(reference, tmp_path):
    straight = tiny(reference, tmp_path / "straight", rounds=3, strategy="fedaqt")  # QAT: observers are client state
    full = quiet(straight)
    split = tiny(reference, tmp_path / "split", rounds=2, strategy="fedaqt")
    quiet(split)
    resumed = quiet(split.replace(rounds=3), resume=True)
    keys = ("accuracy", "loss", "train_loss", "sim_s")
    assert [[r[k] for k in keys] for r in resumed["rounds"]] == [[r[k] for k in keys] for r in full["rounds"]]
    a = checkpoint.load(tmp_path / "straight" / "run" / "checkpoint.pt")
    b = checkpoint.load(tmp_path / "split" / "run" / "checkpoint.pt")
    for name, q in a["server_state"].items():
        other = b["server_state"][name]
        if isinstance(q, fk.QuantizedTensor):
            assert torch.equal(q.data, other.data) and torch.equal(q.scale, other.scale), name
        else:
            assert torch.equal(q, other), name
    for cid, observers in a["client_states"].items():
        assert observers.keys() == b["client_states"][cid].keys() and observers
        assert all(torch.equal(v, b["client_states"][cid][k]) for k, v in observers.items())


def test_resume_refuses_other_settings_or_no_checkpoint(reference, tmp_path):
    config = tiny(reference, tmp_path, rounds=1)
    with pytest.raises(ConfigError, match="no checkpoint"):
        quiet(config, resume=True)
    quiet(config)
    with pytest.raises(ConfigError, match=r"different settings: \['lr'\]"):
        quiet(config.replace(lr=0.1, rounds=2), resume=True)


def _faulty(faults):
    """train_local, except for the clients in ``faults`` (id -> how the update breaks)."""

    def train(spec, weights, data, plan, client, state):
        update, new_state = train_local(spec, weights, data, plan, client, state)
        fault = faults.get(client)
        if fault == "raise":
            raise RuntimeError("device lost")
        if fault == "nan_scale":
            name = next(k for k, v in update.state.items() if isinstance(v, fk.QuantizedTensor))
            q = update.state[name]
            update.state[name] = fk.QuantizedTensor(
                q.data, torch.full_like(q.scale, math.nan), q.zero_point, q.bits, q.axis, q.symmetric, q.dtype, q.shape
            )
        if fault == "missing_key":
            update.state.pop(next(iter(update.state)))
        if fault == "wrong_shape":
            name = next(iter(update.state))
            update.state[name] = fk.quantize(torch.randn(3, 3))
        if fault == "zero_samples":
            update = Update(update.client, update.state, 0, update.train_loss, update.steps, update.wall_s)
        return update, new_state

    return train


def test_bad_clients_are_left_out_and_the_round_goes_on(reference, tmp_path):
    faults = {0: "raise", 1: "nan_scale", 2: "missing_key", 3: "wrong_shape", 4: "zero_samples"}
    results = quiet(tiny(reference, tmp_path, clients=6, strategy="fedfq"), train_fn=_faulty(faults))
    reasons = {r["client"]: r["reason"] for r in results["rounds"][0]["rejected"]}
    assert set(reasons) == set(faults)
    assert "device lost" in reasons[0] and "finite" in reasons[1] and "missing" in reasons[2]
    assert "shape" in reasons[3] and "num_samples" in reasons[4]
    assert all(r["participants"] == [5] for r in results["rounds"])
    state = checkpoint.load(tmp_path / "run" / "checkpoint.pt")["server_state"]
    assert all(bool(torch.isfinite(q.scale).all()) for q in state.values() if isinstance(q, fk.QuantizedTensor))
    assert results["final_accuracy"] > 0.2


def test_when_no_update_is_usable_the_global_model_is_kept(reference, tmp_path):
    config = tiny(reference, tmp_path, rounds=2)
    faults = {c: "nan_scale" for c in range(4)}
    lines = []
    results = engine.run(config, echo=lines.append, train_fn=_faulty(faults))
    assert sum("| all 4 clients rejected: global model unchanged" in line for line in lines) == 2
    initial = fk.quantize_state_dict(engine.initial_model(config, ModelSpec.parse(config.model_spec_text)).state_dict())
    state = checkpoint.load(tmp_path / "run" / "checkpoint.pt")["server_state"]
    for name, q in initial.items():
        assert torch.equal(q.data, state[name].data) and torch.equal(q.scale, state[name].scale), name
    assert results["rounds"][0]["accuracy"] == results["rounds"][1]["accuracy"]
    assert all(r["participants"] == [] for r in results["rounds"])


def test_slow_clients_time_out(reference, tmp_path):
    results = quiet(tiny(reference, tmp_path, rounds=1, client_timeout_s=1e-9))
    assert all("timed out" in r["reason"] for r in results["rounds"][0]["rejected"])
    assert results["rounds"][0]["participants"] == []


def test_config_errors_name_the_setting(tmp_path):
    cases = [
        ({"strategy": "fedxyz"}, "unknown strategy 'fedxyz'"),
        ({"bits": 9}, "bits must be an int in"),
        ({"clients": 3, "alphas": [0.5, 0.5]}, "alphas has 2 values for 3 clients"),
        ({"betas": [1.5] * 10}, r"betas: every value must be in \(0, 1\]"),
        ({"xi": 1.0}, r"xi must be in \(0, 1\)"),
        ({"partition": "zipf"}, "unknown partition"),
        ({"devices": []}, "devices must be a non-empty list"),
    ]
    for settings, message in cases:
        with pytest.raises(ConfigError, match=message):
            RunConfig.from_dict(settings)
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"rounds": 3, "colour": "red"}))
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) \['colour'\]"):
        RunConfig.from_file(path)
    with pytest.raises(ConfigError, match="does not exist"):
        RunConfig.from_file(tmp_path / "missing.json")


def test_setup_errors(reference, tmp_path):
    with pytest.raises(ConfigError, match="dataset .cifar10.: dataset directory .*cifar-10-batches-py"):
        quiet(tiny(reference, tmp_path, dataset="cifar10", data_root=str(tmp_path / "nowhere")))
    with pytest.raises(ConfigError, match="partition"):
        quiet(tiny(reference, tmp_path, clients=5000, partition="iid"))
    with pytest.raises(ConfigError, match="takes"):
        quiet(tiny(reference, tmp_path, model="small_cnn@32x32x3:10"))
    with pytest.raises(ConfigError, match="unknown device preset"):
        quiet(tiny(reference, tmp_path, devices=["toaster"]))
    with pytest.raises(ConfigError, match="too small for batch 1"):
        quiet(tiny(reference, tmp_path, devices=["jetson-orin-nano-8gb"], alphas=[0.01] * 4))


def test_cli_run_writes_results_and_bad_settings_exit_2(reference, tmp_path, capsys):
    out = tmp_path / "cli"
    code = cli.main(
        [
            *"run --strategy fedhq --clients 3 --rounds 1 --local-epochs 1 --reference-profile".split(),
            reference,
            "--output",
            str(out),
        ]
    )
    assert code == 0
    assert json.loads((out / "results.json").read_text())["strategy"] == "fedhq"
    assert (out / "allocation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr()
    assert "last-5 mean accuracy" in printed.out and "round   1/1" in printed.err
    assert cli.main(["run", "--strategy", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "fedhq run: error: unknown strategy 'nope'; choose one of: fedhq, fedaqt, fedfq, fedrh, fp32, "
        "fedhq-rt, slackfill, fedrh-matched, aqfl, fedmpq, fedlq, fedhq-budget"
    ]
    assert cli.main(["run", "--dataset", "svhn", "--data-root", str(tmp_path)]) == 2
    assert "train_32x32.mat" in capsys.readouterr().err


def test_cli_compare_runs_every_strategy_on_the_same_setup(reference, tmp_path, capsys):
    out = tmp_path / "cmp"
    code = cli.main(
        [
            *"compare --strategies fedhq,fedfq --clients 3 --rounds 1 --local-epochs 1 --reference-profile".split(),
            reference,
            "--output",
            str(out),
        ]
    )
    assert code == 0
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["seeds"] == [0] and list(comparison["runs_by_seed"]["0"]) == ["fedhq", "fedfq"]
    a, b = (comparison["runs_by_seed"]["0"][s] for s in ("fedhq", "fedfq"))
    assert [c["samples"] for c in a["clients"]] == [c["samples"] for c in b["clients"]]
    assert [c["device"] for c in a["clients"]] == [c["device"] for c in b["clients"]]
    for name in ("comparison.txt", "accuracy_vs_time.png", "allocation_fedhq.png"):
        assert (out / name).stat().st_size > 1000 or name.endswith(".txt")
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert "fedhq" in rows and "fedfq" in rows  # the printed table has a row per strategy run


def test_max_test_keeps_a_seeded_stratified_subset_of_the_test_split():
    full = engine.load_data(RunConfig())
    kept = engine.load_data(RunConfig(max_test=100))
    assert len(kept.test) == 100 and len(kept.train) == len(full.train)
    counts = torch.bincount(kept.test.y, minlength=10)
    shares = torch.bincount(full.test.y, minlength=10) * 100 / len(full.test)
    assert bool(((counts - shares).abs() < 1).all())  # each class keeps its share
    # the same images for every strategy of a seed, others for another seed
    assert torch.equal(engine.load_data(RunConfig(max_test=100, strategy="fedfq")).test.x, kept.test.x)
    assert not torch.equal(engine.load_data(RunConfig(max_test=100, seed=1)).test.x, kept.test.x)
    assert len(engine.load_data(RunConfig(max_test=10**6)).test) == len(full.test)
    with pytest.raises(ConfigError, match="max_test must be an int >= 1, got 0"):
        RunConfig(max_test=0).validated()
