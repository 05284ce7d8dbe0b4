"""Checkpoints: written atomically after every round, verified before they are read.

The file is a header line (``MAGIC``, then the SHA-256 of the payload) followed by the
payload, a ``torch.save`` archive. ``load`` checks the hash before torch reads a byte
of the payload (torch does not check its zip CRCs) and reads it with
``weights_only=True``: QuantizedTensors are stored as plain dicts of tensors and
numbers, so loading never unpickles arbitrary objects."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

import fedhq_kernels as fk
from fedhq_kernels.checks import FLOAT_DTYPE_NAMES

_QT = "__quantized_tensor__"
MAGIC = b"fedhq-checkpoint/1 sha256="
_DIGEST_HEX = 64


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file."""


def _encode(value: Any) -> Any:
    if isinstance(value, fk.QuantizedTensor):
        return {
            _QT: True,
            "data": value.data,
            "scale": value.scale,
            "zero_point": value.zero_point,
            "bits": value.bits,
            "axis": value.axis,
            "symmetric": value.symmetric,
            "dtype": str(value.dtype).removeprefix("torch."),
            "shape": list(value.shape),
        }
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if value.get(_QT) is True:
            return fk.QuantizedTensor(
                data=value["data"],
                scale=value["scale"],
                zero_point=value["zero_point"],
                bits=value["bits"],
                axis=value["axis"],
                symmetric=value["symmetric"],
                dtype=FLOAT_DTYPE_NAMES[value["dtype"]],
                shape=torch.Size(value["shape"]),
            )
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def remove_stale(path: str | Path) -> None:
    """Deletes the temporary files a killed ``save`` of ``path`` left behind."""
    path = Path(path)
    for tmp in path.parent.glob(f"{path.name}.*.tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # no directory handles (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(path: str | Path, payload: dict) -> None:
    """Writes ``payload`` to a temporary file in the same directory, then renames it
    over ``path`` and syncs the directory: a crash mid-write leaves the previous
    checkpoint intact, and the temporary files of earlier crashes are removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    buffer = io.BytesIO()
    torch.save(_encode(payload), buffer)
    body = buffer.getvalue()
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + hashlib.sha256(body).hexdigest().encode() + b"\n")
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def load(path: str | Path) -> dict:
    """The payload ``save`` wrote to ``path``; CheckpointError (one line) when the file
    is missing, unreadable, not a checkpoint, or its content does not match its hash."""
    path = Path(path)
    remove_stale(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"checkpoint {path} cannot be read: {error.strerror or error}") from None
    head = len(MAGIC) + _DIGEST_HEX + 1
    if not raw.startswith(MAGIC) or len(raw) < head or raw[head - 1 : head] != b"\n":
        what = "is empty" if not raw else "is not a FedHQ checkpoint (or was written by an older version)"
        raise CheckpointError(f"checkpoint {path} {what}")
    digest, body = raw[len(MAGIC) : head - 1].decode("ascii", "replace"), raw[head:]
    if hashlib.sha256(body).hexdigest() != digest:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated: its content does not match its SHA-256")
    try:
        payload = _decode(torch.load(io.BytesIO(body), weights_only=True))
    except Exception as error:  # whatever torch or the decoder raises
        first = (str(error).strip().splitlines() or [""])[0]
        raise CheckpointError(f"checkpoint {path} cannot be decoded: {type(error).__name__}: {first}") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a dict, got {type(payload).__name__}")
    return payload
