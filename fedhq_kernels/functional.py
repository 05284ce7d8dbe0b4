"""The public ops: argument checking and conversion, then one torch.ops.fedhq call.

Every function accepts float32 / float16 / bfloat16 tensors of any shape, contiguous
or not, and returns the input's dtype and device. Bad arguments raise TypeError or
ValueError naming the op and the offending value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fractions import Fraction

import torch
from torch import Tensor

from fedhq_kernels import ops, reference
from fedhq_kernels.checks import FLOAT_DTYPES, check_bits, check_float_dtype, is_int, is_real
from fedhq_kernels.mean import PlainMean, WeightTotal
from fedhq_kernels.qparams import FLOAT32_MAX
from fedhq_kernels.quantized_tensor import QuantizedTensor, quant_range, validate_all

# ---- argument checks shared by the ops ----


def _check_tensor(op: str, x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: expected a torch.Tensor, got {type(x).__name__}")
    check_float_dtype(op, x.dtype)


def _resolve_range(op: str, bits, quant_min, quant_max) -> tuple[int, int]:
    """quant_min / quant_max if given (both, spanning at most 2^bits codes), else the
    signed range of ``bits``."""
    bits = check_bits(op, bits)
    if quant_min is None and quant_max is None:
        return quant_range(bits)
    if quant_min is None or quant_max is None:
        raise ValueError(f"{op}: give both quant_min and quant_max or neither, got {quant_min!r} and {quant_max!r}")
    if not (is_int(quant_min) and is_int(quant_max)):
        raise TypeError(f"{op}: quant_min and quant_max must be ints, got {quant_min!r} and {quant_max!r}")
    if not quant_min < quant_max or quant_max - quant_min + 1 > (1 << bits):
        raise ValueError(
            f"{op}: need quant_min < quant_max spanning at most 2^{bits} codes, got [{quant_min}, {quant_max}]"
        )
    return int(quant_min), int(quant_max)


def _normalize_axis(op: str, x: Tensor, axis) -> int:
    """The schema's axis: -1 for per-tensor, else 0 <= axis < x.dim()."""
    if axis is None:
        return -1
    if not is_int(axis):
        raise TypeError(f"{op}: axis must be None or an int, got {axis!r}")
    if not -x.dim() <= axis < x.dim():
        raise ValueError(f"{op}: axis {axis} is out of range for a tensor of shape {tuple(x.shape)}")
    return int(axis) % x.dim()


def _check_symmetric(op: str, symmetric) -> bool:
    if not isinstance(symmetric, bool):
        raise TypeError(f"{op}: symmetric must be a bool, got {symmetric!r}")
    return symmetric


def _check_symmetric_range(op: str, symmetric: bool, quant_min: int, quant_max: int) -> None:
    _check_symmetric(op, symmetric)
    if symmetric and not quant_min < 0 < quant_max:
        raise ValueError(
            f"{op}: a symmetric range needs quant_min < 0 < quant_max (zero point 0), got [{quant_min}, {quant_max}]; "
            "use symmetric=False for an unsigned range"
        )


INT32_MIN, INT32_MAX = torch.iinfo(torch.int32).min, torch.iinfo(torch.int32).max
_WIDE_INTS = (torch.int64, torch.uint32, torch.uint64)  # integer dtypes wider than int32


