"""Quantized state dicts as Flower records, and back.

A state dict (``fedhq_kernels.QuantizedTensor`` for parameters, plain tensors for
buffers, or all plain tensors for fp32) travels as two records:

- an ``ArrayRecord``: every entry's tensor under its own name (for a quantized entry
  its codes packed to ``bits`` bits each, ``fedhq_kernels.pack_codes``: 1-D uint8),
  plus ``<name>:scale`` (float32) and ``<name>:zero_point`` (int32) for each
  quantized entry;
- a ``ConfigRecord`` "layout" naming the quantized entries, with parallel lists of
  their bits, axis (-1 per tensor), symmetric flag, original float dtype and shape
  ("64x3x3x3"; "" for a 0-d tensor); empty when nothing is quantized (fp32), as Flower
  1.41's ``ConfigRecord.count_bytes`` fails on empty lists.

``decode_state`` is strict about structure (keys, array dtypes and shapes, list
types): a malformed record raises ``RecordError`` with the reason, which the strategy
logs when it leaves the reply out. What the values mean (names and shapes against the
global model, bits, code range, finite positive scales) is checked afterwards by the
same ``fedhq.fl.server.validate_update`` as the embedded engine.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

import fedhq_kernels as fk
from fedhq_kernels.checks import FLOAT_DTYPE_NAMES as FLOAT_DTYPES

SCALE = ":scale"
ZERO_POINT = ":zero_point"
LAYOUT_LISTS = {"quantized": str, "bits": int, "axis": int, "symmetric": bool, "dtype": str, "shape": str}


class RecordError(ValueError):
    """A record that does not hold a state dict; the message says why."""


def encode_state(state: Mapping[str, object]) -> tuple[ArrayRecord, ConfigRecord]:
    """(arrays, layout) of a state dict of QuantizedTensors and tensors."""
    arrays = ArrayRecord()
    layout: dict[str, list] = {key: [] for key in LAYOUT_LISTS}
    for name, value in state.items():
        if isinstance(value, fk.QuantizedTensor):
            arrays[name] = Array(fk.pack_codes(value.data, value.bits).cpu().numpy())
            arrays[name + SCALE] = Array(value.scale.cpu().numpy())
            arrays[name + ZERO_POINT] = Array(value.zero_point.cpu().numpy())
            layout["quantized"].append(name)
            layout["bits"].append(int(value.bits))
            layout["axis"].append(-1 if value.axis is None else int(value.axis))
            layout["symmetric"].append(bool(value.symmetric))
            layout["dtype"].append(str(value.dtype).removeprefix("torch."))
            layout["shape"].append("x".join(str(d) for d in value.shape))
        elif isinstance(value, torch.Tensor):
            arrays[name] = Array(value.detach().cpu().numpy())
        else:
            raise TypeError(f"encode_state: '{name}' is a {type(value).__name__}, not a tensor")
    return arrays, ConfigRecord(layout if layout["quantized"] else {})


def decode_state(arrays: object, layout: object) -> dict:
    """The state dict held by (arrays, layout); ``RecordError`` if they are malformed."""
    if not isinstance(arrays, ArrayRecord):
        raise RecordError(f"expected an ArrayRecord of the model, got {type(arrays).__name__}")
    lists = _layout_lists(layout)
    quantized = dict(zip(lists["quantized"], zip(*(lists[k] for k in ("bits", "axis", "symmetric", "dtype", "shape")))))
    if len(quantized) != len(lists["quantized"]):
        raise RecordError("layout names a quantized entry twice")
    companions = {name + suffix for name in quantized for suffix in (SCALE, ZERO_POINT)}
    missing = sorted((set(quantized) | companions) - set(arrays.keys()))
    if missing:
        raise RecordError(f"arrays missing for {missing[:5]}")
    state: dict = {}
    for name in arrays.keys():
        if name in companions:
            continue
        if name.endswith((SCALE, ZERO_POINT)):
            raise RecordError(f"'{name}' has no quantized entry in the layout")
        codes = _array(arrays, name)
        if name not in quantized:
            state[name] = codes
            continue
        bits, axis, symmetric, dtype, shape = quantized[name]
        if dtype not in FLOAT_DTYPES:
            raise RecordError(f"'{name}': unknown float dtype {dtype!r}")
        try:
            shape = _shape(shape)
            data = fk.unpack_codes(codes, bits, shape)
            state[name] = fk.QuantizedTensor(
                data=data,
                scale=_array(arrays, name + SCALE),
                zero_point=_array(arrays, name + ZERO_POINT),
                bits=bits,
                axis=None if axis == -1 else axis,
                symmetric=symmetric,
                dtype=FLOAT_DTYPES[dtype],
                shape=data.shape,
            )
        except (TypeError, ValueError) as error:
            raise RecordError(f"'{name}': {error}") from None
    return state


def _layout_lists(layout: object) -> dict[str, list]:
    if not isinstance(layout, ConfigRecord):
        raise RecordError(f"expected a ConfigRecord layout, got {type(layout).__name__}")
    if not any(key in layout for key in LAYOUT_LISTS):
        return {key: [] for key in LAYOUT_LISTS}
    lists = {}
    for key, kind in LAYOUT_LISTS.items():
        value = layout.get(key)
        if not isinstance(value, list) or not value or not all(type(v) is kind for v in value):
            raise RecordError(f"layout '{key}' must be a non-empty list of {kind.__name__}, got {value!r}")
        lists[key] = value
    lengths = {len(v) for v in lists.values()}
    if len(lengths) != 1:
        raise RecordError(f"layout lists differ in length: { {k: len(v) for k, v in lists.items()} }")
    return lists


def _shape(text: str) -> torch.Size:
    """ "64x3x3x3" -> torch.Size([64, 3, 3, 3]); "" -> torch.Size([])."""
    try:
        dims = [int(t) for t in text.split("x")] if text else []
    except ValueError:
        raise ValueError(f"shape {text!r} is not dimensions joined by 'x'") from None
    if any(d < 0 for d in dims):
        raise ValueError(f"shape {text!r} has a negative dimension")
    return torch.Size(dims)


def _array(arrays: ArrayRecord, name: str) -> torch.Tensor:
    """The tensor under ``name``, checked against what the Array declares."""
    array = arrays[name]
    try:
        value = array.numpy()
        tensor = torch.from_numpy(value)
    except (TypeError, ValueError, OSError) as error:
        raise RecordError(f"'{name}' is not a readable array: {error}") from None
    if str(value.dtype) != array.dtype or tuple(value.shape) != tuple(array.shape):
        raise RecordError(
            f"'{name}' declares {array.dtype} {tuple(array.shape)} but holds {value.dtype} {tuple(value.shape)}"
        )
    return tensor
