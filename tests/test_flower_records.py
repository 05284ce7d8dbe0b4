"""The records codec: a quantized state dict survives Flower's records exactly, INT8
records are about 4x smaller than float32 ones, and every malformed record is refused
with its reason (never a crash, never a half-decoded model)."""

import numpy as np
import pytest
import torch

pytest.importorskip("flwr", reason="the Flower adapter needs the flower extra: pip install 'fedhq[flower]'")

from flwr.app import Array, ArrayRecord, ConfigRecord  # noqa: E402

import fedhq_kernels as fk  # noqa: E402
from fedhq.fl.client import quantize_upload, quantized_names  # noqa: E402
from fedhq.flower.records import CODES, SCALES, ZERO_POINTS, RecordError, decode_state, encode_state, expect, to_array  # noqa: E402
from fedhq.models import ModelSpec  # noqa: E402


@pytest.fixture
def state(gen):
    """Per-channel and per-tensor codes of several bit widths, a float and an int buffer."""
    w = torch.randn(6, 3, 3, 3, generator=gen)
    return {
        "conv.weight": fk.quantize(w, bits=8, axis=0),
        "conv.bias": fk.quantize(torch.randn(6, generator=gen), bits=4),
        "fc.weight": fk.quantize(torch.randn(5, 7, generator=gen), bits=6, symmetric=False, axis=0),
        "bn.running_var": torch.rand(6, generator=gen) + 0.5,
        "bn.num_batches_tracked": torch.tensor(17),
    }


def assert_same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        x, y = a[name], b[name]
        if isinstance(x, fk.QuantizedTensor):
            assert isinstance(y, fk.QuantizedTensor), name
            for field in ("data", "scale", "zero_point"):
                assert torch.equal(getattr(x, field), getattr(y, field)), (name, field)
            assert (x.bits, x.axis, x.symmetric, x.dtype, tuple(x.shape)) == (
                y.bits,
                y.axis,
                y.symmetric,
                y.dtype,
                tuple(y.shape),
            ), name
        else:
            assert x.dtype == y.dtype and torch.equal(x, y), name


def test_round_trip_is_exact(state):
    arrays, layout = encode_state(state)
    assert_same(decode_state(arrays, layout), state)
    # codes travel packed, one entry after another: 162 8-bit codes in 162 bytes, 6 4-bit codes in 3,
    # 35 6-bit codes in 27; scales and zero points likewise (6 channels, 1 per tensor, 5 channels)
    assert list(arrays) == ["bn.running_var", "bn.num_batches_tracked", CODES, SCALES, ZERO_POINTS]
    assert [(arrays[n].dtype, arrays[n].shape) for n in (CODES, SCALES, ZERO_POINTS)] == [
        ("uint8", (162 + 3 + 27,)),
        ("float32", (12,)),
        ("int32", (12,)),
    ]
    reordered = {name: state[name] for name in ("bn.running_var", "fc.weight", "bn.num_batches_tracked", "conv.bias")}
    assert_same(decode_state(*encode_state(reordered)), reordered)  # the state dict's order, kept


def test_float_state_has_an_empty_layout():
    weights = {"w": torch.randn(3, 4), "n": torch.tensor(2)}
    arrays, layout = encode_state(weights)
    assert dict(layout) == {} and layout.count_bytes() == 0
    assert_same(decode_state(arrays, layout), weights)


def test_int8_records_are_about_four_times_smaller():
    model = ModelSpec.parse("small_cnn@8x8x1:10").build()
    int8 = encode_state(quantize_upload(model.state_dict(), quantized_names(model), 8))
    fp32 = encode_state(model.state_dict())
    ratio = sum(r.count_bytes() for r in fp32) / sum(r.count_bytes() for r in int8)
    # 53k parameters: per-channel scales and ~128-byte npy headers per array cost ~8%
    assert 3.5 < ratio < 4.0, ratio
    int4 = encode_state(quantize_upload(model.state_dict(), quantized_names(model), 4))
    halved = sum(r.count_bytes() for r in int8) / sum(r.count_bytes() for r in int4)
    assert 1.8 < halved < 2.0, halved  # 4-bit codes are packed two to a byte


