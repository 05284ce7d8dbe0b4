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

from flower_support import LocalDeployment, descendants  # noqa: E402

import fedhq.flower  # noqa: E402
from fedhq import cli  # noqa: E402
from fedhq.fl import engine  # noqa: E402
from fedhq.fl.config import RunConfig  # noqa: E402

APP = Path(fedhq.flower.__file__).parent / "app"
PHONE = "phone-snapdragon-8-gen-2"


def _no_children_left(within_s: float) -> list[int]:
    deadline = time.monotonic() + within_s
    while descendants(os.getpid()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return descendants(os.getpid())


def test_fedhq_run_on_the_flower_simulation_engine(reference, tmp_path, capsys):
    out = tmp_path / "flower"
    args = [*"run --engine flower --clients 3 --rounds 2 --local-epochs 1 --reference-profile".split(), reference]
    assert cli.main([*args, "--output", str(out)]) == 0
    flower = json.loads((out / "results.json").read_text())
    assert flower["schema"] == "fedhq.run/2" and flower["engine"] == "flower" and flower["excluded"] == []
    assert (out / "allocation.png").exists()
    assert cli.main([*args[:1], *args[3:], "--output", str(tmp_path / "embedded")]) == 0
    embedded = json.loads((tmp_path / "embedded" / "results.json").read_text())
    assert flower["assignment_before"] == embedded["assignment_before"]
    for f, e in zip(flower["rounds"], embedded["rounds"], strict=True):  # same code, same threads: same numbers
        assert f["participants"] == [0, 1, 2] and (f["accuracy"], f["loss"]) == (e["accuracy"], e["loss"])
        assert (f["deployed_accuracy"], f["deployed_loss"]) == (e["deployed_accuracy"], e["deployed_loss"])
    assert _no_children_left(within_s=30) == []  # Ray's processes end with the run


def test_both_engines_sample_the_same_clients(reference, tmp_path, capsys):
    args = [*"run --clients 4 --clients-per-round 2 --rounds 2 --local-epochs 1 --reference-profile".split(), reference]
    assert cli.main([*args, "--engine", "flower", "--output", str(tmp_path / "flower")]) == 0
    assert cli.main([*args, "--output", str(tmp_path / "embedded")]) == 0
    flower, embedded = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("flower", "embedded"))
    for f, e in zip(flower["rounds"], embedded["rounds"], strict=True):
        assert len(f["sampled"]) == 2 and f["sampled"] == e["sampled"] == f["participants"] == e["participants"]
        assert [f[k] for k in ("accuracy", "loss", "sim_s", "upload_bytes")] == [
            e[k] for k in ("accuracy", "loss", "sim_s", "upload_bytes")
        ]
    assert flower["rounds"][0]["sampled"] != flower["rounds"][1]["sampled"]
    assert _no_children_left(within_s=30) == []


def test_resume_and_a_missing_engine_are_refused(tmp_path, capsys):
    assert cli.main(["run", "--engine", "flower", "--resume", "--output", str(tmp_path)]) == 2
    assert "cannot resume" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["run", "--engine", "carrier-pigeon"])


def test_deployment_on_this_machine_and_a_node_that_goes_away(reference, tmp_path):
    """Two SuperNodes train rounds 1 and 2; node 1 is stopped once round 2 is logged,
    so round 3 goes on without it: left out with its reason, the run finishes."""
    out = tmp_path / "results"
    nodes = ["partition-id=0 num-partitions=2", f"partition-id=1 num-partitions=2 device='{PHONE}'"]
    env = {"FLWR_TELEMETRY_ENABLED": "0", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    with LocalDeployment(tmp_path / "flower", nodes, env) as deployment:

        def stop_node_after_round_2(line: str) -> None:
            if "round   2/3" in line:
                deployment.stop_node(1)

        code, output = deployment.run_app(
            APP,
            f"clients=2 rounds=3 local-epochs=1 seed=2 client-timeout-s=90 "
            f"output-dir='{out}' reference-profile='{reference}'",
            timeout_s=300,
            on_line=stop_node_after_round_2,
        )
        logs = "\n".join(deployment.log(n) for n in ("superlink", "supernode0", "supernode1"))
    assert deployment.survivors == [], deployment.survivors
    assert code == 0 and (out / "results.json").exists(), output + logs
    results = json.loads((out / "results.json").read_text())
    assert results["engine"] == "flower" and results["excluded"] == []
    assert [c["device"] for c in results["clients"]] == ["rtx-a6000", PHONE]  # the node's own device profile

    # The embedded engine on the same settings: the same allocation, and the same
    # simulated round times, which depend on the strategy each node trained with.
    config = RunConfig(
        clients=2,
        rounds=2,
        local_epochs=1,
        seed=2,
        devices=["rtx-a6000", PHONE],
        output_dir=str(tmp_path / "embedded"),
        reference_profile=reference,
    )
    embedded = engine.run(config, echo=lambda line: None)
    assert results["assignment_before"] == embedded["assignment_before"]
    assert [c["speed_time_s"] for c in results["clients"]] == [c["speed_time_s"] for c in embedded["clients"]]
    rounds = results["rounds"]
    assert [r["sim_s"] for r in rounds[:2]] == [r["sim_s"] for r in embedded["rounds"]]
    assert [r["participants"] for r in rounds] == [[0, 1], [0, 1], [0]], output
    assert [r["client"] for r in rounds[2]["rejected"]] == [1] and "1 rejected" in output
    assert rounds[1]["accuracy"] > rounds[0]["accuracy"] > 0.3  # the global model learned
    assert rounds[2]["accuracy"] > 0.3  # and a round with one node gone did not corrupt it
