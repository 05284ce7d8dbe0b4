"""The server step as a stream: ``Aggregator`` takes each client's update as it
arrives, so the server never holds more than the model's accumulator and the update in
hand (docs/kernels.md, "Streaming aggregation")."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from fedhq_kernels import ops
from fedhq_kernels.functional import (
    DEFAULT_TRIM,
    _check_device,
    _check_same_kind,
    _resolve_method,
    aggregate_state_dicts,
    output_bits,
)
from fedhq_kernels.mean import PlainMean, WeightTotal
from fedhq_kernels.quantized_tensor import QuantizedTensor, quant_range, validate_all

_OP = "Aggregator"
HALF_FLOAT32_MAX = torch.finfo(torch.float32).max / 2


def _owners(k: int) -> str:
    return ("the template", "the update")[k]


class Aggregator:
    """``Aggregator(template)``, ``add(update, weight)`` per client, ``result()``: the
    aggregate of the added updates, bit-identical to ``aggregate_state_dicts`` of the
    same updates and weights in the same order.

    ``template`` is the global model's layout (a state dict of QuantizedTensors and
    plain tensors; its values are not read): every update must have its names, and per
    entry its kind, shape, dtype and, when quantized, axis and scheme (at any bit width
    in [2, 8]), with valid values (finite scales > 0, zero points and codes in its
    width's range) on the template's device.
    ``add`` checks all of that, and the weight (a finite number >= 0), before touching
    any state: a refused update raises ValueError / TypeError and changes nothing.

    method="mean" (the weighted mean) streams: ``add`` blends the update into a float32
    accumulator (the fused dequantize + blend op ``accumulate``) and keeps no reference
    to it, so memory is O(model) however many clients are added (``accumulator``: a
    float32 buffer to reuse for it, zeroed here, e.g. a server's from round to round);
    ``result`` requantizes each tensor with its observed range (at ``bits``; by default
    the highest width an added update had for it). "trimmed-mean" and
    "median" rank every client's value, so they cannot stream: ``add`` validates the
    update and keeps it (O(clients x model) memory) and ``result`` runs
    ``aggregate_state_dicts`` on them.
    """

    def __init__(
        self, template: Mapping, *, method: str = "mean", trim: float = DEFAULT_TRIM, accumulator: Tensor | None = None
    ):
        self.quantized, self.plain_floats, self.device = _template_layout(_OP, template)
        _resolve_method(_OP, method, trim, 1)  # checks method and trim; the cut depends on the clients
        self.method, self.trim = method, trim
        self.template = dict(template)
        self.total = WeightTotal()
        self.clients = 0
        self.widest: dict[str, int] = {}  # quantized entry -> the highest width added
        self.kept: list[tuple[Mapping, float]] = []  # robust methods only
        if method == "mean":
            elements = sum(self.template[k].data.numel() for k in self.quantized)
            self.acc = _accumulator(accumulator, elements, self.device)
            self.acc_shared = False  # whether a float result holds views of acc (copied on the next add)
            self.plain = {
                k: PlainMean(v, self.device) for k, v in self.template.items() if not isinstance(v, QuantizedTensor)
            }

    def add(self, update: Mapping, weight) -> None:
        """Validates ``update`` against the template, then adds it with ``weight`` (e.g.
        its sample count)."""
        self._check(update)
        fraction, total = self.total.add(_OP, weight)
        for key in self.quantized:
            self.widest[key] = max(self.widest.get(key, 0), update[key].bits)
        if self.method != "mean":
            self.kept.append((update, weight))
            self.total, self.clients = total, self.clients + 1
            return
        if self.quantized:
            if self.acc_shared:  # a float result views the accumulator: it must not change under it
                self.acc, self.acc_shared = self.acc.clone(), False
            qs = [update[k] for k in self.quantized]
            axes = [-1 if q.axis is None else q.axis for q in qs]
            ops.accumulate(
                self.acc,
                [q.data for q in qs],
                [q.scale for q in qs],
                [q.zero_point for q in qs],
                axes,
                fraction,
                self.quantized,
            )
        for key, mean in self.plain.items():
            mean.add(update[key], fraction)
        self.total, self.clients = total, self.clients + 1

    def _check(self, update: Mapping) -> None:
        _check_update(_OP, self.template, self.quantized, self.plain_floats, self.device, update)

    def result(self, *, requantize: bool = True, bits: int | Mapping[str, int] | None = None) -> dict:
        """The aggregate of the updates added so far, in the template's order, its
        quantized entries at ``bits`` (an int, or a map naming every quantized entry;
        None: each entry's highest width among the added updates), as
        ``aggregate_state_dicts``'s. ``requantize=False`` (the mean only): the quantized
        entries as the float32 mean itself, cast to each entry's float dtype, for a
        server that sends a float model (float32 entries are views of the accumulator,
        which a later ``add`` copies first, so a result never changes under its holder:
        no 4-bytes-per-parameter copy for the common last call; while the aggregator is
        still in use, treat them as read-only)."""
        if not self.clients:
            raise ValueError(f"{_OP}: no update was added")
        widths = output_bits(_OP, bits, requantize, self.method, self.widest)
        if self.method != "mean":
            updates, weights = zip(*self.kept)
            return aggregate_state_dicts(list(updates), list(weights), bits=bits, method=self.method, trim=self.trim)
        if not self.total.total:
            raise ValueError(f"{_OP}: weights sum to 0; at least one client must have weight > 0")
        out: dict = {key: mean.result() for key, mean in self.plain.items()}
        start = 0
        for key in self.quantized:
            q = self.template[key]
            values = self.acc[start : start + q.data.numel()].view(q.shape)
            start += q.data.numel()
            out[key] = _requantize(key, q, values, widths[key]) if requantize else values.to(q.dtype)
        if not requantize:
            self.acc_shared = True
        return {key: out[key] for key in self.template}


def _accumulator(buffer: Tensor | None, elements: int, device: torch.device) -> Tensor:
    """The mean's float32 accumulator, zeroed: ``buffer`` when given (a server that
    aggregates round after round reuses one: a fresh 45 MB tensor costs ~10 ms of page
    faults a round), else a new one."""
    if buffer is None:
        return torch.zeros(elements, dtype=torch.float32, device=device)
    if not (
        isinstance(buffer, Tensor)
        and buffer.dtype == torch.float32
        and buffer.shape == (elements,)
        and buffer.device == device
        and buffer.is_contiguous()
    ):
        raise ValueError(
            f"{_OP}: the accumulator must be a contiguous 1-d float32 tensor of {elements} elements on {device}, "
            f"got {buffer.dtype if isinstance(buffer, Tensor) else type(buffer).__name__} "
            f"{tuple(buffer.shape) if isinstance(buffer, Tensor) else ''}"
        )
    return buffer.zero_()


def check_update(template: Mapping, update: Mapping, *, op: str = "check_update") -> None:
    """TypeError / ValueError (one line, prefixed ``op``) unless ``update`` can enter an
    aggregation shaped like ``template``, as ``Aggregator.add`` requires: the same names,
    each entry of the template's kind, shape, dtype and scheme (any width in [2, 8]),
    valid codes, scales and zero points on the template's device, dequantized values
    below half of float32's largest (so their means stay finite), finite plain floats.
    An update that passes dequantizes to finite values."""
    _check_update(op, template, *_template_layout(op, template), update)


def _template_layout(op: str, template: Mapping) -> tuple[list[str], list[str], torch.device]:
    """(quantized entries, plain float entries, device) of a valid template."""
    if not isinstance(template, Mapping):
        raise TypeError(f"{op}: the template must be a mapping, got {type(template).__name__}")
    for key, entry in template.items():
        _check_same_kind(op, key, [entry], _owners)
    quantized = [k for k, v in template.items() if isinstance(v, QuantizedTensor)]
    plain_floats = [k for k, v in template.items() if not isinstance(v, QuantizedTensor) and v.is_floating_point()]
    first = next(iter(template.values()), None)
    device = first.data.device if isinstance(first, QuantizedTensor) else getattr(first, "device", None)
    return quantized, plain_floats, device or torch.device("cpu")


def _check_update(
    op: str, template: Mapping, quantized: list[str], plain_floats: list[str], device: torch.device, update: Mapping
) -> None:
    if not isinstance(update, Mapping):
        raise TypeError(f"{op}: the update must be a mapping, got {type(update).__name__}")
    if set(update) != set(template):
        missing = sorted(set(template) - set(update))
        extra = sorted(set(update) - set(template))
        raise ValueError(f"{op}: the update's names differ from the template's: missing {missing}, unexpected {extra}")
    for key, reference in template.items():
        _check_same_kind(op, key, [reference, update[key]], _owners)
    owners = [f"the update's '{k}'" for k in quantized]
    for key, owner in zip(quantized, owners):
        _check_device(op, owner, update[key], device)
    validate_all([update[k] for k in quantized], op, owners)
    _check_reach(op, update, quantized)
    for key in plain_floats:
        if not bool(torch.isfinite(update[key]).all()):
            raise ValueError(f"{op}: the update's '{key}' holds NaN or Inf")


def _check_reach(op: str, update: Mapping, keys: list[str]) -> None:
    """ValueError naming an entry whose dequantized values can reach half of float32's
    largest value: the largest |code - zero point| times its scale, per channel (one
    batch per bit width). Below that bound no blend step (a convex combination, rounded)
    can overflow, so the mean stays finite and a float result needs no check of its own."""
    by_bits: dict[int, list[str]] = {}
    for key in keys:
        by_bits.setdefault(update[key].bits, []).append(key)
    for group in by_bits.values():
        qmin, qmax = update[group[0]].quant_range
        scale = torch.cat([update[k].scale.reshape(-1) for k in group])
        zero_point = torch.cat([update[k].zero_point.reshape(-1) for k in group])
        reach = torch.maximum(qmax - zero_point, zero_point - qmin).float() * scale
        if not bool((reach <= HALF_FLOAT32_MAX).all()):  # NaN compares False: refused too
            key = next(k for k in group if not bool((update[k].scale * (qmax - qmin) <= HALF_FLOAT32_MAX).all()))
            raise ValueError(f"{op}: the update's '{key}' has a scale so large its values reach float32's limit")


def _requantize(key: str, like: QuantizedTensor, values: Tensor, bits: int) -> QuantizedTensor:
    """``values`` (the float32 mean) quantized at ``bits`` in ``like``'s scheme, with its observed range."""
    quant_min, quant_max = quant_range(bits)
    axis = -1 if like.axis is None else like.axis
    try:
        codes, scale, zero_point = ops.quantize(values, quant_min, quant_max, like.symmetric, axis)
    except ValueError:
        raise ValueError(
            f"{_OP}: the weighted average of '{key}' is not finite (client scales too large for float32)"
        ) from None
    return QuantizedTensor(
        data=codes,
        scale=scale,
        zero_point=zero_point,
        bits=bits,
        axis=like.axis,
        symmetric=like.symmetric,
        dtype=like.dtype,
        shape=like.shape,
    )
