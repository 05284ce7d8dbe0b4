"""Split a training set among federated clients: IID, Dirichlet label skew, quantity skew.

Every partitioner takes the training labels and returns one sorted int64 index array
per client; together they cover every sample exactly once. The same seed gives the
same partition.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from fedhq_kernels.checks import is_int, is_real

from .base import call_with_options

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- input checks


def _as_labels(labels) -> np.ndarray:
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    if y.size == 0:
        raise ValueError("labels are empty: there is nothing to partition")
    if not np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_:
        raise ValueError(f"labels must be integers, got {y.dtype}")
    if y.min() < 0:
        raise ValueError(f"labels must be non-negative, found {y.min()}")
    return y.astype(np.int64)


def _check_clients(num_clients, n: int, min_size: int = 1) -> None:
    if not is_int(num_clients) or num_clients < 1:
        raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
    if num_clients > n:
        raise ValueError(f"{num_clients} clients but only {n} samples; use at most {n} clients")
    if not is_int(min_size) or min_size < 0:
        raise ValueError(f"min_size must be a non-negative integer, got {min_size!r}")
    if num_clients * min_size > n:
        raise ValueError(
            f"{num_clients} clients with at least min_size={min_size} samples each need "
            f"{num_clients * min_size} samples, but there are only {n}; lower min_size or use fewer clients"
        )


def _check_positive(name: str, value) -> float:
    if not is_real(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _rng(seed) -> np.random.Generator:
    if not is_int(seed):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return np.random.default_rng(int(seed))


def _apportion(total: int, shares: np.ndarray) -> np.ndarray:
    """Whole numbers proportional to `shares` summing to `total` (largest remainder)."""
    quota = shares / shares.sum() * total
    counts = np.floor(quota).astype(np.int64)
    counts[np.argsort(-(quota - counts), kind="stable")[: total - int(counts.sum())]] += 1
    return counts


def _dirichlet(rng: np.random.Generator, alpha: float, k: int) -> np.ndarray:
    p = rng.dirichlet(np.full(k, alpha))
    if not (np.all(np.isfinite(p)) and p.sum() > 0):  # tiny alpha can underflow: the alpha -> 0 limit
        p = np.zeros(k)
        p[rng.integers(k)] = 1.0
    return p


# ---------------------------------------------------------------- partitioners


def iid(labels, num_clients: int, seed: int = 0) -> list[np.ndarray]:
    """A random permutation cut into `num_clients` near-equal shards (sizes differ by at most 1)."""
    y = _as_labels(labels)
    _check_clients(num_clients, y.size)
    perm = _rng(seed).permutation(y.size)
    return [np.sort(p) for p in np.array_split(perm, num_clients)]


def dirichlet(
    labels, num_clients: int, alpha: float, seed: int = 0, *, min_size: int = 10, max_tries: int = 100
) -> list[np.ndarray]:
    """Label skew: each class's samples are split among clients by proportions drawn
    from Dirichlet(alpha, ..., alpha); small alpha gives each client few classes,
    large alpha approaches IID.

    As the NIID-Bench reference implementation (Li et al., ICDE 2022), a client that
    already holds its fair share (N / num_clients) gets no more of later classes, and
    the whole draw is repeated until every client has at least `min_size` samples.
    After `max_tries` draws that fail, the best draw is fixed up by moving samples
    (the donor's most common labels first, to keep the skew) from the largest clients
    to the short ones, with a logged warning. Raises ValueError when
    num_clients * min_size > N.
    """
    y = _as_labels(labels)
    n = y.size
    _check_clients(num_clients, n, min_size)
    alpha = _check_positive("alpha", alpha)
    if not is_int(max_tries) or max_tries < 1:
        raise ValueError(f"max_tries must be a positive integer, got {max_tries!r}")
    rng = _rng(seed)
    by_class = [np.flatnonzero(y == c) for c in np.unique(y)]
    fair = n / num_clients

    best, best_min = None, -1
    for _ in range(max_tries):
        shards: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        sizes = np.zeros(num_clients, dtype=np.int64)
        for idx in by_class:
            idx = rng.permutation(idx)
            p = _dirichlet(rng, alpha, num_clients) * (sizes < fair)
            if p.sum() <= 0:  # every open client drew ~0: give the class to one open client
                p = np.zeros(num_clients)
                p[rng.choice(np.flatnonzero(sizes < fair))] = 1.0
            cuts = (np.cumsum(p / p.sum())[:-1] * idx.size).astype(np.int64)
            for k, part in enumerate(np.split(idx, cuts)):
                shards[k].append(part)
                sizes[k] += part.size
        parts = [np.concatenate(s) for s in shards]
        if sizes.min() >= min_size:
            return [np.sort(p) for p in parts]
        if sizes.min() > best_min:
            best, best_min = parts, int(sizes.min())

    moved = _fill_short_clients(best, y, min_size, rng)
    log.warning(
        "dirichlet(alpha=%g): no draw in %d gave all %d clients >= %d samples; moved %d samples "
        "from the largest clients to the short ones",
        alpha,
        max_tries,
        num_clients,
        min_size,
        moved,
    )
    return [np.sort(p) for p in best]


def _fill_short_clients(parts: list[np.ndarray], y: np.ndarray, min_size: int, rng) -> int:
    """Move samples from the largest client to the smallest until all have min_size
    (possible because N >= num_clients * min_size). Returns how many moved."""
    moved = 0
    while True:
        sizes = np.array([p.size for p in parts])
        short, donor = int(sizes.argmin()), int(sizes.argmax())
        if sizes[short] >= min_size:
            return moved
        count = int(min(min_size - sizes[short], sizes[donor] - min_size))
        d = rng.permutation(parts[donor])
        freq = np.bincount(y[d])[y[d]]  # each sample's label count in the donor
        order = np.argsort(-freq, kind="stable")
        give, keep = d[order[:count]], d[order[count:]]
        parts[short] = np.concatenate([parts[short], give])
        parts[donor] = keep
        moved += count


def quantity_skew(
    labels,
    num_clients: int,
    alpha: float | None = None,
    seed: int = 0,
    *,
    sigma: float | None = None,
    min_size: int = 10,
) -> list[np.ndarray]:
    """Quantity skew: client sizes follow Dirichlet(alpha) proportions (default alpha
    0.5) or, given `sigma`, log-normal(0, sigma) weights; each client then gets a
    uniformly random (IID-labelled) set of that many samples. Every client gets at
    least `min_size`: sizes are min_size plus the drawn shares of the rest."""
    y = _as_labels(labels)
    n = y.size
    _check_clients(num_clients, n, min_size)
    if alpha is not None and sigma is not None:
        raise ValueError("give quantity_skew either alpha (Dirichlet sizes) or sigma (log-normal sizes), not both")
    rng = _rng(seed)
    if sigma is not None:
        sigma = _check_positive("sigma", sigma)
        shares = rng.lognormal(0.0, sigma, num_clients)
    else:
        shares = _dirichlet(rng, _check_positive("alpha", 0.5 if alpha is None else alpha), num_clients)
    sizes = min_size + _apportion(n - num_clients * min_size, shares)
    perm = rng.permutation(n)
    return [np.sort(p) for p in np.split(perm, np.cumsum(sizes)[:-1])]


PARTITIONERS = {"iid": iid, "dirichlet": dirichlet, "quantity": quantity_skew}


def partition(method: str, labels, num_clients: int, seed: int = 0, **options) -> list[np.ndarray]:
    """Dispatch by name: 'iid', 'dirichlet' (needs alpha) or 'quantity' (alpha or sigma)."""
    key = str(method).strip().lower().replace("-", "_")
    key = {"quantity_skew": "quantity", "label_skew": "dirichlet"}.get(key, key)
    if key not in PARTITIONERS:
        raise ValueError(f"unknown partition {method!r}; choose one of: {', '.join(PARTITIONERS)}")
    return call_with_options(f"partition {key!r}", PARTITIONERS[key], (labels, num_clients), dict(options, seed=seed))


# ---------------------------------------------------------------- reporting


def label_histograms(labels, parts: list[np.ndarray], num_classes: int | None = None) -> np.ndarray:
    """int64 [num_clients, num_classes]: how many samples of each label each client holds."""
    y = _as_labels(labels)
    c = int(num_classes) if num_classes is not None else int(y.max()) + 1
    if y.max() >= c:
        raise ValueError(f"label {y.max()} does not fit num_classes={c}")
    rows = [np.bincount(y[np.asarray(p, dtype=np.int64)], minlength=c) for p in parts]
    return np.stack(rows) if rows else np.zeros((0, c), np.int64)


def mean_top_class_share(hist: np.ndarray) -> float:
    """Average over clients of the largest class's share of the client's samples:
    1/num_classes for perfectly balanced clients, 1.0 when every client has one class."""
    hist = np.asarray(hist, dtype=np.float64)
    totals = hist.sum(axis=1)
    keep = totals > 0
    return float((hist[keep].max(axis=1) / totals[keep]).mean()) if keep.any() else 0.0


def format_histograms(hist: np.ndarray, max_classes: int = 20) -> str:
    """A printable table: one row per client with its size, label counts and top share."""
    hist = np.asarray(hist)
    k, c = hist.shape
    shown = min(c, max_classes)
    width = max(3, len(str(int(hist.max()))) if hist.size else 1)
    head = "client   size  top%  " + " ".join(f"{j:>{width}}" for j in range(shown)) + (" ..." if c > shown else "")
    rows = [head]
    for i, h in enumerate(hist):
        total = int(h.sum())
        top = 100.0 * h.max() / total if total else 0.0
        counts = " ".join(f"{int(v):>{width}}" for v in h[:shown])
        rows.append(f"{i:>6} {total:>6} {top:>5.1f}  {counts}" + (" ..." if c > shown else ""))
    rows.append(f"mean top-class share {mean_top_class_share(hist):.3f} over {k} clients")
    return "\n".join(rows)
