"""The two real Flower engines end to end: ``fedhq run --engine flower`` on Flower's
simulation engine (Ray), and a deployment on 127.0.0.1 (a SuperLink and two
SuperNodes as subprocesses, ``flwr run`` of the FedHQ app) that always leaves no
process behind."""

import json
import os
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="the Flower adapter needs the flower extra: pip install 'fedhq[flower]'")

from flower_support import LocalDeployment, descendants, measure_reference  # noqa: E402

import fedhq.flower  # noqa: E402
from fedhq import cli  # noqa: E402
from fedhq.fl import engine  # noqa: E402
from fedhq.fl.config import RunConfig  # noqa: E402

APP = Path(fedhq.flower.__file__).parent / "app"
PHONE = "phone-snapdragon-8-gen-2"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return measure_reference(tmp_path_factory.mktemp("reference"))


def embedded_allocation(config: RunConfig, reference: str) -> tuple[list[str], list[float]]:
    """(strategies, T_m) the embedded engine gives ``config``'s clients (no training)."""
    dataset = engine.load_data(config)
    spec = engine.model_spec(config, dataset)
    profile, _ = engine.reference_profile(config, spec, Path(config.output_dir), echo=lambda s: None)
    clients = engine.make_clients(config, dataset.train, spec, profile)
    times, speed_sig, acc_sig = engine.analyze(clients, spec, config)
    return engine.allocate(config, speed_sig, acc_sig), times


def _no_children_left(within_s: float) -> list[int]:
    deadline = time.monotonic() + within_s
    while descendants(os.getpid()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return descendants(os.getpid())


def test_fedhq_run_on_the_flower_simulation_engine(reference, tmp_path, capsys):
    out = tmp_path / "flower"
    args = ["run", "--engine", "flower", "--clients", "3", "--rounds", "2", "--local-epochs", "1",
            "--reference-profile", reference]  # fmt: skip
    assert cli.main([*args, "--output", str(out)]) == 0
    flower = json.loads((out / "results.json").read_text())
    assert flower["schema"] == "fedhq.run/1" and flower["engine"] == "flower" and flower["excluded"] == []
    assert (out / "allocation.png").exists()
    assert cli.main([*args[:1], *args[3:], "--output", str(tmp_path / "embedded")]) == 0
    embedded = json.loads((tmp_path / "embedded" / "results.json").read_text())
    assert flower["assignment_before"] == embedded["assignment_before"]
    for f, e in zip(flower["rounds"], embedded["rounds"], strict=True):  # same code, same threads: same numbers
        assert f["participants"] == [0, 1, 2] and (f["accuracy"], f["loss"]) == (e["accuracy"], e["loss"])
    assert _no_children_left(within_s=30) == []  # Ray's processes end with the run


def test_resume_and_a_missing_engine_are_refused(tmp_path, capsys):
    assert cli.main(["run", "--engine", "flower", "--resume", "--output", str(tmp_path)]) == 2
    assert "keeps no checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["run", "--engine", "carrier-pigeon"])


def test_deployment_on_this_machine(reference, tmp_path):
    out = tmp_path / "results"
    nodes = ["partition-id=0 num-partitions=2", f"partition-id=1 num-partitions=2 device='{PHONE}'"]
    env = {"FLWR_TELEMETRY_ENABLED": "0", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    with LocalDeployment(tmp_path / "flower", nodes, env) as deployment:
        run = deployment.run_app(APP, f"clients=2 rounds=2 local-epochs=1 output-dir='{out}' "
                                      f"reference-profile='{reference}'", timeout_s=240)  # fmt: skip
        logs = "\n".join(deployment.log(n) for n in ("superlink", "supernode0", "supernode1"))
    assert deployment.survivors == [], deployment.survivors
    assert run.returncode == 0 and (out / "results.json").exists(), run.stdout + run.stderr + logs
    results = json.loads((out / "results.json").read_text())
    assert results["engine"] == "flower" and results["excluded"] == []
    assert [c["device"] for c in results["clients"]] == ["rtx-a6000", PHONE]  # the node's own device profile

    config = RunConfig(clients=2, local_epochs=1, devices=["rtx-a6000", PHONE], output_dir=str(out),
                       reference_profile=reference)  # fmt: skip
    strategies, times = embedded_allocation(config, reference)
    assert results["assignment_before"] == strategies and [c["speed_time_s"] for c in results["clients"]] == times
    assert [r["participants"] for r in results["rounds"]] == [[0, 1], [0, 1]]
    assert results["rounds"][-1]["accuracy"] > results["rounds"][0]["accuracy"] > 0.3  # the global model learned