def _breakages(state):
    """(what is wrong, arrays, layout, words the reason must contain)."""
    arrays, layout = encode_state(state)

    def without(key):
        a = ArrayRecord(dict(arrays))
        del a[key]
        return a

    def replaced(key, value):
        a = ArrayRecord(dict(arrays))
        a[key] = value
        return a

    def layout_with(**changes):
        return ConfigRecord({**layout, **changes})

    codes = np.frombuffer(arrays[CODES].data, dtype=np.uint8, offset=len(arrays[CODES].data) - 192)
    padded = codes.copy()
    padded[162 + 2] |= 0xF0  # conv.bias declared 5 4-bit codes: its third byte's high nibble is padding
    lying = Array(dtype="uint8", shape=(192,), stype="numpy.ndarray", data=Array(np.zeros(192, np.float32)).data)
    shapes = list(layout["shape"])
    garbage = Array(dtype="uint8", shape=(192,), stype="numpy.ndarray", data=b"not an npy file")
    return [
        ("codes missing", without(CODES), layout, "missing"),
        ("scales missing", without(SCALES), layout, "missing"),
        ("float codes", replaced(CODES, Array(np.zeros(192, dtype=np.float32))), layout, "uint8"),
        ("codes not 1-D", replaced(CODES, Array(codes.reshape(2, 96))), layout, "1-D"),
        ("packed codes too short", replaced(CODES, Array(codes[:-1])), layout, "holds 191 bytes"),
        ("padding bits set", replaced(CODES, Array(padded)), layout_with(shape=[shapes[0], "5", shapes[2]]), "padding"),
        ("shape not dimensions", arrays, layout_with(shape=[shapes[0], "6x?", shapes[2]]), "not dimensions"),
        ("negative dimension", arrays, layout_with(shape=["-6x27", shapes[1], shapes[2]]), "negative"),
        ("shape of another size", arrays, layout_with(shape=["6x3x3x4", shapes[1], shapes[2]]), "take 246"),
        ("float64 scales", replaced(SCALES, Array(np.full(12, 0.1))), layout, "scales"),
        ("scales for other channels", replaced(SCALES, Array(np.ones(11, np.float32))), layout, "11 scales"),
        ("zero points for other channels", replaced(ZERO_POINTS, Array(np.ones(13, np.int32))), layout, "13 zero"),
        ("declared dtype is not the content's", replaced(CODES, lying), layout, "declares"),
        ("unreadable bytes", replaced(CODES, garbage), layout, "not a readable array"),
        ("bits of the wrong type", arrays, layout_with(bits=["8", "4", "6"]), "bits"),
        ("bits out of range", arrays, layout_with(bits=[8, 9, 6]), "bits must be an int in [2, 8]"),
        ("bits zero", arrays, layout_with(bits=[0, 4, 6]), "bits must be an int in [2, 8]"),
        ("numbers torch cannot hold", replaced("bn.running_var", Array(np.ones(6, np.longdouble))), layout, "torch"),
        ("lists of different lengths", arrays, layout_with(axis=[0, -1]), "differ in length"),
        ("a layout list missing", arrays, ConfigRecord({k: v for k, v in layout.items() if k != "dtype"}), "dtype"),
        ("unknown float dtype", arrays, layout_with(dtype=["float32", "int3", "float32"]), "unknown float dtype"),
        ("axis out of range", arrays, layout_with(axis=[4, -1, 0]), "axis"),
        ("name twice", arrays, layout_with(quantized=["conv.weight", "conv.weight", "fc.weight"]), "twice"),
        ("quantized and plain", replaced("conv.bias", arrays["bn.running_var"]), layout, "both quantized and plain"),
        ("order missing", arrays, ConfigRecord({k: v for k, v in layout.items() if k != "order"}), "order"),
        ("order names one twice", arrays, layout_with(order=[*layout["order"][:-1], "conv.weight"]), "order"),
        ("not records", {"conv.weight": 1}, layout, "ArrayRecord"),
        ("layout not a ConfigRecord", arrays, {"bits": [8]}, "ConfigRecord"),
    ]


def test_malformed_records_are_refused_with_their_reason(state):
    for what, arrays, layout, words in _breakages(state):
        with pytest.raises(RecordError) as caught:
            decode_state(arrays, layout)
        assert words in str(caught.value), (what, str(caught.value))


def test_values_are_left_to_the_servers_validation(state):
    """A NaN scale or an out-of-range code is well-formed: decoding keeps it, and
    fedhq.fl.server.validate_update (run by the strategy next) refuses it."""
    arrays, layout = encode_state(state)
    arrays[SCALES] = Array(np.full((12,), np.nan, dtype=np.float32))
    decoded = decode_state(arrays, layout)["conv.weight"]
    with pytest.raises(ValueError, match="finite"):
        decoded.check_codes()


def _npy_header(descr: str, shape: tuple) -> bytes:
    """The npy header alone: what a forged reply sends without the data it claims."""
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _forgeries(state):
    """(what, arrays, layout) that used to end the server with a non-RecordError."""
    arrays, layout = encode_state(state)

    def replaced(key, array):
        a = ArrayRecord(dict(arrays))
        a[key] = array
        return a

    def forged(dtype, shape, data):
        return Array(dtype=dtype, shape=shape, stype="numpy.ndarray", data=data)

    huge = 10**12  # a ~100-byte reply claiming 931 GiB
    return [
        ("empty bytes (EOFError)", replaced(CODES, forged("uint8", (192,), b"")), layout),
        (
            "931 GiB header (MemoryError)",
            replaced(CODES, forged("uint8", (huge,), _npy_header("|u1", (huge,)))),
            layout,
        ),
        (
            "shape 2**64 (OverflowError)",
            replaced(CODES, forged("uint8", (2**64,), _npy_header("|u1", (2**64,)))),
            layout,
        ),
        (
            "shape 2**32 x 2**32, no codes (RuntimeError)",
            replaced(CODES, Array(np.zeros(0, np.uint8))),
            ConfigRecord({**layout, "shape": [layout["shape"][0], "4294967296x4294967296", layout["shape"][2]]}),
        ),
        ("header truncated", replaced(CODES, forged("uint8", (192,), _npy_header("|u1", (192,))[:20])), layout),
    ]


