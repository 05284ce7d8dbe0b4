"""Quantized state dicts as Flower records (an ``ArrayRecord`` of plain tensors and three
arrays holding every quantized entry's packed codes, scales and zero points, plus a
"layout" ``ConfigRecord``), and back.
``decode_state`` checks a reply against the expected model before it allocates; any
malformed record is a ``RecordError``. Format and checks: docs/flower.md."""

from __future__ import annotations

import functools
import io
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

import fedhq_kernels as fk
from fedhq_kernels.checks import FLOAT_DTYPE_NAMES as FLOAT_DTYPES
from fedhq_kernels.checks import MAX_BITS, MIN_BITS, valid_bits
from fedhq_kernels.quantized_tensor import packed_size

CODES, SCALES, ZERO_POINTS = "fedhq.codes", "fedhq.scales", "fedhq.zero_points"  # every quantized entry's, packed
PACKED = (CODES, SCALES, ZERO_POINTS)
LAYOUT_LISTS = {"quantized": str, "bits": int, "axis": int, "symmetric": bool, "dtype": str, "shape": str}
SCHEME = ("bits", "axis", "symmetric", "dtype", "shape")
ORDER = "order"  # the layout's list of every entry's name, in the state dict's order
MAX_NUMEL = 2**48  # elements a quantized entry's shape may claim
NPY_HEADER_MAX = 4096  # bytes an array may hold beyond its data (numpy writes 128)


class RecordError(ValueError):
    """A record that does not hold a state dict; the message says why."""


def to_array(value: np.ndarray | torch.Tensor) -> Array:
    """``Array(value)`` byte for byte (the npy bytes ``np.save`` writes) for a C-order
    array (any other is written in C order), with one copy of the data instead of
    Flower's (save to a stream, read it back)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    value = np.asarray(value, order="C")  # (ascontiguousarray makes a 0-d array 1-d)
    header = _npy_header(_dtype_name(value.dtype), value.shape)
    if header is None or value.dtype.hasobject or not value.dtype.isnative:
        return Array(value)
    data = b"".join((header, memoryview(value.reshape(-1)).cast("B")))
    return Array(dtype=_dtype_name(value.dtype), shape=tuple(value.shape), stype="numpy.ndarray", data=data)


def encode_state(state: Mapping[str, object]) -> tuple[ArrayRecord, ConfigRecord]:
    """(arrays, layout) of a state dict of QuantizedTensors and tensors: every plain
    tensor under its name; the quantized entries' packed codes, scales and zero points
    each concatenated into one array (``PACKED``), in the layout's order."""
    arrays = ArrayRecord()
    layout: dict[str, list] = {key: [] for key in LAYOUT_LISTS}
    packed: tuple[list, list, list] = ([], [], [])
    for name, value in state.items():
        if name in PACKED:
            raise ValueError(f"encode_state: '{name}' is the name of the record's packed codes; rename the entry")
        if isinstance(value, fk.QuantizedTensor):
            for parts, part in zip(packed, (fk.pack_codes(value.data, value.bits), value.scale, value.zero_point)):
                parts.append(part.reshape(-1))
            layout["quantized"].append(name)
            for key, item in zip(SCHEME, scheme(value)):
                layout[key].append(item)
        elif isinstance(value, torch.Tensor):
            arrays[name] = to_array(value)
        else:
            raise TypeError(f"encode_state: '{name}' is a {type(value).__name__}, not a tensor")
    if not layout["quantized"]:
        return arrays, ConfigRecord({})
    for key, parts in zip(PACKED, packed):
        arrays[key] = to_array(torch.cat(parts))
    return arrays, ConfigRecord({**layout, ORDER: list(state)})


def scheme(value: fk.QuantizedTensor) -> tuple:
    """A quantized entry's layout: (bits, axis (-1 per tensor), symmetric, dtype, shape)."""
    axis = -1 if value.axis is None else int(value.axis)
    dtype = str(value.dtype).removeprefix("torch.")
    return int(value.bits), axis, bool(value.symmetric), dtype, "x".join(str(d) for d in value.shape)


