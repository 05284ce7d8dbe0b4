"""aggregate / aggregate_state_dicts: the fused server step against the plain-torch
reference (bit for bit) and a float64 oracle (within one code), and every way a
client update can be bad."""

import math

import pytest
import torch
from conftest import assert_equal
from test_quantize import TAMPERED, fields_of, tampered

import fedhq_kernels as fk
from fedhq_kernels import reference
from fedhq_kernels.functional import running_fractions
from fedhq_kernels.quantized_tensor import quant_range

# name -> (shape, quantization axis): per-tensor and per-channel, channel-cycling
# (last axis), rows longer than a run, odd sizes, a 0-d and an empty tensor
MODEL = {
    "conv.weight": ((16, 3, 3, 3), 0),
    "bn.weight": ((16,), None),
    "fc.weight": ((10, 4500), 0),
    "emb.weight": ((7, 4200), 1),
    "big.weight": ((70001,), None),
    "scalar": ((), None),
    "empty": ((0, 5), None),
}


def client_state_dicts(gen, clients, dtype=torch.float32, bits=8, symmetric=True):
    sds = []
    for _ in range(clients):
        sd = {}
        for name, (shape, axis) in MODEL.items():
            x = (torch.randn(shape, generator=gen) * (1 + torch.rand((), generator=gen))).to(dtype)
            sd[name] = fk.quantize(x, bits=bits, symmetric=symmetric, axis=axis)
        sds.append(sd)
    return sds


def reference_state_dict(sds, weights, bits=None):
    """The reference twin, tensor by tensor, with the same running fractions, each
    client's tensor at its own width, the result at ``bits`` (None: the widest)."""
    w = running_fractions("test", weights, len(weights), torch.device("cpu"))
    out = {}
    for name in sds[0]:
        qs = [sd[name] for sd in sds]
        axis = -1 if qs[0].axis is None else qs[0].axis
        qmin, qmax = quant_range(max(q.bits for q in qs) if bits is None else bits)
        codes, scale, zero_point = reference.aggregate(
            [q.data for q in qs],
            [q.scale for q in qs],
            [q.zero_point for q in qs],
            w,
            [axis],
            [q.bits for q in qs],
            qmin,
            qmax,
            qs[0].symmetric,
            [name],
        )
        out[name] = (codes.view(qs[0].shape), scale.view(qs[0].scale.shape), zero_point.view(qs[0].scale.shape))
    return out


@pytest.mark.parametrize("clients", [1, 3, 10])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_matches_reference_bit_for_bit(backend, gen, clients, dtype, symmetric):
    sds = client_state_dicts(gen, clients, dtype, symmetric=symmetric)
    weights = torch.randint(1, 500, (clients,), generator=gen).tolist()
    got = fk.aggregate_state_dicts(sds, weights)
    expected = reference_state_dict(sds, weights)
    assert list(got) == list(MODEL)
    for name, q in got.items():
        first = sds[0][name]
        assert (q.shape, q.dtype, q.bits, q.axis, q.symmetric) == (
            first.shape,
            first.dtype,
            first.bits,
            first.axis,
            first.symmetric,
        )
        for actual, wanted, what in zip((q.data, q.scale, q.zero_point), expected[name], ("codes", "scale", "zp")):
            assert_equal(actual, wanted, f"{name} {what}")


def test_close_to_float64_average(backend, gen):
    """Independent of the float32 summation order: the aggregate dequantizes to within
    half a code of the exact weighted average, plus the float32 rounding of the
    average itself (a few ulps of sum(w_i |x_i|): products, sums and the final scaling)."""
    sds = client_state_dicts(gen, 5)
    weights = [3, 1, 4, 1, 5]
    got = fk.aggregate_state_dicts(sds, weights)
    eps32 = torch.finfo(torch.float32).eps
    for name, q in got.items():
        clients = [fk.dequantize(sd[name]).double() for sd in sds]
        exact = sum(w * x for w, x in zip(weights, clients)) / sum(weights)
        magnitude = sum(w * x.abs() for w, x in zip(weights, clients)) / sum(weights)
        step = (
            q.scale.double()
            if q.axis is None
            else q.scale.double().reshape([-1 if d == q.axis else 1 for d in range(len(q.shape))])
        )
        error = (fk.dequantize(q).double() - exact).abs()
        bound = 0.5 * step + 16 * eps32 * (magnitude + step)
        assert bool((error <= bound).all()), f"{name}: worst excess {float((error - bound).max()):.3g}"


def test_single_tensor_aggregate(backend, gen):
    updates = [fk.quantize(torch.randn(33, 65, generator=gen), axis=1, symmetric=False) for _ in range(4)]
    q = fk.aggregate(updates, [1, 2, 3, 4])
    expected = fk.aggregate_state_dicts([{"t": u} for u in updates], [1, 2, 3, 4])["t"]
    assert_equal(q.data, expected.data)
    assert_equal(q.scale, expected.scale)


