"""FedMPQ's server side and AQFL's bit map, as pure functions of (layer name -> parameter
count, bit map, budget) (seed §3.4).

    weights = aggregation_weights(samples, budgets)        # samples x budget, normalized
    average = average_bit_maps(maps, weights)              # the global bit allocation
    fit_budget(counts, average, budget)                    # one client's map (Alg. 2)
    step = server_step(counts, maps, samples, budgets)     # the first two for a round
    step.client_map(counts, budget)                        # and the third, per client

A budget is average bits per weight, weighted by parameter count, over the layers of
the map (the Conv2d / Linear weights: ``fedhq.mpq.bitplane.quantizable_layers``).
Where each rule comes from and what the seed leaves open: docs/mixed-precision.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from fedhq.analysis.speed import load_profile
from fedhq.mpq.bitplane import MIN_BITS
from fedhq.profile.schema import get_path
from fedhq_kernels.checks import MAX_BITS, check_bits, is_int, is_real

# A device's budget from its float32 matmul throughput (TFLOP/s, the profile's
# figures.matmul_tflops.float32.median), the first tier it reaches: the presets'
# RTX A6000 (23.2) -> 8, Jetson Orin Nano (0.90) -> 6, Snapdragon phone (0.11) -> 4.
BUDGET_TIERS = ((10.0, 8), (0.5, 6), (0.0, 4))


def device_budget(source: Any) -> int:
    """The bit budget of a device: a preset name, a profile path or a profile dict (as
    ``RunConfig.devices`` names them), by BUDGET_TIERS."""
    tflops = get_path(load_profile(source), "figures.matmul_tflops.float32.median")
    return next(bits for floor, bits in BUDGET_TIERS if tflops >= floor)


def check_counts(counts: Mapping[str, int], op: str) -> dict[str, int]:
    """``counts`` as a dict if every count is an int >= 0 and there is at least one weight."""
    if not isinstance(counts, Mapping) or not counts:
        raise ValueError(f"{op}: counts must be a non-empty mapping of layer name -> parameter count")
    bad = {k: v for k, v in counts.items() if not (is_int(v) and v >= 0)}
    if bad:
        raise ValueError(f"{op}: parameter counts must be ints >= 0, got {bad}")
    if sum(counts.values()) == 0:
        raise ValueError(f"{op}: the layers hold no parameters")
    return {k: int(v) for k, v in counts.items()}


def _check_names(counts: Mapping[str, int], bits: Mapping[str, Any], op: str) -> None:
    unknown, missing = sorted(set(bits) - set(counts)), sorted(set(counts) - set(bits))
    if unknown or missing:
        raise ValueError(f"{op}: bit map names unknown layers {unknown} and misses layers {missing}")


def _check_pruned(counts: Mapping[str, int], pruned: Mapping[str, int], op: str) -> dict[str, int]:
    _check_names(counts, pruned, f"{op} (pruned)")
    bad = {k: v for k, v in pruned.items() if not (is_int(v) and v >= 0)}
    if bad:
        raise ValueError(f"{op}: pruned counts must be ints >= 0, got {bad}")
    return {k: int(pruned[k]) for k in counts}


def check_bit_map(counts: Mapping[str, int], bits: Mapping[str, int], op: str) -> dict[str, int]:
    """``bits`` as a dict if it covers exactly the layers of ``counts`` with valid widths."""
    _check_names(counts, bits, op)
    return {k: check_bits(op, bits[k], f"bits of layer {k}") for k in counts}


def _check_budget(budget: Any, min_bits: int, op: str) -> Fraction:
    if not is_real(budget):
        raise ValueError(f"{op}: budget must be a finite number, got {budget!r}")
    if budget < min_bits:
        raise ValueError(f"{op}: budget {budget} is below the minimum width of {min_bits} bits")
    return Fraction(budget)  # exact: a float's Fraction is its value


def average_bits(counts: Mapping[str, int], bits: Mapping[str, int]) -> float:
    """Average bits per weight, weighted by parameter count: what a budget bounds."""
    counts = check_counts(counts, "average_bits")
    bits = check_bit_map(counts, bits, "average_bits")
    return sum(counts[k] * bits[k] for k in counts) / sum(counts.values())


def aqfl_bit_map(counts: Mapping[str, int], budget: float, min_bits: int = MIN_BITS) -> dict[str, int]:
    """AQFL's map: every layer at floor(budget) bits (at most MAX_BITS), the fixed
    precision its clients train at with the project's QAT layers."""
    counts = check_counts(counts, "aqfl_bit_map")
    check_bits("aqfl_bit_map", min_bits, "min_bits")
    _check_budget(budget, min_bits, "aqfl_bit_map")
    return dict.fromkeys(counts, min(MAX_BITS, math.floor(budget)))


