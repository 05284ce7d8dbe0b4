"""Comparisons over seeds: seed parsing, the statistics (against scipy.stats.t directly),
resuming a partly done comparison, refusing to overwrite results, the reference
profile reuse rule and the CLI. Tiny runs: digits, 2 clients, 2 rounds."""

import json
import math
import re
import shutil

import numpy as np
import pytest
from scipy import stats

from fedhq import cli
from fedhq.fl import ConfigError, RunConfig, engine
from fedhq.fl import compare as compare_module
from fedhq.fl.compare import compare, parse_seeds
from fedhq.fl.summary import headline_accuracy, mean_ci, paired_differences, summarize
from fedhq.models import ModelSpec


def tiny(reference, out, **changes) -> RunConfig:
    settings = dict(
        clients=2, rounds=2, local_epochs=1, batch_size=16, output_dir=str(out), reference_profile=reference
    )
    settings.update(changes)
    return RunConfig(**settings).validated()


def quiet(line):
    pass


# ---- seeds and statistics ----


def test_parse_seeds():
    assert parse_seeds("0,1,2") == [0, 1, 2]
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert parse_seeds(" 7, 0-2 ,1") == [0, 1, 2, 7]  # sorted, each once
    assert parse_seeds("5") == [5] and parse_seeds("3-3") == [3]
    for bad, message in [
        ("", "expected numbers and ranges"),
        ("a", "got 'a'"),
        ("1.5", "got '1.5'"),
        ("-1", "got '-1'"),
        ("0,,1", "got ''"),
        ("4-2", "runs backwards"),
        ("0-5000", "more than 1000 seeds"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_seeds(bad)


def test_mean_ci_is_student_t_over_seeds():
    values = [0.91, 0.95, 0.88, 0.93, 0.90]
    low, high = stats.t.interval(0.95, df=4, loc=np.mean(values), scale=stats.sem(values))
    ci = mean_ci(values)
    assert ci["n"] == 5 and ci["mean"] == pytest.approx(np.mean(values))
    assert (ci["low"], ci["high"]) == (pytest.approx(low), pytest.approx(high))
    # by hand: t(0.975, 4) = 2.7764, s = sqrt(0.00292 / 4) = 0.027019 -> half-width 0.033548
    assert ci["half_width"] == pytest.approx(2.7764451 * 0.0270185 / math.sqrt(5), rel=1e-5)
    assert mean_ci(values, confidence=0.9)["half_width"] < ci["half_width"]
    one = mean_ci([0.9, None])  # a run without rounds is left out; one value has no spread
    assert one["n"] == 1 and one["mean"] == 0.9 and one["half_width"] is None and one["low"] is None
    assert mean_ci([])["mean"] is None


def test_paired_differences():
    a, b = [0.95, 0.90, 0.97], [0.93, 0.85, 0.96]
    d = paired_differences(a, b)
    diffs = np.array(a) - np.array(b)
    assert d["values"] == pytest.approx(diffs.tolist())
    assert (d["low"], d["high"]) == pytest.approx(stats.t.interval(0.95, 2, loc=diffs.mean(), scale=stats.sem(diffs)))
    # pairing removes the seeds' shared spread: the unpaired interval of a - b would be wider
    assert d["half_width"] < mean_ci(a)["half_width"] + mean_ci(b)["half_width"]
    assert paired_differences([0.9, None], [0.8, 0.7])["n"] == 1
    with pytest.raises(ValueError, match="as many values"):
        paired_differences([0.9], [0.8, 0.7])


def test_headline_is_the_mean_of_the_last_five_rounds_deployed_when_recorded():
    run = {"rounds": [{"accuracy": a} for a in (0.1, 0.2, 0.5, 0.6, 0.7, 0.8, 0.9)]}
    assert headline_accuracy(run) == pytest.approx(0.7)
    run["rounds"][-1]["deployed_accuracy"] = 0.4  # the quantized model's, when h2's rows carry it
    assert headline_accuracy(run) == pytest.approx(0.6)
    assert headline_accuracy({"rounds": run["rounds"][:2]}) == pytest.approx(0.15)
    assert headline_accuracy({"rounds": []}) is None


def test_summarize_pairs_by_seed():
    def run(acc, sim, weight_bits=8.0):
        return {"rounds": [{"accuracy": acc}], "sim_time_s": sim, "upload_bytes": 1000, "weight_bits": weight_bits}

    by_seed = {
        0: {"fedhq": run(0.9, 10.0), "fedaqt": run(0.8, 30.0)},
        1: {"fedhq": run(0.7, 20.0), "fedaqt": run(0.65, 40.0)},
        2: {"fedhq": run(0.8, 10.0)},
    }
    summary = summarize(by_seed)
    assert summary["seeds"] == [0, 1, 2]
    assert summary["strategies"]["fedhq"]["headline_accuracy"]["n"] == 3
    assert summary["strategies"]["fedhq"]["speedup"]["values"] == [3.0, 2.0]  # seed 2 has no fedaqt
    paired = summary["paired"]["fedhq"]["fedaqt"]
    assert paired["seeds"] == [0, 1] and paired["headline_accuracy"]["values"] == pytest.approx([0.1, 0.05])
    assert paired["time_ratio"]["values"] == [3.0, 2.0]
    assert summarize({0: {"fedaqt": run(0.8, 1.0)}})["paired"] == {}  # no fedhq, nothing to pair
    by_seed[0]["fedhq-rt"], by_seed[1]["fedhq-rt"] = run(0.95, 5.0), run(0.6, 10.0)
    paired = summarize(by_seed)["paired"]
    assert set(paired) == {"fedhq", "fedhq-rt"} and set(paired["fedhq-rt"]) == {"fedhq", "fedaqt"}
    assert paired["fedhq-rt"]["fedhq"]["headline_accuracy"]["values"] == pytest.approx([0.05, -0.1])
    assert paired["fedhq-rt"]["fedaqt"]["time_ratio"]["values"] == [6.0, 4.0]
    assert paired["fedhq"]["fedhq-rt"]["time_ratio"]["values"] == [0.5, 0.5]
    # fedmpq is paired too (its gain over aqfl); bits per weight and bytes are averaged
    by_seed[0]["fedmpq"], by_seed[1]["fedmpq"] = run(0.85, 20.0, 5.5), run(0.7, 30.0, 4.5)
    by_seed[0]["aqfl"], by_seed[1]["aqfl"] = run(0.8, 20.0, 6.0), run(0.72, 30.0, 6.0)
    summary = summarize(by_seed)
    assert summary["paired"]["fedmpq"]["aqfl"]["headline_accuracy"]["values"] == pytest.approx([0.05, -0.02])
    assert summary["strategies"]["fedmpq"]["weight_bits"]["mean"] == 5.0
    assert summary["strategies"]["fedmpq"]["upload_bytes"]["mean"] == 1000


# ---- comparisons ----


def same_numbers(a: dict, b: dict) -> bool:
    keys = ("accuracy", "loss", "train_loss", "sim_s", "upload_bytes")
    return all(
        [[r[k] for k in keys] for r in a[s][n]["rounds"]] == [[r[k] for k in keys] for r in b[s][n]["rounds"]]
        for s in a
        for n in a[s]
    )


def test_resume_continues_a_partly_done_multi_seed_comparison(reference, tmp_path, monkeypatch):
    strategies = ["fedfq", "fedaqt"]
    straight = compare(tiny(reference, tmp_path / "straight"), strategies, seeds=[0, 1], echo=quiet)
    assert straight["seeds"] == [0, 1] and list(straight["runs_by_seed"]) == ["0", "1"]
    assert (tmp_path / "straight" / "seed1" / "fedaqt" / "results.json").exists()

    real, calls = engine.run, []

    def interrupted(run_config, **kwargs):  # the third run stops after its first round
        calls.append(run_config.output_dir)
        if len(calls) == 3:
            real(run_config.replace(rounds=1), **kwargs)
            raise KeyboardInterrupt
        return real(run_config, **kwargs)

    config = tiny(reference, tmp_path / "cmp")
    monkeypatch.setattr(compare_module.engine, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compare(config, strategies, seeds=[0, 1], echo=quiet)
    monkeypatch.setattr(compare_module.engine, "run", real)
    assert not (tmp_path / "cmp" / "comparison.json").exists()

    lines = []
    resumed = compare(config, strategies, seeds=[0, 1], resume=True, echo=lines.append)
    progress = [line for line in lines if line.startswith("[run ")]
    assert [re.sub(r" \(elapsed.*?\)", "", line) for line in progress] == [
        f"[run 1/4] seed 0, fedfq: finished earlier, reused {tmp_path / 'cmp/seed0/fedfq/results.json'}",
        f"[run 2/4] seed 0, fedaqt: finished earlier, reused {tmp_path / 'cmp/seed0/fedaqt/results.json'}",
        "[run 3/4] seed 1, fedfq",
        "[run 4/4] seed 1, fedaqt",
    ]
    assert re.search(r"\[run 4/4\] seed 1, fedaqt \(elapsed \dm\d\ds, about \dm\d\ds left\)", progress[3])
    assert any(line.startswith("resuming") and "seed1/fedfq" in line and "after round 1" in line for line in lines)
    assert same_numbers(resumed["runs_by_seed"], straight["runs_by_seed"])
    saved = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert saved["schema"] == "fedhq.compare/2" and saved["summary"]["seeds"] == [0, 1]
    assert saved["summary"]["strategies"]["fedfq"]["headline_accuracy"]["n"] == 2

    # every strategy of a seed trained on the same clients' data
    for runs in resumed["runs_by_seed"].values():
        fedfq, fedaqt = runs["fedfq"]["clients"], runs["fedaqt"]["clients"]
        assert [c["samples"] for c in fedfq] == [c["samples"] for c in fedaqt]


def test_an_earlier_comparison_is_never_overwritten_silently(reference, tmp_path):
    config = tiny(reference, tmp_path / "cmp", rounds=1)
    compare(config, ["fedfq"], seeds=[0, 1], echo=quiet)
    with pytest.raises(
        ConfigError,
        match=r"cmp already holds results \(comparison.json, seed0/fedfq/checkpoint.pt, "
        r"seed0/fedfq/results.json, ...\): pass --resume to continue them, "
        r"--output DIR for a new folder, or --overwrite to replace them",
    ):
        compare(config, ["fedfq"], seeds=[0], echo=quiet)
    with pytest.raises(ConfigError, match="pass one"):
        compare(config, ["fedfq"], seeds=[0], resume=True, overwrite=True, echo=quiet)
    lines = []
    replaced = compare(config, ["fedfq"], seeds=[0], overwrite=True, echo=lines.append)
    assert replaced["seeds"] == [0] and not any("reused" in line for line in lines)
    assert not (tmp_path / "cmp" / "seed1" / "fedfq" / "results.json").exists()  # nothing stale left to misread
    compare(config, ["fedfq"], seeds=[0], resume=True, echo=quiet)  # resuming a finished one: all reused


def test_cli_run_refuses_an_output_that_holds_results(reference, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        *"run --strategy fedfq --clients 2 --rounds 1 --local-epochs 1 --reference-profile".split(),
        reference,
        "--output",
        str(out),
    ]
    assert cli.main(argv) == 0
    assert (out / "rounds.csv").read_text().splitlines()[0].startswith("dataset,model,bits,seed,strategy,round")
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"fedhq run: error: {out} already holds results (checkpoint.pt, results.json): pass --resume to "
        "continue them, --output DIR for a new folder, or --overwrite to replace them"
    ]
    assert cli.main([*argv, "--overwrite"]) == 0
    assert cli.main([*argv[:-4], "--rounds", "2", *argv[-4:], "--resume"]) == 0  # extends it
    assert len(json.loads((out / "results.json").read_text())["rounds"]) == 2


def test_reference_profile_is_reused_only_when_passed_or_resuming(reference, tmp_path, monkeypatch):
    from fedhq.profile import run as profile_run
    from fedhq.profile import schema

    fresh = schema.load(reference)
    fresh["device"]["name"] = "fresh measurement"
    monkeypatch.setattr(profile_run, "run_profile", lambda **_: json.loads(json.dumps(fresh)))
    spec = ModelSpec.parse("small_cnn@8x8x1:10")
    out = tmp_path / "out"
    out.mkdir()
    leftover = json.loads(json.dumps(fresh))
    leftover["device"]["name"] = "left over"
    leftover["models"] = {"resnet18@8x8x1:10": leftover["models"][spec.key]}  # another command's model
    schema.dump(leftover, out / engine.REFERENCE_FILE)

    config = RunConfig(output_dir=str(out)).validated()
    doc, path = engine.reference_profile(config, spec, out, quiet)  # a new run: measured, the leftover ignored
    assert doc["device"]["name"] == "fresh measurement" and path == str(out / engine.REFERENCE_FILE)
    assert schema.load(out / engine.REFERENCE_FILE)["device"]["name"] == "fresh measurement"
    schema.dump(leftover, out / engine.REFERENCE_FILE)
    with pytest.raises(ConfigError, match="has no measurements of model small_cnn"):  # resuming: its own profile
        engine.reference_profile(config, spec, out, quiet, reuse_saved=True)
    passed = RunConfig(output_dir=str(out), reference_profile=reference).validated()
    doc, path = engine.reference_profile(passed, spec, out, quiet)
    assert path == reference and doc["device"]["name"] != "fresh measurement"


def test_cli_compare_seeds_and_default_folder(reference, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = [
        *"compare --strategies fedfq --clients 2 --rounds 1 --local-epochs 1 --reference-profile".split(),
        reference,
    ]
    assert cli.main([*argv, "--seeds", "0-1"]) == 0
    comparison = json.loads((tmp_path / "results/compare/comparison.json").read_text())
    assert comparison["seeds"] == [0, 1] and not (tmp_path / "results/run").exists()
    out = capsys.readouterr().out
    assert out.startswith("digits, small_cnn@8x8x1:10, 8-bit uploads, 2 clients, 1 rounds, seeds 0-1")
    assert (tmp_path / "results/compare/seed_summary.png").exists()
    assert (tmp_path / "results/compare/seed1/fedfq/rounds.csv").exists()
    for extra, message in [
        (["--seeds", "0-1", "--seed", "2"], "pass one of them"),
        (["--seeds", "1-0"], "runs backwards"),
        (["--seeds", "0"], "already holds results"),
    ]:
        assert cli.main([*argv, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("fedhq compare: error:") and message in err[0], err
    shutil.rmtree(tmp_path / "results")
