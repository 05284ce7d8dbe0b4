"""Round-aware allocation (beyond the paper): QAT where a synchronous round can afford it.

A node's path to the server costs its compute plus every upload from it up to the
server, and a round lasts as long as its longest path (``fedhq.fl.topology``). So
whether a client may train with QAT under a bound on the round time depends on that
client alone. docs/method.md §8 explains the rule and what it measured.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedhq.analysis.vectors import finite_vector
from fedhq_kernels.checks import is_real


def _vector(values: Any, name: str, n: int | None = None) -> np.ndarray:
    v = finite_vector(values, name, one_per="client", empty=f"{name} is empty: need at least one client", at="client")
    if n is not None and v.size != n:
        raise ValueError(f"{name} has {v.size} clients, expected {n}")
    return v


def path_uploads(upload_s: np.ndarray, parents: Any = None) -> np.ndarray:
    """Per node, the seconds of every upload from it up to the server (its own
    included). ``parents``: per node its parent's index, or -1 / None for the server."""
    total = upload_s.copy()
    if parents is None:
        return total
    up = np.array([-1 if p is None else int(p) for p in parents], dtype=np.int64)
    if up.size != total.size:
        raise ValueError(f"parents has {up.size} nodes, expected {total.size}")
    current = up.copy()
    for _ in range(total.size):  # at most depth steps; a cycle would never end
        live = current >= 0
        if not live.any():
            return total
        total[live] += upload_s[current[live]]
        current[live] = up[current[live]]
    raise ValueError("parents: not a tree (a chain of parents never reaches the server)")


def round_time(compute_s: Any, upload_s: Any = None, parents: Any = None) -> float:
    """A synchronous round's predicted seconds: the longest compute + uploads path."""
    compute = _vector(compute_s, "compute_s")
    upload = np.zeros_like(compute) if upload_s is None else _vector(upload_s, "upload_s", compute.size)
    return float((compute + path_uploads(upload, parents)).max())


def _paths(ptq_s, qat_s, upload_s, parents) -> tuple[np.ndarray, np.ndarray]:
    ptq = _vector(ptq_s, "ptq_s")
    qat = _vector(qat_s, "qat_s", ptq.size)
    upload = np.zeros_like(ptq) if upload_s is None else _vector(upload_s, "upload_s", ptq.size)
    above = path_uploads(upload, parents)
    return ptq + above, qat + above


def slack_fill(ptq_s: Any, qat_s: Any, upload_s: Any = None, parents: Any = None) -> np.ndarray:
    """The baseline: QAT (True) for every client whose QAT path does not exceed the
    all-PTQ round's time."""
    ptq, qat = _paths(ptq_s, qat_s, upload_s, parents)
    return qat <= ptq.max()


def round_aware(
    ptq_s: Any, qat_s: Any, acc_sig: Any, *, upload_s: Any = None, parents: Any = None, round_slack: float = 0.0
) -> np.ndarray:
    """fedhq-rt's QAT mask. The round may last (1 + round_slack) x the all-PTQ round;
    that slack goes to the clients whose accuracy needs QAT most (Sig_acc at or below the
    median); the others get QAT only where it is free, within the round time the first
    group leaves. ``ptq_s``/``qat_s``: compute seconds per node; ``upload_s``: its upload."""
    if not (is_real(round_slack) and round_slack >= 0):
        raise ValueError(f"round_slack must be finite and >= 0, got {round_slack}")
    ptq, qat = _paths(ptq_s, qat_s, upload_s, parents)
    acc = _vector(acc_sig, "acc_sig", ptq.size)
    base = ptq.max()
    needy = acc <= np.median(acc)
    first = needy & (qat <= base * (1 + round_slack))
    reached = max(base, float(qat[first].max()) if first.any() else base)
    return first | (qat <= reached)