def test_zero_weight_client_is_ignored(backend, gen):
    sds = client_state_dicts(gen, 3)
    with_ignored = fk.aggregate_state_dicts(sds, [2, 0, 5])
    without = fk.aggregate_state_dicts([sds[0], sds[2]], [2, 5])
    for name in MODEL:
        assert_equal(with_ignored[name].data, without[name].data, name)


def test_weights_as_tensor_and_normalization(backend, gen):
    sds = client_state_dicts(gen, 2)
    a = fk.aggregate_state_dicts(sds, torch.tensor([10, 30]))
    b = fk.aggregate_state_dicts(sds, [0.25, 0.75])
    for name in MODEL:
        assert_equal(a[name].data, b[name].data, name)


def test_inputs_are_not_modified(backend, gen):
    sds = client_state_dicts(gen, 3)
    before = [{k: (q.data.clone(), q.scale.clone(), q.zero_point.clone()) for k, q in sd.items()} for sd in sds]
    fk.aggregate_state_dicts(sds, [1, 1, 1])
    for sd, saved in zip(sds, before):
        for k, (data, scale, zero_point) in saved.items():
            assert torch.equal(sd[k].data, data) and torch.equal(sd[k].scale, scale)
            assert torch.equal(sd[k].zero_point, zero_point)


def test_unquantized_entries_are_averaged(backend, gen):
    sds = client_state_dicts(gen, 2)
    sds[0]["bn.running_mean"], sds[1]["bn.running_mean"] = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    sds[0]["bn.num_batches_tracked"], sds[1]["bn.num_batches_tracked"] = torch.tensor(10), torch.tensor(21)
    sds[0]["half"], sds[1]["half"] = torch.tensor([1.0], dtype=torch.half), torch.tensor([2.0], dtype=torch.half)
    out = fk.aggregate_state_dicts(sds, [1, 3])
    assert torch.equal(out["bn.running_mean"], torch.tensor([2.5, 5.0]))
    assert out["bn.num_batches_tracked"].dtype == torch.int64 and int(out["bn.num_batches_tracked"]) == 18
    assert out["half"].dtype == torch.half and float(out["half"]) == 1.75


def test_mixed_bit_widths_in_one_model(backend, gen):
    sds = client_state_dicts(gen, 3)
    for sd in sds:
        sd["low"] = fk.quantize(torch.randn(300, generator=gen), bits=4)
    out = fk.aggregate_state_dicts(sds, [1, 1, 1])
    assert out["low"].bits == 4 and int(out["low"].data.max()) <= 7 and int(out["low"].data.min()) >= -8
    assert out["conv.weight"].bits == 8


# ---- bad updates: rejected with a message naming the client and the tensor ----


def test_rejects_mismatched_names(backend, gen):
    sds = client_state_dicts(gen, 3)
    del sds[2]["bn.weight"]
    sds[2]["extra"] = sds[0]["scalar"]
    with pytest.raises(
        ValueError,
        match=r"client 2's names differ from client 0's: missing \['bn.weight'\], "
        r"unexpected \['extra'\]",
    ):
        fk.aggregate_state_dicts(sds, [1, 1, 1])


@pytest.mark.parametrize(
    "field,value", [("shape", (16, 27)), ("axis", None), ("symmetric", False), ("dtype", torch.float16)]
)
def test_rejects_mismatched_metadata(backend, gen, field, value):
    sds = client_state_dicts(gen, 2)
    q = sds[1]["conv.weight"]
    x = fk.dequantize(q).to(value if field == "dtype" else q.dtype)
    kwargs = dict(bits=q.bits, symmetric=q.symmetric, axis=q.axis)
    if field == "shape":
        x = x.reshape(value)
    elif field in kwargs:
        kwargs[field] = value
    sds[1]["conv.weight"] = fk.quantize(x, **kwargs)
    with pytest.raises(ValueError, match=f"'conv.weight' of client 1 has {field}="):
        fk.aggregate_state_dicts(sds, [1, 1])


@pytest.mark.parametrize(
    "what,value,message",
    [
        ("scale", float("nan"), "client 1's 'bn.weight' scale must be finite and > 0, got nan"),
        ("scale", 0.0, "client 1's 'bn.weight' scale must be finite and > 0, got 0"),
        ("scale", -2.0, "got -2"),
        ("zero_point", 300, "client 1's 'bn.weight' zero_point must lie in \\[-128, 127\\], got 300"),
    ],
)
def test_rejects_bad_qparams(backend, gen, what, value, message):
    sds = client_state_dicts(gen, 3)
    q = sds[1]["bn.weight"]
    fields = fields_of(q)
    fields[what] = torch.tensor(value, dtype=fields[what].dtype)
    sds[1]["bn.weight"] = fk.QuantizedTensor(**fields)
    with pytest.raises(ValueError, match=message):
        fk.aggregate_state_dicts(sds, [1, 1, 1])


