"""The attack suite on both engines (fedhq.fl.attacks): client 0 of 10 attacks. Every
round completes, the honest clients' updates are used every round, the global model
stays finite, a rejectable attack is rejected every round with its reason, and against
the in-bound ones trimmed-mean and median stay within 2 points of the clean run."""

import math

import pytest
import torch

import fedhq_kernels as fk
from fedhq.fl import checkpoint, engine
from fedhq.fl.attacks import ATTACKS, IN_BOUND, attack_report, attacking
from fedhq.fl.client import train_local
from fedhq.fl.config import RunConfig

REJECTED = [name for name, a in ATTACKS.items() if a.rejected is not None]


def quiet(line: str) -> None:
    pass


def config_for(reference, out, **changes) -> RunConfig:
    settings = {
        "strategy": "fedfq",  # PTQ only: the cheapest; the checks are the same for every strategy
        "clients": 10,
        "rounds": 2,
        "local_epochs": 1,
        "partition": "iid",
        "threads": 1,
        "output_dir": str(out),
        "reference_profile": reference,
    }
    return RunConfig(**(settings | changes)).validated()


def run(config: RunConfig, attack: str | None, flower: bool = False) -> dict:
    if not flower:
        train_fn = attacking(ATTACKS[attack]) if attack else train_local
        return engine.run(config, echo=quiet, train_fn=train_fn)
    from flower_support import LocalGrid

    from fedhq.flower import client_app
    from fedhq.flower.attacks import reply_fault
    from fedhq.flower.server_app import run_on_grid

    grid = LocalGrid(client_app.app, config.clients, {0: reply_fault(attack)} if attack else {})
    return run_on_grid(grid, config, echo=quiet)


def assert_survived(results: dict, config: RunConfig) -> dict:
    """Every round completed with every honest client's update; the model finite."""
    report = attack_report(results)
    assert report["rounds_completed"] == config.rounds
    assert report["honest_used"], [r["rejected"] for r in results["rounds"]]
    state = checkpoint.load(f"{config.output_dir}/{engine.CHECKPOINT_FILE}")["server_state"]
    assert all(bool(torch.isfinite(v).all()) for v in fk.dequantize_state_dict(state).values())
    assert math.isfinite(report["final_deployed_accuracy"])
    return report


@pytest.mark.parametrize("flower", [False, True], ids=["embedded", "flower"])
@pytest.mark.parametrize("attack", REJECTED)
def test_a_rejectable_attack_is_rejected_every_round(reference, tmp_path, attack, flower):
    if flower:
        pytest.importorskip("flwr", reason="the Flower adapter needs the flower extra")
        from fedhq.flower.attacks import REJECTED as words
    else:
        words = {name: a.rejected for name, a in ATTACKS.items()}
    config = config_for(reference, tmp_path)
    report = assert_survived(run(config, attack, flower), config)
    assert report["attacker_rejected"] == config.rounds
    assert report["reasons"] and all(words[attack] in reason for reason in report["reasons"]), report["reasons"]


@pytest.mark.parametrize("attack", [a.name for a in IN_BOUND])
def test_an_in_bound_attack_passes_every_check_on_flower(reference, tmp_path, attack):
    pytest.importorskip("flwr", reason="the Flower adapter needs the flower extra")
    config = config_for(reference, tmp_path, aggregation="median")
    report = assert_survived(run(config, attack, flower=True), config)
    assert report["attacker_rejected"] == 0  # only aggregation answers it


@pytest.fixture(scope="module")
def robust_runs(reference, tmp_path_factory):
    """Seed 0, 10 rounds: the clean run and each in-bound attack, per robust aggregation."""
    runs = {}
    for aggregation in ("trimmed-mean:0.1", "median"):
        for attack in [None, *(a.name for a in IN_BOUND)]:
            out = tmp_path_factory.mktemp("robust")
            config = config_for(reference, out, rounds=10, aggregation=aggregation)
            runs[aggregation, attack] = config, run(config, attack)
    return runs


@pytest.mark.parametrize("aggregation", ["trimmed-mean:0.1", "median"])
def test_robust_aggregation_holds_against_in_bound_attacks(robust_runs, aggregation):
    clean = robust_runs[aggregation, None][1]["final_deployed_accuracy"]
    assert clean > 0.85
    for attack in IN_BOUND:
        config, results = robust_runs[aggregation, attack.name]
        report = assert_survived(results, config)
        assert report["attacker_rejected"] == 0
        assert report["final_deployed_accuracy"] >= clean - 0.02, (attack.name, report, clean)


def test_mean_is_wrecked_by_in_bound_noise(reference, tmp_path):
    """What robust aggregation is for: the noise passes every check, and the mean takes it."""
    clean = run(config_for(reference, tmp_path / "clean"), None)["final_deployed_accuracy"]
    config = config_for(reference, tmp_path / "noise")
    results = run(config, "noise")
    assert len(results["rounds"]) == config.rounds and attack_report(results)["attacker_rejected"] == 0
    assert results["final_deployed_accuracy"] < clean - 0.3, (results["final_deployed_accuracy"], clean)