def _qparam_tensor(op: str, name: str, value, dtype: torch.dtype, x: Tensor, axis: int) -> Tensor:
    """A per-tensor (0-d) or per-channel ([C]) float32 scale / int32 zero point on x's device."""
    channels = 1 if axis < 0 else x.shape[axis]
    if isinstance(value, Tensor):
        if dtype == torch.int32 and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
            raise TypeError(f"{op}: {name} must hold integers, got a {value.dtype} tensor")
        if dtype == torch.float32 and not value.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {value.dtype}")
        if value.numel() != channels:
            where = "per-tensor" if axis < 0 else f"along axis {axis} of a tensor of shape {tuple(x.shape)}"
            raise ValueError(f"{op}: {name} needs {channels} value(s) {where}, got shape {tuple(value.shape)}")
        if dtype == torch.int32 and value.dtype in _WIDE_INTS and value.numel():
            lo, hi = (int(v) for v in torch.aminmax(value.detach().double()))  # never wrap: 2**40 is not 0
            if lo < INT32_MIN or hi > INT32_MAX:
                raise ValueError(f"{op}: zero_point must fit in int32, got {hi if hi > INT32_MAX else lo}")
        return value.detach().to(device=x.device, dtype=dtype).reshape(ops.qparams_shape(x, axis))
    if axis >= 0:
        raise ValueError(f"{op}: per-channel quantization (axis={axis}) needs a {name} tensor of {channels} values")
    if dtype == torch.float32:
        if not (is_real(value) and value > 0):
            raise ValueError(f"{op}: the scale must be finite and > 0, got {value!r}")
        if value > FLOAT32_MAX:
            raise ValueError(f"{op}: the scale must be at most float32's max ({FLOAT32_MAX:.7g}), got {value!r}")
    elif not is_int(value):
        raise TypeError(f"{op}: zero_point must be an int, got {value!r}")
    elif not INT32_MIN <= value <= INT32_MAX:
        raise ValueError(f"{op}: zero_point must fit in int32, got {value!r}")
    # a fill kernel, not torch.tensor's host-to-device copy, which waits for the GPU
    return torch.full((), value, dtype=dtype, device=x.device)


def _check_out_arg(op: str, out, x: Tensor) -> None:
    """``out`` is None or a tensor, its autograd history dropped; outside the eager fast path (torch.compile, export,
    dispatch modes) the registered out= ops have no autograd formula, so a gradient
    through out= is refused there, as torch refuses one through its own out= ops."""
    if out is None:
        return
    if not isinstance(out, Tensor):
        raise TypeError(f"{op}: out must be a torch.Tensor or None, got {type(out).__name__}")
    if not ops.eager_fast_path(x) and torch.is_grad_enabled() and x.requires_grad:
        raise RuntimeError(f"{op}: out= is differentiable in eager mode only; x requires grad here")
    if out.grad_fn is not None:
        # out is overwritten, so its history goes: kept, the next backward would run
        # into the previous step's (freed) graph through it.
        if out._is_view():
            raise ValueError(f"{op}: out is a view with autograd history; pass a tensor without one")
        out.detach_()


# ---- fake quantization ----


