"""Picks the backend that runs each op call.

Each backend is a module exposing ``KERNELS`` (op name -> function with the op's
schema), ``DEVICES`` (the device types it runs on) and ``UNAVAILABLE`` (None, or why
it cannot run here). Preference by device: a CUDA tensor goes to cuda, then triton,
then reference; a CPU tensor to cpu, then reference. ``FEDHQ_BACKEND`` (read at every
call, so tests and users can switch at run time) forces one backend; asking for one
that is unavailable or cannot run on the tensor's device is an error, never a silent
fallback.
"""

from __future__ import annotations

import importlib
import os
import types
from collections.abc import Callable

import torch

BACKENDS = ("cuda", "triton", "cpu", "reference")
_MODULES = {name: f"fedhq_kernels.{name}" for name in BACKENDS}
_PREFERENCE = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}
_loaded: dict[str, types.ModuleType | None] = {}
_load_errors: dict[str, str] = {}


def _module(name: str) -> types.ModuleType | None:
    """The backend's module if it can run here, else None (reason in _load_errors)."""
    if name not in _loaded:
        try:
            module = importlib.import_module(_MODULES[name])
        except ImportError as error:
            module, _load_errors[name] = None, f"cannot import {_MODULES[name]}: {error}"
        if module is not None and module.UNAVAILABLE is not None:
            module, _load_errors[name] = None, module.UNAVAILABLE
        _loaded[name] = module
    return _loaded[name]


def backends() -> list[str]:
    """The backends that can run on this machine, most preferred first."""
    return [name for name in BACKENDS if _module(name) is not None]


def unavailable_backends() -> dict[str, str]:
    """Backend name -> why it cannot run here."""
    backends()
    return {name: _load_errors[name] for name in BACKENDS if name in _load_errors}


def forced_backend() -> str | None:
    name = os.environ.get("FEDHQ_BACKEND", "").strip().lower()
    if not name:
        return None
    if name not in BACKENDS:
        raise ValueError(f"FEDHQ_BACKEND={name!r} is not a backend; choose one of {', '.join(BACKENDS)}")
    return name


def select(device: torch.device) -> str:
    """The backend that runs an op on tensors of ``device``."""
    forced = forced_backend()
    if forced is not None:
        module = _module(forced)
        if module is None:
            raise RuntimeError(f"FEDHQ_BACKEND={forced}, but that backend is unavailable: {_load_errors[forced]}")
        if device.type not in module.DEVICES:
            raise RuntimeError(f"FEDHQ_BACKEND={forced} cannot run on a {device.type} tensor")
        return forced
    for name in _PREFERENCE.get(device.type, ("reference",)):
        module = _module(name)
        if module is not None and device.type in module.DEVICES:
            return name
    raise RuntimeError(f"no fedhq_kernels backend runs on {device.type} tensors")


def kernel(op: str, device: torch.device) -> Callable:
    """The function implementing ``op`` for ``device`` on the selected backend."""
    return _module(select(device)).KERNELS[op]
