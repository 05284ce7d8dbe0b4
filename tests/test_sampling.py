"""Client sampling (fedhq.fl.sampling): K clients per round among the available ones,
seeded by (seed, round); availability traces; the runs it changes and the one it must
not (every client sampled is today's run, bit for bit); resume; a 200-client run."""

import csv
import json

import numpy as np
import pytest
import torch

import fedhq_kernels as fk
from fedhq import cli, report
from fedhq.fl import ConfigError, RunConfig, checkpoint, engine
from fedhq.fl.sampling import Sampler, read_trace

# every number a round's row holds that does not depend on the wall clock
SAME = ("accuracy", "loss", "deployed_accuracy", "deployed_loss", "train_loss", "sim_s", "upload_bytes")


def tiny(reference, tmp_path, **changes) -> RunConfig:
    settings = dict(clients=4, rounds=2, local_epochs=1, output_dir=str(tmp_path / "run"), reference_profile=reference)
    return RunConfig(**(settings | changes)).validated()


def quiet(config, **kwargs):
    return engine.run(config, echo=lambda s: None, **kwargs)


def write_trace(path, rows) -> str:
    path.write_text("\n".join(",".join(str(v) for v in row) for row in rows) + "\n")
    return str(path)


def numbers(results) -> list[list]:
    return [[r[k] for k in SAME] + [r["participants"]] for r in results["rounds"]]


def saved_model(folder):
    return checkpoint.load(folder / "checkpoint.pt")["server_state"]