@dataclass(frozen=True)
class Expected:
    """What ``decode_state`` checks a record against, derived once from a global state
    dict (``expect``) rather than for every reply: the quantized entries' layouts and
    every array's dtype name, shape and byte limit."""

    schemes: dict  # quantized name -> scheme()
    sizes: dict  # array name -> (dtype name, shape, most bytes it may hold)
    entries: tuple  # the quantized entries as a matching layout parses (_parse_entries)


def expect(expected: Mapping[str, object]) -> Expected:
    """The ``Expected`` of a global state dict."""
    schemes = {n: scheme(v) for n, v in expected.items() if isinstance(v, fk.QuantizedTensor)}
    sizes: dict[str, tuple[str, tuple]] = {}
    quantized = [v for v in expected.values() if isinstance(v, fk.QuantizedTensor)]
    if quantized:
        sizes[CODES] = ("uint8", (sum(packed_size(q.data.numel(), q.bits) for q in quantized),))
        channels = sum(q.scale.numel() for q in quantized)
        sizes[SCALES], sizes[ZERO_POINTS] = ("float32", (channels,)), ("int32", (channels,))
    for name, value in expected.items():
        if not isinstance(value, fk.QuantizedTensor):
            sizes[name] = (str(torch.empty(0, dtype=value.dtype).numpy().dtype), tuple(value.shape))
    limits = {
        name: (dtype, shape, math.prod(shape) * np.dtype(dtype).itemsize + NPY_HEADER_MAX)
        for name, (dtype, shape) in sizes.items()
    }
    return Expected(schemes, limits, _parse_entries(schemes))


def decode_state(
    arrays: object, layout: object, expected: Mapping[str, object] | Expected | None = None, *, copy: bool = True
) -> dict:
    """The state dict held by (arrays, layout); ``RecordError`` if they are malformed or,
    given ``expected`` (the global state dict, or its ``expect``), differ from it in
    names, layout or sizes. ``copy=False``: 8-bit codes, scales, zero points and plain
    tensors are read-only views of the record's bytes, for a server that only reads them."""
    if not isinstance(arrays, ArrayRecord):
        raise RecordError(f"expected an ArrayRecord of the model, got {type(arrays).__name__}")
    lists = _layout_lists(layout)
    quantized = dict(zip(lists["quantized"], zip(*(lists[k] for k in SCHEME))))
    if len(quantized) != len(lists["quantized"]):
        raise RecordError("layout names a quantized entry twice")
    if expected is not None:
        expected = expected if isinstance(expected, Expected) else expect(expected)
        _check_expected(arrays, quantized, expected)
    packed = PACKED if quantized else ()
    missing = sorted(set(packed) - set(arrays.keys()))
    if missing:
        raise RecordError(f"arrays missing for {missing}")
    if quantized.keys() & arrays.keys():
        raise RecordError(f"{sorted(quantized.keys() & arrays.keys())[:5]} are both quantized and plain arrays")
    state: dict = {}
    with warnings.catch_warnings():  # views of the record's bytes are read-only: torch warns it cannot mark them so
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for name in arrays.keys():
            if name in PACKED:
                if not quantized:
                    raise RecordError(f"'{name}' holds packed codes but the layout names no quantized entry")
                continue
            state[name] = _array(arrays, name, copy=copy)
        if not quantized:
            return state
        # the record's own order places the bytes; the global model's parsed entries serve when it is the same
        same = expected is not None and list(quantized) == list(expected.schemes)
        entries = expected.entries if same else _parse_entries(quantized)
        state.update(_unpack(entries, *(_array(arrays, key, copy=copy and key != CODES) for key in PACKED), copy))
    order = layout.get(ORDER)
    if not (isinstance(order, list) and len(order) == len(state) and set(order) == state.keys()):
        raise RecordError(f"layout '{ORDER}' must list each of the {len(state)} entries once")
    return {name: state[name] for name in order}