def test_forged_arrays_are_record_errors_without_allocating(state):
    """Issue 15: each of these raised EOFError, MemoryError, OverflowError or
    RuntimeError, which ended the whole Flower run."""
    for what, arrays, layout in _forgeries(state):
        for expected in (None, state):
            with pytest.raises(RecordError):
                decode_state(arrays, layout, expected)
            assert what


def test_the_expected_model_is_checked_before_any_array_is_read(state, monkeypatch):
    """Names, scheme (bits, axis, symmetric, dtype, shape) and sizes against the global
    model, before an array's bytes are parsed."""
    arrays, layout = encode_state(state)
    monkeypatch.setattr(Array, "numpy", lambda self: pytest.fail("an array was read"))
    per_tensor = dict(state, **{"conv.weight": fk.quantize(state["conv.weight"].dequantize(), bits=8)})
    flipped = not state["conv.bias"].symmetric
    asymmetric = dict(state, **{"conv.bias": fk.quantize(state["conv.bias"].dequantize(), bits=4, symmetric=flipped)})
    for other, words in ((per_tensor, "layout"), (asymmetric, "layout")):
        with pytest.raises(RecordError, match=words):
            decode_state(*encode_state(other), state)
    extra = ArrayRecord(dict(arrays))
    extra["more"] = Array(np.zeros(3, np.float32))
    with pytest.raises(RecordError, match="unexpected"):
        decode_state(extra, layout, state)
    bigger = ArrayRecord(dict(arrays))
    bigger["bn.running_var"] = Array(np.zeros(7, np.float32))
    with pytest.raises(RecordError, match=r"expected float32 \(6,\)"):
        decode_state(bigger, layout, state)
    padded = ArrayRecord(dict(arrays))
    blob = arrays["bn.running_var"]
    padded["bn.running_var"] = Array(
        dtype=blob.dtype, shape=blob.shape, stype=blob.stype, data=blob.data + bytes(10**5)
    )
    with pytest.raises(RecordError, match="holds more than"):
        decode_state(padded, layout, state)
    monkeypatch.undo()
    assert_same(decode_state(arrays, layout, state), state)


@pytest.mark.parametrize(
    "value",
    [
        np.array(1.5, dtype=np.float32),
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.arange(12, dtype=np.float64).reshape(3, 4).T,  # Fortran order: written as C order
        np.zeros((0, 3), dtype=np.int64),
        np.arange(5, dtype=np.uint8),
        np.array([True, False]),
    ],
)
def test_to_array_is_flowers_array_byte_for_byte(value):
    ours, flowers = to_array(value), Array(np.asarray(value, order="C"))
    assert (ours.dtype, ours.shape, ours.stype, ours.data) == (
        flowers.dtype,
        flowers.shape,
        flowers.stype,
        flowers.data,
    )
    assert np.array_equal(ours.numpy(), value)
    tensor = to_array(torch.from_numpy(np.asarray(value, order="C")))
    assert tensor.data == flowers.data


def test_without_a_copy_the_decoded_state_reads_the_records_bytes(state):
    arrays, layout = encode_state(state)
    viewed = decode_state(arrays, layout, copy=False)
    assert_same(viewed, state)
    record_bytes = np.frombuffer(arrays[CODES].data, dtype=np.uint8)
    start = record_bytes.ctypes.data + len(arrays[CODES].data) - 192
    assert viewed["conv.weight"].data.data_ptr() == start  # 8-bit codes: the record's own bytes
    assert decode_state(arrays, layout)["conv.weight"].data.data_ptr() != start


def test_decode_against_expect_is_decode_against_the_state(state):
    """The precomputed ``expect`` checks what the state dict does, and the decoded codes
    are the decoder's own memory, never a view of the record's bytes."""
    arrays, layout = encode_state(state)
    decoded = decode_state(arrays, layout, expect(state))
    assert_same(decoded, state)
    decoded["conv.weight"].data.add_(1)  # writable, and the record unchanged
    assert_same(decode_state(arrays, layout, state), state)
    # entries in another order than the global model's: the record's own layout places the bytes
    shuffled = {name: state[name] for name in ("fc.weight", "bn.running_var", "conv.bias", "conv.weight")}
    shuffled["bn.num_batches_tracked"] = state["bn.num_batches_tracked"]
    assert_same(decode_state(*encode_state(shuffled), expect(state)), shuffled)
    other = dict(state, **{"fc.weight": fk.quantize(torch.randn(5, 7), bits=5, symmetric=False, axis=0)})
    with pytest.raises(RecordError, match="fc.weight"):
        decode_state(*encode_state(other), expect(state))
