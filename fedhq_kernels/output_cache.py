"""The cpu backend's cache of output buffers (csrc/output_pool.h): an op's output of a
megabyte or more reuses a freed buffer of the same size, so steady-state training (the
same shapes every step) never pays first-touch page faults; freed buffers are kept up to
a byte limit, ``FEDHQ_OUTPUT_CACHE_MB`` (default 256) or ``set_output_cache_limit``
(docs/kernels.md, "Output buffers"). Without the C++ backend there is no cache: these
report and free nothing."""

from __future__ import annotations

import torch

from fedhq_kernels import cpu
from fedhq_kernels.checks import is_int


def _controls():
    return None if cpu.UNAVAILABLE else torch.ops.fedhq_output_cache


def output_cache_bytes() -> int:
    """The bytes of freed output buffers the cache holds now."""
    controls = _controls()
    return 0 if controls is None else int(controls.held_bytes())


def release_output_cache() -> int:
    """Frees every buffer the cache holds; returns the bytes freed."""
    controls = _controls()
    return 0 if controls is None else int(controls.release())


def set_output_cache_limit(limit_bytes: int) -> int:
    """Keeps at most ``limit_bytes`` of freed outputs (0: none, every output is fresh),
    freeing what is beyond it now; returns the previous limit."""
    if not (is_int(limit_bytes) and limit_bytes >= 0):
        raise ValueError(f"set_output_cache_limit: limit_bytes must be an int >= 0, got {limit_bytes!r}")
    controls = _controls()
    return 0 if controls is None else int(controls.set_limit(int(limit_bytes)))