def _parse_entries(quantized: dict) -> tuple:
    """The layout's quantized entries as (name, bits, axis, symmetric, dtype, shape,
    channels, packed bytes); RecordError naming an entry that makes no sense."""
    entries = []
    for name, (bits, axis, symmetric, dtype, shape) in quantized.items():
        if not valid_bits(bits):
            raise RecordError(f"'{name}': bits must be an int in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
        if dtype not in FLOAT_DTYPES:
            raise RecordError(f"'{name}': unknown float dtype {dtype!r}")
        try:
            shape = _shape(shape)
        except ValueError as error:
            raise RecordError(f"'{name}': {error}") from None
        if not (axis == -1 or 0 <= axis < len(shape)):
            raise RecordError(f"'{name}': axis must be -1 (per tensor) or in [0, {len(shape)}), got {axis}")
        channels = 1 if axis == -1 else shape[axis]
        size = packed_size(math.prod(shape), bits)
        entries.append((name, bits, axis, symmetric, FLOAT_DTYPES[dtype], shape, channels, size))
    return tuple(entries)


def _unpack(entries: tuple, codes: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, copy: bool) -> dict:
    """The QuantizedTensors (``_parse_entries``) whose packed codes, scales and zero points
    lie one after another in the three arrays; the arrays' sizes are checked first."""
    for key, array, need, unit in (
        (CODES, codes, sum(e[7] for e in entries), "bytes"),
        (SCALES, scales, sum(e[6] for e in entries), "scales"),
        (ZERO_POINTS, zero_points, sum(e[6] for e in entries), "zero points"),
    ):
        wanted = {CODES: torch.uint8, SCALES: torch.float32, ZERO_POINTS: torch.int32}[key]
        if array.dtype != wanted or array.dim() != 1:
            raise RecordError(f"'{key}' must be 1-D {wanted}, got {array.dtype} {tuple(array.shape)}")
        if array.numel() != need:
            raise RecordError(f"'{key}' holds {array.numel()} {unit}, the layout's entries take {need}")
    state, byte, channel = {}, 0, 0
    for name, bits, axis, symmetric, dtype, shape, channels, size in entries:
        params = () if axis == -1 else (channels,)
        try:
            data = fk.unpack_codes(codes[byte : byte + size], bits, shape)
            if copy and bits == 8:  # a view of the record's bytes (below 8 bits unpacking copies)
                data = data.clone()
            state[name] = fk.QuantizedTensor(
                data=data,
                scale=scales[channel : channel + channels].view(params),
                zero_point=zero_points[channel : channel + channels].view(params),
                bits=bits,
                axis=None if axis == -1 else axis,
                symmetric=symmetric,
                dtype=dtype,
                shape=data.shape,
            )
        except (TypeError, ValueError) as error:
            raise RecordError(f"'{name}': {error}") from None
        byte, channel = byte + size, channel + channels
    return state


def _check_expected(arrays: ArrayRecord, quantized: dict, expected: Expected) -> None:
    """Names, layouts, declared array dtypes and shapes, and byte counts against the
    global model's, before any array is read."""
    wanted, sizes = expected.schemes, expected.sizes
    if quantized.keys() != wanted.keys():
        missing, extra = sorted(set(wanted) - set(quantized)), sorted(set(quantized) - set(wanted))
        raise RecordError(
            f"quantized entries differ from the global model's: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    for name, want in wanted.items():
        if quantized[name] != want:
            raise RecordError(
                f"'{name}': layout {quantized[name]} is not the global model's {want} ({', '.join(SCHEME)})"
            )
    names = arrays.keys()
    if len(names) != len(sizes) or not all(name in sizes for name in names):
        missing, extra = sorted(set(sizes) - set(names)), sorted(set(names) - set(sizes))
        raise RecordError(f"arrays differ from the global model's: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, (dtype, shape, limit) in sizes.items():
        array = arrays[name]
        if array.dtype != dtype or tuple(array.shape) != shape:
            raise RecordError(f"'{name}': expected {dtype} {shape}, the array declares {array.dtype} {array.shape}")
        if not isinstance(array.data, bytes) or len(array.data) > limit:
            raise RecordError(f"'{name}': holds more than the {limit} bytes a {dtype} {shape} array takes")


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
    if math.prod(dims) > MAX_NUMEL:  # torch's element count would wrap around
        raise ValueError(f"shape {text!r} has more than {MAX_NUMEL} elements")
    return torch.Size(dims)


@functools.lru_cache(maxsize=256)
def _dtype_name(dtype: np.dtype) -> str:
    return str(dtype)  # numpy derives the name anew on every call


@functools.lru_cache(maxsize=4096)
def _header_for(dtype: str, shape: tuple) -> bytes:
    stream = io.BytesIO()
    descr = np.lib.format.dtype_to_descr(np.dtype(dtype))
    np.lib.format.write_array_header_1_0(stream, {"descr": descr, "fortran_order": False, "shape": shape})
    return stream.getvalue()


def _npy_header(dtype: object, shape: object) -> bytes | None:
    """The npy header numpy writes for a C-order array of the declared dtype and shape
    (None if they are not a plain dtype name and a tuple of ints)."""
    if not isinstance(dtype, str) or not isinstance(shape, (tuple, list)) or not all(type(d) is int for d in shape):
        return None
    try:
        return _header_for(dtype, tuple(shape))
    except (TypeError, ValueError):
        return None


def _array(arrays: ArrayRecord, name: str, copy: bool = True) -> torch.Tensor:
    """The tensor under ``name``: its npy header is read and checked against what the
    Array declares and against the bytes that follow before anything is allocated
    (``Array.numpy`` would allocate what a forged header claims). ``copy=False``: a
    read-only view of the record's bytes, for a caller that only reads it."""
    array = arrays[name]
    data = array.data
    header = _npy_header(array.dtype, array.shape)
    if header is not None and isinstance(data, bytes) and data.startswith(header):
        # byte for byte what numpy writes for the declared dtype and shape: no need to parse
        shape, fortran_order, dtype, offset = tuple(array.shape), False, np.dtype(array.dtype), len(header)
    else:
        try:
            if not isinstance(data, bytes):
                raise TypeError(f"its data is a {type(data).__name__}, not bytes")
            stream = io.BytesIO(data)
            version = np.lib.format.read_magic(stream)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"npy format version {version} is not supported")
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, fortran_order, dtype = read_header(stream, max_header_size=NPY_HEADER_MAX)
        except (TypeError, ValueError, OSError, EOFError, SyntaxError) as error:
            raise RecordError(f"'{name}' is not a readable array: {error}") from None
        offset = stream.tell()
    if fortran_order or dtype.hasobject or not dtype.isnative or dtype.kind not in "biuf":
        raise RecordError(f"'{name}' holds an array of {dtype} (fortran order {fortran_order}), not plain numbers")
    if _dtype_name(dtype) != array.dtype or tuple(shape) != tuple(array.shape):
        raise RecordError(f"'{name}' declares {array.dtype} {tuple(array.shape)} but holds {dtype} {tuple(shape)}")
    count = math.prod(shape)
    if len(data) - offset != count * dtype.itemsize:
        raise RecordError(
            f"'{name}': a {dtype} array of shape {tuple(shape)} takes {count * dtype.itemsize} bytes, "
            f"it holds {len(data) - offset}"
        )
    value = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)
    try:
        return torch.from_numpy(value.copy() if copy else value)
    except TypeError:  # a number type torch has no tensor of (longdouble, ...)
        raise RecordError(f"'{name}' holds {dtype} numbers, which torch cannot hold") from None
