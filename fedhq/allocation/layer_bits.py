"""FedLQ (beyond FedHQ): per-client, per-layer upload bit widths under each uplink.

The server measures every quantized tensor's *layer significance* on its validation
split: the loss increase when only that tensor is quantized at b bits (the rest float),
against the bytes it takes on the wire at b bits. A client then gets the bit map that a
greedy rule picks under its upload budget (``upload_budget``: its uplink times an upload
time target). Here a "layer" is one quantized state-dict entry (a weight or a bias: what
``quantize_state_dict`` quantizes one at a time). The metric, the rule and what the
FedLQ paper says: docs/mixed-precision.md, "FedLQ".
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

import fedhq_kernels as fk
from fedhq.data.base import Split
from fedhq.fl.client import payload_bytes, quantize_upload, quantized_names
from fedhq.fl.timing import upload_budget
from fedhq.quant.deploy import score
from fedhq_kernels.checks import MAX_BITS, MIN_BITS, is_int, is_real

CANDIDATE_BITS = (8, 6, 4, 3, 2)


@dataclass(frozen=True)
class LayerCost:
    """One layer at one bit width."""

    damage: float  # validation loss increase with only this layer quantized at these bits
    nbytes: int  # its bytes on the wire at these bits: packed codes, scales and zero points


Tables = Mapping[str, Mapping[int, LayerCost]]


@dataclass(frozen=True)
class Significance:
    """``measure_significance``'s result: per layer, bits -> cost."""

    tables: dict[str, dict[int, LayerCost]]
    kept: dict[str, int]  # quantized layers left out of the measurement: they travel at the highest width
    fixed_bytes: int  # bytes the bits cannot change: the kept layers and the entries that travel float
    base_loss: float  # the float model's validation loss


@dataclass(frozen=True)
class BitAllocation:
    """One client's upload bits and what the tables predict for them."""

    bits: dict[str, int]  # layer -> bit width
    nbytes: int  # predicted upload bytes: fixed_bytes plus every layer's bytes at its width
    damage: float  # predicted loss increase: the sum of the layers' damages
    budget: int
    met: bool  # False: even the fewest-bytes map exceeds the budget (``bits`` is that map)


def quantize_layer(name: str, tensor: torch.Tensor, bits: int) -> fk.QuantizedTensor:
    """``tensor`` quantized as the upload quantizes it, for its dequantized values and
    its wire bytes."""
    return quantize_upload({name: tensor}, {name}, bits)[name]


def _check_bits_set(bits: Iterable[int]) -> tuple[int, ...]:
    widths = tuple(bits)
    if not widths:
        raise ValueError("bits is empty: need at least one bit width")
    for b in widths:
        if not (is_int(b) and MIN_BITS <= b <= MAX_BITS):
            raise ValueError(f"bits: every width must be an int in [{MIN_BITS}, {MAX_BITS}], got {b!r}")
    if len(set(widths)) != len(widths):
        raise ValueError(f"bits: widths must be distinct, got {widths}")
    return tuple(sorted(widths, reverse=True))


@torch.no_grad()
def measure_significance(
    model: nn.Module,
    data: Split,
    *,
    bits: Iterable[int] = CANDIDATE_BITS,
    layers: Iterable[str] | None = None,
    batch_size: int = 512,
) -> Significance:
    """Per layer and bit width, the validation loss increase when only that layer is
    quantized (the rest float) and its wire bytes. ``model``: the float model with the
    weights to assess (the global model), given back as it came; ``layers``: a subset of the
    quantized tensors (default all of them; the others stay at the highest width, e.g.
    biases and BatchNorm's, which cost a pass each and weigh little). Costs
    len(layers) x len(bits) + 1 passes over ``data``."""
    widths = _check_bits_set(bits)
    if len(data) == 0:
        raise ValueError("measure_significance: the validation split is empty")
    quantized = quantized_names(model)
    names = sorted(quantized) if layers is None else list(layers)
    if not names:
        raise ValueError("measure_significance: layers is empty: need at least one layer")
    unknown = sorted(set(names) - quantized)
    if unknown:
        raise ValueError(
            f"measure_significance: unknown layer(s) {', '.join(map(repr, unknown))}; the quantized ones are "
            f"{', '.join(sorted(quantized))}"
        )
    params = dict(model.named_parameters())
    state = model.state_dict()
    training = model.training
    tables: dict[str, dict[int, LayerCost]] = {}
    try:
        base_loss = score(model, data, batch_size)[1]
        for name in names:
            param = params[name]
            original = param.detach().clone()
            tables[name] = {}
            try:
                for b in widths:
                    q = quantize_layer(name, original, b)
                    param.copy_(fk.dequantize(q))
                    tables[name][b] = LayerCost(score(model, data, batch_size)[1] - base_loss, q.nbytes)
            finally:
                param.copy_(original)
    finally:
        model.train(training)
    kept = {name: widths[0] for name in sorted(quantized - set(names))}
    fixed = payload_bytes({k: v for k, v in state.items() if k not in quantized})
    fixed += sum(quantize_layer(name, state[name], b).nbytes for name, b in kept.items())
    return Significance(tables, kept, fixed, base_loss)