def assert_same_model(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name, q in a.items():
        if isinstance(q, fk.QuantizedTensor):
            assert torch.equal(q.data, b[name].data) and torch.equal(q.scale, b[name].scale), name
        else:
            assert torch.equal(q, b[name]), name


# ---- the sampler ----


def test_a_sample_is_k_distinct_available_clients_seeded_by_seed_and_round():
    always = Sampler(seed=3, per_round=5, available=None)
    clients = list(range(20))
    draws = [always.sample(r, clients)[0] for r in range(1, 401)]
    for sample in draws:
        assert len(sample) == 5 and len(set(sample)) == 5 and sample == sorted(sample)
        assert set(sample) <= set(clients)
    assert draws == [always.sample(r, clients)[0] for r in range(1, 401)]  # a function of (seed, round)
    assert len({tuple(d) for d in draws}) > 300  # and not the same sample every round
    other_seed = Sampler(seed=4, per_round=5, available=None)
    assert [other_seed.sample(r, clients)[0] for r in range(1, 401)] != draws
    # uniform: each client trains in K/N = 1/4 of the rounds (100 of 400; sd ~8.7)
    counts = np.bincount(np.concatenate(draws), minlength=20)
    assert counts.min() > 60 and counts.max() < 140, counts


def test_only_available_clients_are_drawn_and_too_few_are_all_taken():
    trace = np.ones((6, 3), dtype=bool)
    trace[[0, 1, 2], 0] = False  # round 1: clients 3, 4, 5
    trace[[0, 2, 3, 4, 5], 1] = False  # round 2: client 1 alone
    trace[:, 2] = False  # round 3: nobody
    sampler = Sampler(seed=0, per_round=2, available=trace)
    first, available = sampler.sample(1, list(range(6)))
    assert available == [3, 4, 5] and len(first) == 2 and set(first) <= {3, 4, 5}
    assert sampler.sample(2, list(range(6))) == ([1], [1])
    assert sampler.sample(3, list(range(6))) == ([], [])
    # candidates the run cannot reach (a Flower node left out) are never drawn
    assert sampler.sample(1, [0, 1, 3]) == ([3], [3])


def test_a_trace_file_is_a_client_by_round_matrix_of_0_and_1(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text("# client x round\n1, 0,1\n\n0,0,1\n")
    assert read_trace(path, clients=2, rounds=3).tolist() == [[True, False, True], [False, False, True]]
    assert read_trace(path, clients=2, rounds=2).shape == (2, 3)  # longer than the run: the rest unused
    cases = [
        ("1,0\n1,x\n", 2, 2, r"trace.csv, line 2: cells must be 0 or 1, got 'x'"),
        ("1,0\n1,2\n", 2, 2, r"line 2: cells must be 0 or 1, got '2'"),
        ("1,0\n1,\n", 2, 2, r"line 2: cells must be 0 or 1, got ''"),
        ("1,0,1\n1,0\n", 2, 2, r"line 2: client 1's row has 2 rounds, client 0's 3"),
        ("1,0\n", 2, 2, r"has 1 client rows but the run has clients = 2"),
        ("", 2, 2, r"has 0 client rows but the run has clients = 2"),
        ("1,0\n1,1\n", 2, 3, r"covers 2 rounds but the run has rounds = 3"),
    ]
    for text, clients, rounds, message in cases:
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            read_trace(path, clients, rounds)
    with pytest.raises(ConfigError, match="availability file .*missing.csv does not exist"):
        read_trace(tmp_path / "missing.csv", 2, 2)
    path.write_bytes(b"\xff\xfe1,0\n")
    with pytest.raises(ConfigError, match="is not readable"):
        read_trace(path, 1, 2)


# ---- settings ----


def test_clients_per_round_is_a_count_or_a_fraction_and_bad_values_name_the_setting():
    assert RunConfig(clients=1000, clients_per_round=50).per_round == 50
    assert RunConfig(clients=1000, clients_per_round=0.05).per_round == 50
    assert RunConfig(clients=10, clients_per_round=0.01).per_round == 1  # at least one
    assert RunConfig(clients=10).per_round == 10 and not RunConfig(clients=10).samples_clients
    assert not RunConfig(clients=10, clients_per_round=1.0).samples_clients
    assert RunConfig(clients=10, clients_per_round=np.int64(3)).validated().clients_per_round == 3
    for bad in (0, 11, -1, 0.0, 1.5, -0.5, float("nan"), True, "5", [5]):
        with pytest.raises(ConfigError, match=r"clients_per_round must be an int in \[1, clients = 10\]"):
            RunConfig(clients=10, clients_per_round=bad).validated()
    with pytest.raises(ConfigError, match="availability must be a non-empty string or null"):
        RunConfig(availability="").validated()
    with pytest.raises(ConfigError, match="sample a flat system's clients: unset topology"):
        RunConfig(clients=4, clients_per_round=2, topology="hierarchical:2x1").validated()
    with pytest.raises(ConfigError, match="adjust observes every client in every round"):
        RunConfig(clients_per_round=2, adjust=True).validated()
    # sampling every client is no sampling: allowed with either
    RunConfig(clients=4, clients_per_round=4, topology="hierarchical:2x1").validated()


def test_cli_flags(reference, tmp_path, capsys):
    parser = cli.build_parser()
    assert parser.parse_args(["run", "--clients-per-round", "50"]).clients_per_round == 50
    assert parser.parse_args(["run", "--clients-per-round", "0.05"]).clients_per_round == 0.05
    assert parser.parse_args(["run", "--availability", "t.csv"]).availability == "t.csv"
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--clients-per-round", "half"])
    assert "expected an int or a fraction, got 'half'" in capsys.readouterr().err
    assert cli.main(["run", "--clients", "4", "--clients-per-round", "5", "--output", str(tmp_path)]) == 2
    assert "clients_per_round must be an int in [1, clients = 4]" in capsys.readouterr().err
    for command in ("run", "compare"):  # checked before the data loads
        args = [command, "--clients", "2", "--availability", str(tmp_path / "none.csv"), "--output", str(tmp_path)]
        assert cli.main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert (
            len(err) == 1 and f"fedhq {command}: error: availability file" in err[0] and "none.csv does not" in err[0]
        )


# ---- runs ----


def test_sampling_every_client_is_the_run_without_sampling_bit_for_bit(reference, tmp_path):
    plain = quiet(tiny(reference, tmp_path / "plain"))
    trace = write_trace(tmp_path / "on.csv", [[1, 1]] * 4)
    for name, changes in {
        "all": {"clients_per_round": 4},
        "trace": {"clients_per_round": 1.0, "availability": trace},
    }.items():
        run = quiet(tiny(reference, tmp_path / name, **changes))
        assert numbers(run) == numbers(plain), name
        assert [r["sampled"] for r in run["rounds"]] == [[0, 1, 2, 3]] * 2
        assert_same_model(saved_model(tmp_path / name / "run"), saved_model(tmp_path / "plain" / "run"))
    assert plain["rounds"][0]["sampled"] == [0, 1, 2, 3] and plain["rounds"][0]["available"] == 4
    # a real sample moves no other draw: partition, alphas, betas, batches, allocation
    half = quiet(tiny(reference, tmp_path / "half", clients_per_round=2, rounds=1))
    assert half["clients"] == plain["clients"] and len(half["rounds"][0]["sampled"]) == 2


def test_a_sampled_run_trains_the_drawn_clients_and_times_only_them(reference, tmp_path):
    # round 1: everyone; round 2: nobody (skipped); round 3: client 4 alone
    trace = write_trace(tmp_path / "t.csv", [[1, 0, 0], [1, 0, 0], [1, 0, 0], [1, 0, 0], [1, 0, 1], [1, 0, 0]])
    # round 1's draw trains on workstations, the four it leaves out are phones with 30% of
    # their compute (equal shards, all PTQ): a round that waited for them would be far longer
    drawn = Sampler(seed=0, per_round=2, available=None).sample(1, list(range(6)))[0]
    devices = ["rtx-a6000" if c in drawn else "phone-snapdragon-8-gen-2" for c in range(6)]
    betas = [1.0 if c in drawn else 0.3 for c in range(6)]
    config = tiny(reference, tmp_path, clients=6, rounds=3, clients_per_round=2, availability=trace, strategy="fedfq")
    config = config.replace(devices=devices, betas=betas, partition="iid")
    lines = []
    results = engine.run(config, echo=lines.append)
    first, skipped, alone = results["rounds"]
    assert first["sampled"] == Sampler.of(config).sample(1, list(range(6)))[0] and len(first["sampled"]) == 2
    assert first["participants"] == first["sampled"] and first["available"] == 6
    clients = {c["id"]: c for c in results["clients"]}
    # the round lasts as long as its slowest sampled client (predicted: whole batches, as trained)
    finish = {
        cid: clients[cid]["predicted_s"][clients[cid]["strategy"]] + clients[cid]["predicted_s"]["upload"]
        for cid in first["sampled"]
    }
    assert first["sim_s"] == pytest.approx(max(finish.values()), rel=1e-9)
    slowest_of_all = max(
        clients[c]["predicted_s"][clients[c]["strategy"]] + clients[c]["predicted_s"]["upload"] for c in clients
    )
    assert slowest_of_all > 3 * first["sim_s"]  # the round did not wait for an unsampled phone
    assert first["slowest_client"] == max(finish, key=finish.get)
    assert first["upload_bytes"] == 2 * results["rounds"][2]["upload_bytes"]
    assert (skipped["sampled"], skipped["participants"], skipped["available"], skipped["sim_s"]) == ([], [], 0, 0.0)
    assert (skipped["accuracy"], skipped["loss"]) == (first["accuracy"], first["loss"])  # the model did not move
    assert (alone["sampled"], alone["participants"], alone["available"]) == ([4], [4], 1)
    assert any("round 2: 0 of 6 clients available" in line and "round skipped" in line for line in lines)
    assert any("round 3: 1 of 6 clients available, fewer than K = 2" in line for line in lines)
    with (tmp_path / "run" / "results.json").open() as f:
        assert [r["sampled"] for r in json.load(f)["rounds"]] == [first["sampled"], [], [4]]
    report.write_run_report(results, tmp_path / "run")
    with (tmp_path / "run" / "rounds.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["sampled"] for r in rows] == [" ".join(map(str, first["sampled"])), "", "4"]
    assert [r["available"] for r in rows] == ["6", "0", "1"]


def test_every_strategy_of_a_comparison_trains_the_same_clients(reference, tmp_path, capsys):
    args = "compare --strategies fedhq,fedfq --clients 6 --clients-per-round 2 --rounds 2 --local-epochs 1"
    assert cli.main([*args.split(), "--reference-profile", reference, "--output", str(tmp_path)]) == 0
    runs = json.loads((tmp_path / "comparison.json").read_text())["runs_by_seed"]["0"]
    fedhq, fedfq = ([r["sampled"] for r in runs[name]["rounds"]] for name in ("fedhq", "fedfq"))
    assert fedhq == fedfq and all(len(s) == 2 for s in fedhq)


def test_a_resumed_sampled_run_draws_what_the_uninterrupted_one_drew(reference, tmp_path):
    settings = dict(clients=6, clients_per_round=0.5, strategy="fedaqt")  # QAT: observers are client state
    full = quiet(tiny(reference, tmp_path / "straight", rounds=3, **settings))
    split = tiny(reference, tmp_path / "split", rounds=2, **settings)
    quiet(split)
    resumed = quiet(split.replace(rounds=3), resume=True)
    assert [r["sampled"] for r in resumed["rounds"]] == [r["sampled"] for r in full["rounds"]]
    assert numbers(resumed) == numbers(full)
    assert len({tuple(r["sampled"]) for r in full["rounds"]}) > 1  # the rounds drew different clients
    assert_same_model(saved_model(tmp_path / "split" / "run"), saved_model(tmp_path / "straight" / "run"))


def test_two_hundred_clients_ten_per_round(tmp_path):
    """The CI-sized version of README's 1,000-client run: client state stays with the
    clients that trained, and only they upload."""
    config = RunConfig(
        dataset="synthetic",
        partition="iid",
        clients=200,
        clients_per_round=10,
        rounds=2,
        local_epochs=1,
        strategy="fedaqt",
        output_dir=str(tmp_path / "run"),
    )
    results = quiet(config)
    trained = set()
    for row in results["rounds"]:
        assert len(row["sampled"]) == 10 and row["participants"] == row["sampled"]
        trained |= set(row["sampled"])
    assert len(results["clients"]) == 200
    states = checkpoint.load(tmp_path / "run" / "checkpoint.pt")["client_states"]
    assert {int(cid) for cid, observers in states.items() if observers} == trained
    per_update = results["rounds"][0]["upload_bytes"] / 10
    assert all(r["upload_bytes"] == 10 * per_update for r in results["rounds"])
