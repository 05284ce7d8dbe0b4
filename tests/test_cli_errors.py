"""Every user error of the ``fedhq`` command is one line with exit status 2, and a bad
setting or output path is found before anything is loaded or measured."""

import json

import pytest

from fedhq import cli
from fedhq.fl import ConfigError, RunConfig, engine


def _one_line_error(capsys, command: str, *needles: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fedhq {command}: error:"), err
    assert all(n in err[0] for n in needles), err
    return err[0]


# ---- settings ----


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"topology": 5}, "topology must be a non-empty string or null, got 5"),
        ({"hold_out_validation": "yes"}, "hold_out_validation must be true or false"),
        ({"adjust": 1}, "adjust must be true or false"),
        ({"seed": 2**70}, r"seed must be an int in \[0, 4294967295\]"),
        ({"output_dir": ""}, "output_dir must be a non-empty string"),
        ({"dataset": None}, "dataset must be"),
        ({"devices": 5}, "devices must be a non-empty list"),
        ({"alphas": 0.5}, "alphas must be a list"),
    ],
)
def test_bad_settings_name_the_setting(settings, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_dict(settings)


def test_numpy_numbers_are_stored_as_plain_numbers():
    import numpy as np

    config = RunConfig(clients=np.int64(3), seed=np.uint32(7), lr=np.float32(0.5)).validated()
    assert type(config.clients) is int and type(config.seed) is int and type(config.lr) is float
    json.dumps(config.to_dict())


# ---- the command: one line, exit 2, before any measurement ----


def _no_measuring(monkeypatch):
    from fedhq.profile import run as profile_run

    def refuse(*args, **kwargs):
        raise AssertionError("measured before the settings were checked")

    monkeypatch.setattr(profile_run, "run_profile", refuse)
    monkeypatch.setattr(engine, "load_data", refuse)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--output", "{file}"], "is a file"),
        (["run", "--output", "{file}/sub"], "is under a file"),
        (["compare", "--output", "{file}/sub"], "is under a file"),
        (["run", "--config", "{config}", "--output", "{tmp}/o"], "topology must be"),
        (["run", "--seed", str(2**70)], "seed must be an int in"),
        (["compare", "--seeds", f"0,{2**40}", "--output", "{tmp}/o"], "seeds must be ints in"),
        (["run", "--topology", "hierarchical:9x9", "--output", "{tmp}/o"], "topology"),
        (["profile", "--out", "{file}/p.json"], "--out folder"),
        (["profile", "--out", "{tmp}"], "is a directory"),
    ],
)
def test_bad_outputs_and_settings_fail_in_one_line_before_measuring(tmp_path, monkeypatch, capsys, argv, message):
    _no_measuring(monkeypatch)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"topology": 5}))
    argv = [a.format(file=a_file, config=config, tmp=tmp_path) for a in argv]
    assert cli.main(argv) == 2
    _one_line_error(capsys, argv[0], message)


def test_empty_list_items_are_refused_in_one_line(capsys):
    for argv in (["compare", "--strategies", ","], ["compare", "--strategies", ""], ["run", "--alphas", "0.5,,1"]):
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        assert exit_.value.code == 2
        _one_line_error(capsys, argv[0], "without empty items")


def test_an_unwritable_output_is_refused_before_measuring(tmp_path, monkeypatch, capsys):
    import tempfile

    _no_measuring(monkeypatch)

    def denied(*args, **kwargs):  # root may write anywhere: stand in for a read-only folder
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", denied)
    for argv in (["run", "--output", str(tmp_path / "o")], ["profile", "--out", str(tmp_path / "p.json")]):
        assert cli.main(argv) == 2
        _one_line_error(capsys, argv[0], "not writable: Permission denied")


def test_an_unforeseen_file_system_error_is_one_line(monkeypatch, capsys):
    def fail(args):
        raise PermissionError(13, "Permission denied", "/somewhere/results.json")

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["run"].set_defaults(handler=fail)
    assert cli.main(["run"]) == 2
    _one_line_error(capsys, "run", "/somewhere/results.json", "Permission denied")
