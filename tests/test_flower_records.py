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
from fedhq.flower.records import RecordError, decode_state, encode_state  # noqa: E402
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
    assert arrays["conv.weight:scale"].shape == (6,)
    # codes travel packed: 162 8-bit codes in 162 bytes, 6 4-bit codes in 3, 35 6-bit codes in 27
    assert [(arrays[n].dtype, arrays[n].shape) for n in ("conv.weight", "conv.bias", "fc.weight")] == [
        ("uint8", (162,)),
        ("uint8", (3,)),
        ("uint8", (27,)),
    ]


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

    float_codes = Array(np.zeros((6, 3, 3, 3), dtype=np.float32))
    lying = Array(dtype="uint8", shape=(162,), stype="numpy.ndarray", data=Array(np.zeros(162, np.float32)).data)
    short = Array(np.zeros(2, dtype=np.uint8))  # conv.bias: 6 4-bit codes take 3 bytes
    padded = Array(np.array([0, 0, 0xF0], dtype=np.uint8))  # 5 codes in 3 bytes: the last nibble is padding
    shapes = list(layout["shape"])
    garbage = Array(dtype="int8", shape=(2,), stype="numpy.ndarray", data=b"not an npy file")
    return [
        ("codes missing", without("conv.weight"), layout, "missing"),
        ("scale missing", without("fc.weight:scale"), layout, "missing"),
        ("orphan scale", replaced("other:scale", arrays["conv.bias:scale"]), layout, "no quantized entry"),
        ("float codes", replaced("conv.weight", float_codes), layout, "uint8"),
        ("unpacked int8 codes", replaced("conv.weight", Array(state["conv.weight"].data.numpy())), layout, "uint8"),
        ("packed codes too short", replaced("conv.bias", short), layout, "take 3 bytes, got 2"),
        ("padding bits set", replaced("conv.bias", padded), layout_with(shape=[shapes[0], "5", shapes[2]]), "padding"),
        ("shape not dimensions", arrays, layout_with(shape=[shapes[0], "6x?", shapes[2]]), "not dimensions"),
        ("negative dimension", arrays, layout_with(shape=["-6x27", shapes[1], shapes[2]]), "negative"),
        ("shape of another size", arrays, layout_with(shape=["6x3x3x4", shapes[1], shapes[2]]), "take 216 bytes"),
        ("float64 scale", replaced("conv.bias:scale", Array(np.full((), 0.1))), layout, "scale"),
        ("scale of the wrong shape", replaced("conv.weight:scale", arrays["conv.bias:scale"]), layout, "scale"),
        ("declared dtype is not the content's", replaced("conv.weight", lying), layout, "declares"),
        ("unreadable bytes", replaced("conv.weight", garbage), layout, "not a readable array"),
        ("bits of the wrong type", arrays, layout_with(bits=["8", "4", "6"]), "bits"),
        ("lists of different lengths", arrays, layout_with(axis=[0, -1]), "differ in length"),
        ("a layout list missing", arrays, ConfigRecord({k: v for k, v in layout.items() if k != "dtype"}), "dtype"),
        ("unknown float dtype", arrays, layout_with(dtype=["float32", "int3", "float32"]), "unknown float dtype"),
        ("axis out of range", arrays, layout_with(axis=[4, -1, 0]), "axis"),
        ("name twice", arrays, layout_with(quantized=["conv.weight", "conv.weight", "fc.weight"]), "twice"),
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
    arrays["conv.weight:scale"] = Array(np.full((6,), np.nan, dtype=np.float32))
    decoded = decode_state(arrays, layout)["conv.weight"]
    with pytest.raises(ValueError, match="finite"):
        decoded.check_codes()
