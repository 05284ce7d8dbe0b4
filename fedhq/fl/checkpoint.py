"""Checkpoints: written atomically after every round, read back with
``torch.load(weights_only=True)`` (QuantizedTensors are stored as plain dicts of
tensors and numbers, so loading never unpickles arbitrary objects)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

import fedhq_kernels as fk

_QT = "__quantized_tensor__"


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
                dtype=getattr(torch, value["dtype"]),
                shape=torch.Size(value["shape"]),
            )
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def save(path: str | Path, payload: dict) -> None:
    """Writes ``payload`` to a temporary file in the same directory, then renames it
    over ``path``: a crash mid-write leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(_encode(payload), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: str | Path) -> dict:
    return _decode(torch.load(Path(path), weights_only=True))