def _check_tables(tables: Tables) -> None:
    if not isinstance(tables, Mapping) or not tables:
        raise ValueError("tables is empty: need at least one layer")
    for name, table in tables.items():
        if not isinstance(table, Mapping) or not table:
            raise ValueError(f"tables: layer {name!r} has no bit widths")
        for b, cost in table.items():
            if not (is_int(b) and MIN_BITS <= b <= MAX_BITS):
                raise ValueError(f"tables: layer {name!r} has bit width {b!r}, not an int in [{MIN_BITS}, {MAX_BITS}]")
            if not isinstance(cost, LayerCost) or not is_real(cost.damage):
                raise ValueError(f"tables: layer {name!r} at {b} bits needs a LayerCost with a finite damage")
            if not (is_int(cost.nbytes) and cost.nbytes >= 0):
                raise ValueError(f"tables: layer {name!r} at {b} bits has nbytes {cost.nbytes!r}, not an int >= 0")
        widths = sorted(table, reverse=True)
        for wider, narrower in zip(widths, widths[1:]):
            if table[narrower].nbytes > table[wider].nbytes:
                raise ValueError(
                    f"tables: layer {name!r} takes more bytes at {narrower} bits ({table[narrower].nbytes}) than at "
                    f"{wider} ({table[wider].nbytes})"
                )


def _check_bytes(value: int, what: str) -> None:
    if not (is_int(value) and value >= 0):
        raise ValueError(f"{what} must be a whole number of bytes >= 0, got {value!r}")


def _hull_steps(table: Mapping[int, LayerCost]) -> list[tuple[int, int]]:
    """The layer's steps down as (from bits, to bits), from its highest width along the
    lower convex hull of its (bytes, damage) points: each step goes to the width with
    the least damage per byte saved (ties: the nearer one), so every step costs at least
    as much per byte as the one before, and widths above the hull are skipped."""
    steps, current = [], max(table)
    while True:
        here = table[current]
        best, best_key = None, None
        for b, cost in table.items():
            saved = here.nbytes - cost.nbytes
            if b < current and saved > 0:
                key = ((cost.damage - here.damage) / saved, -cost.nbytes, -b)
                if best_key is None or key < best_key:
                    best, best_key = b, key
        if best is None:
            return steps
        steps.append((current, best))
        current = best


class LoweringPath:
    """The greedy's whole sequence of steps: from every layer at its highest width,
    repeatedly lower the layer whose next step costs the least damage per byte saved
    (ties: the first layer by name) until no layer can be lowered. A budget's map is the
    shortest prefix of this path that fits it, so one path serves every client."""

    def __init__(self, tables: Tables, *, fixed_bytes: int = 0):
        _check_tables(tables)
        _check_bytes(fixed_bytes, "fixed_bytes")
        self.tables = tables
        self.start = {name: max(table) for name, table in tables.items()}
        hulls = {name: _hull_steps(table) for name, table in tables.items()}
        nbytes = fixed_bytes + sum(tables[n][b].nbytes for n, b in self.start.items())
        self.steps: list[tuple[str, int]] = []  # (layer, its new width)
        self.nbytes = [nbytes]  # predicted bytes after each prefix of steps, strictly decreasing
        heap = []

        def push(name: str, position: int) -> None:
            if position < len(hulls[name]):
                old, new = hulls[name][position]
                saved = tables[name][old].nbytes - tables[name][new].nbytes
                increase = tables[name][new].damage - tables[name][old].damage
                heapq.heappush(heap, (increase / saved, name, position))

        for name in sorted(tables):
            push(name, 0)
        while heap:
            _, name, position = heapq.heappop(heap)
            old, new = hulls[name][position]
            nbytes -= tables[name][old].nbytes - tables[name][new].nbytes
            self.steps.append((name, new))
            self.nbytes.append(nbytes)
            push(name, position + 1)

    def allocate(self, budget: int) -> BitAllocation:
        """The greedy's map for ``budget`` upload bytes (the fewest-bytes map, flagged
        not met, when even that exceeds it)."""
        _check_bytes(budget, "budget")
        # the shortest prefix at or under the budget (nbytes decreases along the path)
        taken = bisect.bisect_left(self.nbytes, -budget, key=lambda nbytes: -nbytes)
        met = taken < len(self.nbytes)
        taken = min(taken, len(self.steps))
        bits = dict(self.start)
        for name, new in self.steps[:taken]:
            bits[name] = new
        damage = math.fsum(self.tables[n][b].damage for n, b in bits.items())
        return BitAllocation(bits, self.nbytes[taken], damage, int(budget), met)


def allocate_bits(tables: Tables, budget: int, *, fixed_bytes: int = 0) -> BitAllocation:
    """The greedy's bit map for one upload budget in bytes (``fixed_bytes``: what the
    upload carries besides the layers in ``tables``)."""
    return LoweringPath(tables, fixed_bytes=fixed_bytes).allocate(budget)


def client_bit_maps(significance: Significance, uplinks_mbps: Sequence[float], upload_s: float) -> list[BitAllocation]:
    """Each client's upload bits for every quantized layer (the measured ones and the
    kept ones): its budget is what its uplink (``ClientDevice.uplink_mbps``) sends in
    ``upload_s`` seconds, the round's upload time target."""
    path = LoweringPath(significance.tables, fixed_bytes=significance.fixed_bytes)
    maps = [path.allocate(upload_budget(upload_s, mbps)) for mbps in uplinks_mbps]
    return [replace(m, bits=significance.kept | m.bits) for m in maps]