def fake_quant(
    x: Tensor,
    scale=None,
    zero_point=None,
    *,
    bits: int = 8,
    symmetric: bool = True,
    axis: int | None = None,
    quant_min: int | None = None,
    quant_max: int | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Quantize-dequantize ``x`` with a straight-through gradient (1 where the code was
    inside [quant_min, quant_max], 0 outside).

    With ``scale`` (and optionally ``zero_point``, default 0) this equals
    ``torch.fake_quantize_per_tensor_affine`` / ``_per_channel_affine`` bit for bit,
    forward and gradient. With ``scale=None`` the range is observed from ``x`` in the
    same kernel, with MinMaxObserver's formulas (``symmetric`` picks the scheme).
    ``axis`` selects per-channel quantization; the range defaults to the signed
    ``bits``-bit range and ``quant_min`` / ``quant_max`` override it.

    ``out``: write the result into this tensor (x's shape, dtype and device,
    contiguous, sharing no memory with x) and return it, e.g. a buffer a QAT layer
    keeps; in eager mode it carries the gradient to x (docs/kernels.md, "out= forms").
    """
    _check_tensor("fake_quant", x)
    _check_out_arg("fake_quant", out, x)
    quant_min, quant_max = _resolve_range("fake_quant", bits, quant_min, quant_max)
    axis = _normalize_axis("fake_quant", x, axis)
    if scale is None:
        if zero_point is not None:
            raise ValueError("fake_quant: zero_point was given without a scale; give both, or neither to observe")
        _check_symmetric_range("fake_quant", symmetric, quant_min, quant_max)
        if ops.eager_fast_path(x):
            return ops.FakeQuantObservedEager.apply(x, quant_min, quant_max, symmetric, axis, out)[0]
        if out is None:
            return ops.fake_quant_observed(x, quant_min, quant_max, symmetric, axis)[0]
        ops.fake_quant_observed_out(x, quant_min, quant_max, symmetric, axis, out)
        return out
    scale = _qparam_tensor("fake_quant", "scale", scale, torch.float32, x, axis)
    zero_point = _qparam_tensor(
        "fake_quant", "zero_point", 0 if zero_point is None else zero_point, torch.int32, x, axis
    )
    if ops.eager_fast_path(x):
        return ops.FakeQuantEager.apply(x, scale, zero_point, quant_min, quant_max, axis, out)
    if out is None:
        return ops.fake_quant(x, scale, zero_point, quant_min, quant_max, axis)
    ops.fake_quant_out(x, scale, zero_point, quant_min, quant_max, axis, out)
    return out


# ---- quantize / dequantize ----


def quantize(x: Tensor, *, bits: int = 8, symmetric: bool = True, axis: int | None = None) -> QuantizedTensor:
    """Quantize ``x`` to ``bits``-bit integer codes with a freshly observed range
    (MinMaxObserver formulas), per tensor or per channel along ``axis``."""
    _check_tensor("quantize", x)
    quant_min, quant_max = _resolve_range("quantize", bits, None, None)
    _check_symmetric("quantize", symmetric)
    schema_axis = _normalize_axis("quantize", x, axis)
    codes, scale, zero_point = ops.quantize(x.detach(), quant_min, quant_max, symmetric, schema_axis)
    return QuantizedTensor(
        data=codes,
        scale=scale,
        zero_point=zero_point,
        bits=bits,
        axis=None if schema_axis < 0 else schema_axis,
        symmetric=symmetric,
        dtype=x.dtype,
        shape=x.shape,
    )


def dequantize(q: QuantizedTensor, *, out: Tensor | None = None) -> Tensor:
    """(code - zero_point) * scale, as ``q.dtype``; written into ``out`` (q's shape and
    dtype, contiguous, not sharing memory with q) and returned when it is given."""
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"dequantize: expected a QuantizedTensor, got {type(q).__name__}")
    q.validate("dequantize")
    axis = -1 if q.axis is None else q.axis
    if out is None:
        return ops.dequantize(q.data, q.scale, q.zero_point, axis, q.dtype)
    if not isinstance(out, Tensor):
        raise TypeError(f"dequantize: out must be a torch.Tensor or None, got {type(out).__name__}")
    if out.dtype != q.dtype:
        raise TypeError(f"dequantize: out is {out.dtype}, expected the tensor's dtype {q.dtype}")
    ops.dequantize_out(q.data, q.scale, q.zero_point, axis, out)
    return out


def bit_map(op: str, bits, names: list[str], kind: str) -> dict[str, int]:
    """name -> bit width for each of ``names`` from ``bits``: an int (every name), or a
    Mapping naming exactly those names (each a ``kind``, as the messages say); a missing
    or unknown name, or a width outside [2, 8], is a ValueError naming the key."""
    if not isinstance(bits, Mapping):
        return dict.fromkeys(names, check_bits(op, bits))
    known = set(names)
    unknown = next((key for key in bits if key not in known), None)
    if unknown is not None:
        raise ValueError(f"{op}: bits names {unknown!r}, which is not a {kind}")
    missing = next((name for name in names if name not in bits), None)
    if missing is not None:
        raise ValueError(f"{op}: bits gives no width for {missing!r}; a bits map must name every {kind}")
    return {name: check_bits(op, bits[name], f"bits[{name!r}]") for name in names}


def quantize_state_dict(
    state_dict: Mapping[str, Tensor],
    *,
    bits: int | Mapping[str, int] = 8,
    symmetric: bool = True,
    per_channel: bool = True,
) -> dict[str, QuantizedTensor | Tensor]:
    """Quantizes every floating-point tensor of a state dict (per channel along axis 0
    for tensors of 2 or more dimensions when ``per_channel``); other entries (integer
    buffers such as BatchNorm's num_batches_tracked) are kept as they are. ``bits``: one
    width for every tensor, or a mapping name -> width naming every floating-point entry
    (mixed precision: docs/kernels.md, "Mixed bit widths")."""
    floats = [k for k, v in state_dict.items() if isinstance(v, Tensor) and v.dtype in FLOAT_DTYPES]
    widths = bit_map("quantize_state_dict", bits, floats, "floating-point entry of the state dict")
    out: dict[str, QuantizedTensor | Tensor] = {}
    for key, value in state_dict.items():
        if key in widths:
            axis = 0 if per_channel and value.dim() >= 2 else None
            try:
                out[key] = quantize(value, bits=widths[key], symmetric=symmetric, axis=axis)
            except ValueError as error:
                raise ValueError(f"quantize_state_dict: '{key}': {error}") from error
        else:
            out[key] = value
    return out


def dequantize_state_dict(state_dict: Mapping[str, QuantizedTensor | Tensor]) -> dict[str, Tensor]:
    """The inverse of quantize_state_dict (up to quantization error)."""
    return {k: dequantize(v) if isinstance(v, QuantizedTensor) else v for k, v in state_dict.items()}


# ---- aggregation ----


def running_fractions(op: str, weights, clients: int, device: torch.device) -> Tensor:
    """Each client's fraction of the weight seen up to it (fedhq_kernels.mean), float32:
    the weighted mean's ``weights`` argument of the aggregate op. Weights are finite
    numbers >= 0 (e.g. sample counts), not all 0."""
    try:
        w = torch.as_tensor(weights.detach().cpu() if isinstance(weights, Tensor) else weights, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"{op}: weights must be a sequence of numbers, got {weights!r}") from error
    w = w.flatten()
    if w.numel() != clients:
        raise ValueError(f"{op}: got {w.numel()} weights for {clients} clients")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError(f"{op}: weights must be finite and >= 0, got {w.tolist()}")
    total, fractions = WeightTotal(), []
    for x in w.tolist():
        fraction, total = total.add(op, x)
        fractions.append(fraction)
    if not total.total:
        raise ValueError(f"{op}: weights sum to 0; at least one client must have weight > 0")
    return torch.tensor(fractions, dtype=torch.float32, device=device)


_QT_FIELDS = ("shape", "dtype", "axis", "symmetric")  # not bits: clients may send a tensor at any width


def _check_same_kind(op: str, key: str, entries: list, owners=lambda k: f"client {k}") -> None:
    """Every entry for ``key`` must be aggregatable with entry 0 (quantized: the same
    shape, dtype, axis and scheme, at any bit width); ``owners(k)`` names entry k's
    owner in the message."""
    first = entries[0]
    for k, entry in enumerate(entries[1:], start=1):
        if isinstance(first, QuantizedTensor):
            if not isinstance(entry, QuantizedTensor):
                raise TypeError(
                    f"{op}: '{key}' is quantized for {owners(0)} but a {type(entry).__name__} for {owners(k)}"
                )
            for field in _QT_FIELDS:
                if getattr(entry, field) != getattr(first, field):
                    raise ValueError(
                        f"{op}: '{key}' of {owners(k)} has {field}={getattr(entry, field)!r}, "
                        f"{owners(0)} has {getattr(first, field)!r}"
                    )
        elif isinstance(first, Tensor):
            if not isinstance(entry, Tensor) or isinstance(entry, QuantizedTensor):
                raise TypeError(
                    f"{op}: '{key}' is a tensor for {owners(0)} but a {type(entry).__name__} for {owners(k)}"
                )
            if entry.shape != first.shape or entry.dtype != first.dtype:
                raise ValueError(
                    f"{op}: '{key}' of {owners(k)} is {entry.dtype} {tuple(entry.shape)}, "
                    f"{owners(0)} has {first.dtype} {tuple(first.shape)}"
                )
    if not isinstance(first, (QuantizedTensor, Tensor)):
        raise TypeError(f"{op}: '{key}' must be a QuantizedTensor or a tensor, got {type(first).__name__}")
    if isinstance(first, Tensor) and first.dtype == torch.bool:
        raise TypeError(f"{op}: '{key}' is a bool tensor, which cannot be averaged")


def _check_device(op: str, owner: str, q: QuantizedTensor, device: torch.device) -> None:
    """ValueError unless ``q``'s tensors are on the weights' device."""
    tensors = (q.data, q.scale, q.zero_point)
    if all(isinstance(t, Tensor) for t in tensors) and any(t.device != device for t in tensors):
        raise ValueError(
            f"{op}: {owner}: codes, scale and zero point must be on the weights' device {device}, "
            f"got {q.data.device}, {q.scale.device} and {q.zero_point.device}"
        )


METHODS = ("mean", "trimmed-mean", "median")
DEFAULT_TRIM = 0.1  # the fraction cut from each end (Flower's FedTrimmedAvg calls it beta)


def _resolve_method(op: str, method, trim, clients: int) -> int:
    """The op's trim count: -1 for the weighted mean, else the values cut from each end
    (floor(trim * K) for trimmed-mean, (K - 1) // 2 for median)."""
    if method not in METHODS:
        raise ValueError(f"{op}: method must be one of {', '.join(METHODS)}, got {method!r}")
    if not (is_real(trim) and 0 <= trim < 0.5):
        raise ValueError(f"{op}: trim must be a fraction in [0, 0.5) cut from each end, got {trim!r}")
    if method == "mean":
        return -1
    cut = (clients - 1) // 2 if method == "median" else int(trim * clients)
    if not 2 * cut < clients:
        raise ValueError(f"{op}: trim={trim} cuts {cut} of {clients} clients from each end, leaving none")
    return cut


def output_bits(op: str, bits, requantize: bool, method: str, widest: dict[str, int]) -> dict[str, int]:
    """The aggregate's width per quantized entry: ``bits`` (an int, or a map naming
    every quantized entry), or None: ``widest``, each entry's highest width among the
    clients. ``requantize=False`` (a float result, the mean only) takes no ``bits``."""
    if not isinstance(requantize, bool):
        raise TypeError(f"{op}: requantize must be a bool, got {requantize!r}")
    if not requantize:
        if method != "mean":
            raise ValueError(f"{op}: only the mean has a float result; {method} requantizes")
        if bits is not None:
            raise ValueError(f"{op}: bits={bits!r} has no meaning with requantize=False (a float result)")
        return {}
    return dict(widest) if bits is None else bit_map(op, bits, list(widest), "quantized entry")


def _aggregate_quantized(
    keys: list[str], columns: list[list[QuantizedTensor]], weights: Tensor, cut: int, bits: int
) -> list:
    """One fused aggregate call over several tensors sharing a scheme, requantized at
    ``bits``; each client's tensor enters at its own width."""
    first = [column[0] for column in columns]
    axes = [-1 if q.axis is None else q.axis for q in first]
    clients = len(columns[0])
    entries = [columns[t][k] for k in range(clients) for t in range(len(keys))]  # client-major
    quant_min, quant_max = quant_range(bits)
    codes, scales, zero_points = ops.aggregate(
        [q.data for q in entries],
        [q.scale for q in entries],
        [q.zero_point for q in entries],
        weights,
        axes,
        [q.bits for q in entries],
        quant_min,
        quant_max,
        first[0].symmetric,
        keys,
        cut,
    )
    out, element, segment = [], 0, 0
    for q in first:
        channels = 1 if q.axis is None else q.shape[q.axis]
        params_shape = () if q.axis is None else (channels,)
        out.append(
            QuantizedTensor(
                data=codes[element : element + q.data.numel()].view(q.shape),
                scale=scales[segment : segment + channels].view(params_shape),
                zero_point=zero_points[segment : segment + channels].view(params_shape),
                bits=bits,
                axis=q.axis,
                symmetric=q.symmetric,
                dtype=q.dtype,
                shape=q.shape,
            )
        )
        element += q.data.numel()
        segment += channels
    return out


def _aggregate_plain(column: list[Tensor], fractions: Tensor, cut: int) -> Tensor:
    """Unquantized entries with the same method: the weighted mean as PlainMean computes
    it; the robust ones with floats (e.g. BatchNorm statistics) in float32 and integers
    (e.g. num_batches_tracked) exactly (docs/kernels.md)."""
    first = column[0]
    if cut < 0:
        mean = PlainMean(first, fractions.device)
        for value, fraction in zip(column, fractions.tolist()):
            mean.add(value, fraction)
        return mean.result()
    if first.is_floating_point():
        stacked = torch.stack([t.to(device=fractions.device, dtype=torch.float32) for t in column])
        average = reference._trimmed_mean(list(stacked.unbind(0)), cut)
        return average.to(device=first.device, dtype=first.dtype)
    stacked = torch.stack([t.to(device=fractions.device) for t in column])
    kept = torch.sort(stacked, dim=0).values[cut : len(column) - cut]
    if kept.shape[0] == 1:
        out = kept[0]
    else:  # exactly: Python ints, rounded half to even (integer buffers are small)
        rows = kept.reshape(kept.shape[0], -1).tolist()
        exact = [round(Fraction(sum(col), len(rows))) for col in zip(*rows)]
        out = torch.tensor(exact, dtype=torch.int64).to(first.dtype).reshape(first.shape)
    return out.to(device=first.device)


def _float_mean(keys: list[str], columns: dict, fractions: Tensor) -> dict[str, Tensor]:
    """The quantized entries' weighted mean as floats: the running mean of successive
    ``accumulate`` calls (Aggregator's, bit for bit), cast to each entry's dtype."""
    firsts = [columns[key][0] for key in keys]
    sizes = [q.data.numel() for q in firsts]
    acc = torch.zeros(sum(sizes), dtype=torch.float32, device=fractions.device)
    axes = [-1 if q.axis is None else q.axis for q in firsts]
    for k, fraction in enumerate(fractions.tolist() if keys else []):
        qs = [columns[key][k] for key in keys]
        ops.accumulate(
            acc, [q.data for q in qs], [q.scale for q in qs], [q.zero_point for q in qs], axes, fraction, keys
        )
    values = [part.view(q.shape) for part, q in zip(acc.split(sizes), firsts)]
    if not bool(torch.isfinite(acc).all()):
        key = next(key for key, v in zip(keys, values) if not bool(torch.isfinite(v).all()))
        raise ValueError(
            f"aggregate_state_dicts: the weighted average of '{key}' is not finite "
            "(client scales too large for float32)"
        )
    return {key: v.to(q.dtype) for key, v, q in zip(keys, values, firsts)}


def aggregate_state_dicts(
    state_dicts: Sequence[Mapping],
    weights,
    *,
    bits: int | Mapping[str, int] | None = None,
    method: str = "mean",
    trim: float = DEFAULT_TRIM,
    requantize: bool = True,
) -> dict:
    """The server step over whole models: dequantize every client's state dict,
    combine coordinate-wise with ``method`` ("mean": weighted by ``weights``, e.g.
    sample counts; "trimmed-mean" cutting ``trim`` of the clients from each end, or
    "median": unweighted), requantize with fresh ranges. All quantized tensors sharing
    output bits and scheme go through one fused call; unquantized entries get the same
    method (docs/kernels.md, "Robust aggregation"). Clients must agree on names,
    shapes, dtypes, axes and schemes; each may send a tensor at its own bit width
    (docs/kernels.md, "Mixed bit widths"). ``bits``: the result's width, an int or a
    map naming every quantized entry; None: per entry, the highest width among the
    clients. ``requantize=False`` (the mean only): the quantized entries as the float32
    mean itself, cast to each entry's dtype."""
    op = "aggregate_state_dicts"
    state_dicts = list(state_dicts)
    if not state_dicts:
        raise ValueError(f"{op}: no client state dicts to aggregate")
    for k, sd in enumerate(state_dicts):
        if not isinstance(sd, Mapping):
            raise TypeError(f"{op}: client {k}'s update must be a mapping, got {type(sd).__name__}")
    keys = list(state_dicts[0].keys())
    for k, sd in enumerate(state_dicts[1:], start=1):
        if set(sd.keys()) != set(keys):
            missing = sorted(set(keys) - set(sd.keys()))
            extra = sorted(set(sd.keys()) - set(keys))
            raise ValueError(f"{op}: client {k}'s names differ from client 0's: missing {missing}, unexpected {extra}")
    columns = {key: [sd[key] for sd in state_dicts] for key in keys}
    for key, column in columns.items():
        _check_same_kind(op, key, column)
    first = columns[keys[0]][0] if keys else None
    device = first.data.device if isinstance(first, QuantizedTensor) else getattr(first, "device", torch.device("cpu"))
    w = running_fractions(op, weights, len(state_dicts), device)
    quantized = [key for key, column in columns.items() if isinstance(column[0], QuantizedTensor)]
    updates = [(q, f"client {k}'s '{key}'") for key in quantized for k, q in enumerate(columns[key])]
    for q, owner in updates:
        _check_device(op, owner, q, w.device)
    validate_all([q for q, _ in updates], op, [owner for _, owner in updates])
    cut = _resolve_method(op, method, trim, len(state_dicts))
    widths = output_bits(op, bits, requantize, method, {key: max(q.bits for q in columns[key]) for key in quantized})

    result: dict = {}
    if requantize:
        groups: dict[tuple[int, bool], list[str]] = {}
        for key in quantized:
            groups.setdefault((widths[key], columns[key][0].symmetric), []).append(key)
        for (group_bits, _), group in groups.items():
            result.update(zip(group, _aggregate_quantized(group, [columns[key] for key in group], w, cut, group_bits)))
    else:
        result.update(_float_mean(quantized, columns, w))
    for key, column in columns.items():
        if not isinstance(column[0], QuantizedTensor):
            result[key] = _aggregate_plain(column, w, cut)
    return {key: result[key] for key in keys}


def aggregate(
    updates: Sequence[QuantizedTensor],
    weights,
    *,
    bits: int | None = None,
    method: str = "mean",
    trim: float = DEFAULT_TRIM,
    requantize: bool = True,
) -> QuantizedTensor | Tensor:
    """The server step for one tensor: aggregate_state_dicts on a one-entry model."""
    updates = list(updates)
    if not updates:
        raise ValueError("aggregate: no updates to aggregate")
    if isinstance(bits, Mapping):
        raise TypeError("aggregate: bits must be an int or None for one tensor, got a mapping")
    for k, q in enumerate(updates):
        if not isinstance(q, QuantizedTensor):
            raise TypeError(f"aggregate: update {k} must be a QuantizedTensor, got {type(q).__name__}")
    return aggregate_state_dicts(
        [{"tensor": q} for q in updates], weights, bits=bits, method=method, trim=trim, requantize=requantize
    )["tensor"]