@pytest.mark.parametrize("what", ["data", "scale", "zero_point"])
def test_rejects_a_tensor_on_another_device(backend, gen, what):
    # GPU kernels would dereference another device's address: refused before any kernel
    sds = client_state_dicts(gen, 3)
    q = sds[2]["fc.weight"]
    fields = fields_of(q)
    fields[what] = fields[what].to("meta")
    sds[2]["fc.weight"] = fk.QuantizedTensor(**fields)
    with pytest.raises(
        ValueError,
        match="client 2's 'fc.weight': codes, scale and zero point must be on the "
        "weights' device cpu, got (meta|cpu), (meta|cpu) and (meta|cpu)",
    ):
        fk.aggregate_state_dicts(sds, [1, 1, 1])


def test_rejects_overflowing_average(backend, gen):
    sds = client_state_dicts(gen, 2)
    for sd in sds:
        q = sd["fc.weight"]
        huge = torch.full_like(q.scale, 3e38)
        sd["fc.weight"] = fk.QuantizedTensor(
            q.data.clone().fill_(127), huge, q.zero_point, 8, 0, True, torch.float32, q.shape
        )
    with pytest.raises(ValueError, match="aggregate: the weighted average of 'fc.weight' is not finite"):
        fk.aggregate_state_dicts(sds, [1, 1])


@pytest.mark.parametrize(
    "weights,error,message",
    [
        ([1, 2], ValueError, "got 2 weights for 3 clients"),
        ([1, -1, 1], ValueError, "weights must be finite and >= 0"),
        ([1, math.nan, 1], ValueError, "weights must be finite and >= 0"),
        ([0, 0, 0], ValueError, "weights sum to 0"),
        ("abc", TypeError, "weights must be a sequence of numbers"),
    ],
)
def test_rejects_bad_weights(backend, gen, weights, error, message):
    with pytest.raises(error, match=message):
        fk.aggregate_state_dicts(client_state_dicts(gen, 3), weights)


def test_rejects_wrong_entry_types(backend, gen):
    sds = client_state_dicts(gen, 2)
    sds[1]["bn.weight"] = fk.dequantize(sds[1]["bn.weight"])
    with pytest.raises(TypeError, match="'bn.weight' is quantized for client 0 but a Tensor for client 1"):
        fk.aggregate_state_dicts(sds, [1, 1])
    with pytest.raises(TypeError, match="client 1's update must be a mapping, got list"):
        fk.aggregate_state_dicts([{}, []], [1, 1])
    with pytest.raises(TypeError, match="'flag' is a bool tensor"):
        fk.aggregate_state_dicts([{"flag": torch.tensor(True)}] * 2, [1, 1])
    with pytest.raises(TypeError, match="'x' must be a QuantizedTensor or a tensor, got str"):
        fk.aggregate_state_dicts([{"x": "a"}] * 2, [1, 1])
    with pytest.raises(ValueError, match="no client state dicts"):
        fk.aggregate_state_dicts([], [])
    with pytest.raises(ValueError, match="aggregate: no updates"):
        fk.aggregate([], [])
    with pytest.raises(TypeError, match="aggregate: update 0 must be a QuantizedTensor, got Tensor"):
        fk.aggregate([torch.zeros(3)], [1])


def test_outputs_are_views_of_one_packed_buffer(backend, gen):
    out = fk.aggregate_state_dicts(client_state_dicts(gen, 2), [1, 1])
    storages = {q.data.untyped_storage().data_ptr() for q in out.values()}
    assert len(storages) == 1  # one launch wrote the whole model
    for q in out.values():
        assert q.data.is_contiguous()


@pytest.mark.parametrize("what", TAMPERED)
def test_rejects_altered_updates(backend, what):
    # validated before any kernel runs: a ValueError naming the client, never a RuntimeError
    with pytest.raises(ValueError, match="aggregate_state_dicts: client 0's 'tensor' .*" + TAMPERED[what]):
        fk.aggregate([tampered(what), tampered(what)], [1, 1])


def test_weights_whose_sum_overflows(backend, gen):
    # [1e308, 1e308] sum to inf in float64: still two equal weights, not an all-zero model
    sds = client_state_dicts(gen, 2)
    huge, ones = fk.aggregate_state_dicts(sds, [1e308, 1e308]), fk.aggregate_state_dicts(sds, [1, 1])
    for name in MODEL:
        for field in ("data", "scale", "zero_point"):
            assert_equal(getattr(huge[name], field), getattr(ones[name], field), f"{name} {field}")