def aggregation_weights(samples: Sequence[int], budgets: Sequence[float]) -> list[float]:
    """Each client's aggregation weight, proportional to its sample count times its
    budget (seed Eq. 15), normalized to sum to 1: clients with more data and more bits
    weigh more."""
    if len(samples) != len(budgets) or not samples:
        raise ValueError(
            f"aggregation_weights: need one budget per client, got {len(samples)} sample counts and "
            f"{len(budgets)} budgets"
        )
    for i, (n, b) in enumerate(zip(samples, budgets)):
        if not (is_int(n) and n >= 0):
            raise ValueError(f"aggregation_weights: client {i}'s sample count must be an int >= 0, got {n!r}")
        if not (is_real(b) and b > 0):
            raise ValueError(f"aggregation_weights: client {i}'s budget must be a number > 0, got {b!r}")
    raw = [n * b for n, b in zip(samples, budgets)]
    total = sum(raw)
    if total == 0:
        raise ValueError("aggregation_weights: every client has 0 samples")
    return [r / total for r in raw]


def average_bit_maps(maps: Sequence[Mapping[str, int]], weights: Sequence[float]) -> dict[str, float]:
    """The global bit allocation: each layer's width averaged over the clients' maps
    with ``weights`` (seed Eq. 15); every map must name the same layers."""
    if len(maps) != len(weights) or not maps:
        raise ValueError(f"average_bit_maps: need one weight per map, got {len(maps)} maps and {len(weights)} weights")
    if not all(is_real(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"average_bit_maps: weights must be finite, >= 0 and not all 0, got {list(weights)}")
    layers = dict.fromkeys(maps[0], 1)
    checked = [check_bit_map(layers, m, f"average_bit_maps (client {i})") for i, m in enumerate(maps)]
    total = sum(weights)
    return {k: sum(w * m[k] for w, m in zip(weights, checked)) / total for k in layers}


def fit_budget(
    counts: Mapping[str, int],
    bits: Mapping[str, float],
    budget: float,
    *,
    min_bits: int = MIN_BITS,
    pruned: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """One client's bit map from the global allocation ``bits`` (seed Alg. 2): round each
    width to the nearest int (halves up) within [min_bits, MAX_BITS]; while the average
    exceeds ``budget``, take one bit from the layer with the most parameters (to
    min_bits before the next); then, fewest parameters first, give each layer bits while
    the average stays within ``budget``. The result never exceeds the budget, and no
    layer below MAX_BITS can gain a bit without exceeding it. Equal counts: the layer
    with more planes ``pruned`` in the last local training (weight name -> planes
    dropped) is pruned first and grown last, then by name."""
    op = "fit_budget"
    counts = check_counts(counts, op)
    check_bits(op, min_bits, "min_bits")
    cap = _check_budget(budget, min_bits, op) * sum(counts.values())
    _check_names(counts, bits, op)
    bad = {k: v for k, v in bits.items() if not is_real(v)}
    if bad:
        raise ValueError(f"{op}: bit widths must be finite numbers, got {bad}")
    pruned = dict.fromkeys(counts, 0) if pruned is None else _check_pruned(counts, pruned, op)
    out = {k: min(MAX_BITS, max(min_bits, math.floor(bits[k] + 0.5))) for k in counts}
    used = sum(counts[k] * out[k] for k in counts)
    for k in sorted(counts, key=lambda k: (-counts[k], -pruned[k], k)):
        while used > cap and out[k] > min_bits:
            out[k] -= 1
            used -= counts[k]
    for k in sorted(counts, key=lambda k: (counts[k], pruned[k], k)):
        while out[k] < MAX_BITS and used + counts[k] <= cap:
            out[k] += 1
            used += counts[k]
    return out


@dataclass(frozen=True)
class ServerStep:
    """What the server learns from a round's uploads (seed §3.4.2): the aggregation
    weights of the clients' dequantized models (in upload order), the global bit
    allocation, and the planes the clients pruned per layer (summed: Alg. 2's tie-break)."""

    weights: list[float]
    bits: dict[str, float]
    pruned: dict[str, int]

    def client_map(self, counts: Mapping[str, int], budget: float, min_bits: int = MIN_BITS) -> dict[str, int]:
        """A client's bit map for the next round at its ``budget`` (fit_budget)."""
        return fit_budget(counts, self.bits, budget, min_bits=min_bits, pruned=self.pruned)


def server_step(
    counts: Mapping[str, int],
    maps: Sequence[Mapping[str, int]],
    samples: Sequence[int],
    budgets: Sequence[float],
    pruned: Sequence[Mapping[str, int]] | None = None,
) -> ServerStep:
    """The server's FedMPQ step from the uploading clients' bit ``maps``, sample counts,
    budgets and (optionally) planes ``pruned`` this round, one per client."""
    counts = check_counts(counts, "server_step")
    weights = aggregation_weights(samples, budgets)
    average = average_bit_maps(maps, weights)
    _check_names(counts, average, "server_step")
    if pruned is not None and len(pruned) != len(maps):
        raise ValueError(f"server_step: need one pruned map per client, got {len(pruned)} for {len(maps)} clients")
    drops = dict.fromkeys(counts, 0)
    for i, p in enumerate(pruned or ()):
        for k, n in _check_pruned(counts, p, f"server_step (client {i})").items():
            drops[k] += n
    return ServerStep(weights, average, drops)
