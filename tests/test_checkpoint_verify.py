"""Checkpoints are verified before a run resumes from them: the file's SHA-256, then the
saved model (as a client update), allocation and history; a killed save leaves nothing
behind; a damaged checkpoint is one line of error with exit status 2."""

import math
from pathlib import Path

import pytest
import torch

import fedhq_kernels as fk
from fedhq import cli
from fedhq.fl import ConfigError, RunConfig, checkpoint, engine


def tiny(reference, tmp_path, **changes) -> RunConfig:
    settings = dict(clients=3, rounds=1, local_epochs=1, output_dir=str(tmp_path / "run"), reference_profile=reference)
    return RunConfig(**(settings | changes)).validated()


def quiet(config, **kwargs):
    return engine.run(config, echo=lambda s: None, **kwargs)


@pytest.fixture(scope="module")
def finished(reference, tmp_path_factory):
    """A finished 1-round fedfq run: (its config, its checkpoint's bytes)."""
    tmp = tmp_path_factory.mktemp("finished")
    config = tiny(reference, tmp, strategy="fedfq")
    quiet(config)
    return config, (Path(config.output_dir) / engine.CHECKPOINT_FILE).read_bytes()


def _fresh(finished, tmp_path) -> tuple[RunConfig, Path]:
    """A copy of the finished run in tmp_path, to resume to 2 rounds."""
    config, data = finished
    config = config.replace(output_dir=str(tmp_path / "copy"), rounds=2)
    path = tmp_path / "copy" / engine.CHECKPOINT_FILE
    path.parent.mkdir()
    path.write_bytes(data)
    return config, path


# ---- the file: hash, damage, temporary files ----


def test_flipped_bytes_inside_a_tensor_are_refused(finished, tmp_path):
    config, path = _fresh(finished, tmp_path)
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 64] = bytes(b ^ 0xFF for b in raw[middle : middle + 64])
    path.write_bytes(bytes(raw))
    with pytest.raises(checkpoint.CheckpointError, match="does not match its SHA-256"):
        checkpoint.load(path)
    with pytest.raises(ConfigError, match="--resume: checkpoint .* corrupt"):
        quiet(config, resume=True)


@pytest.mark.parametrize("damage", ["truncated", "empty", "directory", "garbage"])
def test_a_damaged_checkpoint_is_a_one_line_error(finished, tmp_path, capsys, damage):
    config, path = _fresh(finished, tmp_path)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "directory":
        path.unlink()
        path.mkdir()
    else:
        path.write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.load(path)
    argv = ["run", "--strategy", "fedfq", "--clients", "3", "--rounds", "2", "--local-epochs", "1"]
    argv += ["--reference-profile", config.reference_profile, "--output", config.output_dir, "--resume"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fedhq run: error: --resume: checkpoint {path}"), err


def test_stale_temporary_files_are_removed_and_the_directory_synced(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    for i in range(3):  # what SIGKILLed saves leave
        (tmp_path / f"checkpoint.pt.abc{i}.tmp").write_bytes(b"x" * 1000)
    (tmp_path / "other.pt.abc.tmp").write_bytes(b"not ours")
    calls = []
    replace, fsync_dir = checkpoint.os.replace, checkpoint._fsync_dir
    monkeypatch.setattr(checkpoint.os, "replace", lambda *a: (calls.append("replace"), replace(*a))[1])
    monkeypatch.setattr(checkpoint, "_fsync_dir", lambda d: (calls.append(("fsync", d)), fsync_dir(d))[1])
    checkpoint.save(path, {"history": [1]})
    assert calls == ["replace", ("fsync", tmp_path)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "other.pt.abc.tmp"]
    (tmp_path / "checkpoint.pt.def.tmp").write_bytes(b"x")
    assert checkpoint.load(path) == {"history": [1]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "other.pt.abc.tmp"]


# ---- the content: validated like an update ----


def _tamper(path: Path, change) -> None:
    saved = checkpoint.load(path)
    change(saved)
    checkpoint.save(path, saved)  # a valid hash: the content itself must be refused


def _first_quantized(saved) -> str:
    return next(k for k, v in saved["server_state"].items() if isinstance(v, fk.QuantizedTensor))


def _huge_scale(saved):
    name = _first_quantized(saved)
    q = saved["server_state"][name]
    saved["server_state"][name] = fk.QuantizedTensor(
        q.data, torch.full_like(q.scale, 1e30), q.zero_point, q.bits, q.axis, q.symmetric, q.dtype, q.shape
    )


def _four_bit(saved):
    name = _first_quantized(saved)
    q = saved["server_state"][name]
    saved["server_state"][name] = fk.quantize(q.dequantize(), bits=4, axis=q.axis, symmetric=q.symmetric)


def _other_scheme(saved):
    name = _first_quantized(saved)
    q = saved["server_state"][name]
    saved["server_state"][name] = fk.quantize(q.dequantize(), bits=q.bits, axis=None, symmetric=False)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_huge_scale, "exceeds"),
        (_four_bit, "expected 8-bit codes, got 4-bit"),
        (_other_scheme, "the run's scheme"),
        (lambda s: s["server_state"].pop(_first_quantized(s)), "missing"),
        (lambda s: s.update(strategies=["fp32"] * 3), "strategies"),
        (lambda s: s.update(strategies=["ptq"] * 2), "strategies"),
        (lambda s: s["history"][0].update(round=5), "history row 1"),
        (lambda s: s["history"][0].update(accuracy=math.nan), "accuracy"),
        (lambda s: s.update(training_s=-1.0), "training_s"),
        (lambda s: s.pop("client_states"), "missing"),
    ],
)
def test_a_tampered_checkpoint_is_refused(finished, tmp_path, change, message):
    config, path = _fresh(finished, tmp_path)
    _tamper(path, change)
    with pytest.raises(ConfigError, match=f"--resume: checkpoint .*{message}"):
        quiet(config, resume=True)


def test_an_untampered_checkpoint_resumes(finished, tmp_path):
    config, _ = _fresh(finished, tmp_path)
    assert len(quiet(config, resume=True)["rounds"]) == 2
