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
    """``bits``: one width for everything, or "mixed": each client draws each tensor's
    width from 2..8."""
    sds = []
    for _ in range(clients):
        sd = {}
        for name, (shape, axis) in MODEL.items():
            x = (torch.randn(shape, generator=gen) * (1 + torch.rand((), generator=gen))).to(dtype)
            width = int(torch.randint(2, 9, (), generator=gen)) if bits == "mixed" else bits
            sd[name] = fk.quantize(x, bits=width, symmetric=symmetric, axis=axis)
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


# ---- mixed bit widths: each client's tensor at its own width ----


def assert_matches(got, expected, bits):
    for name, q in got.items():
        assert q.bits == bits[name], name
        for actual, wanted, what in zip((q.data, q.scale, q.zero_point), expected[name], ("codes", "scale", "zp")):
            assert_equal(actual, wanted, f"{name} {what}")


@pytest.mark.parametrize("clients", [1, 3, 10])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_mixed_bits_match_reference_bit_for_bit(backend, gen, clients, dtype, symmetric):
    """Each client quantized each tensor at its own width; the result is requantized at
    the widest (default), at one width, or per tensor from a map."""
    sds = client_state_dicts(gen, clients, dtype, bits="mixed", symmetric=symmetric)
    weights = torch.randint(1, 500, (clients,), generator=gen).tolist()
    widest = {name: max(sd[name].bits for sd in sds) for name in MODEL}
    assert_matches(fk.aggregate_state_dicts(sds, weights), reference_state_dict(sds, weights), widest)
    narrow = int(torch.randint(2, 9, (), generator=gen))
    assert_matches(
        fk.aggregate_state_dicts(sds, weights, bits=narrow),
        reference_state_dict(sds, weights, bits=narrow),
        dict.fromkeys(MODEL, narrow),
    )
    chosen = {name: int(torch.randint(2, 9, (), generator=gen)) for name in MODEL}
    got = fk.aggregate_state_dicts(sds, weights, bits=chosen)
    for name, q in got.items():
        expected = reference_state_dict([{name: sd[name]} for sd in sds], weights, bits=chosen[name])
        assert_matches({name: q}, expected, chosen)


def test_mixed_bits_with_non_contiguous_codes(backend, gen):
    def client(bits):
        t = fk.quantize(torch.randn(17, 9, generator=gen), bits=bits, axis=0, symmetric=False)
        # the same codes seen through a transpose: a non-contiguous data tensor
        transposed = fk.QuantizedTensor(**fields_of(t, data=t.data.t().contiguous().t()))
        assert not transposed.data.is_contiguous()
        return {"t": transposed, "odd": fk.quantize(torch.randn(13, 3, generator=gen), bits=10 - bits, axis=1)}

    sds = [client(bits) for bits in (2, 8, 5, 3)]
    weights = [4, 1, 2.5, 3]
    contiguous = [
        {k: fk.QuantizedTensor(**fields_of(q, data=q.data.contiguous())) for k, q in sd.items()} for sd in sds
    ]
    assert_matches(
        fk.aggregate_state_dicts(sds, weights), reference_state_dict(contiguous, weights), {"t": 8, "odd": 8}
    )


def test_same_bits_are_the_single_width_path(backend, gen):
    """Every client at 4 bits: bits=None and bits=4 give the one-width result, and it
    keeps 4 bits (the widest of the clients, not 8)."""
    sds = client_state_dicts(gen, 3, bits=4)
    default, explicit = fk.aggregate_state_dicts(sds, [1, 2, 3]), fk.aggregate_state_dicts(sds, [1, 2, 3], bits=4)
    for name in MODEL:
        assert default[name].bits == 4
        for field in ("data", "scale", "zero_point"):
            assert_equal(getattr(default[name], field), getattr(explicit[name], field), f"{name} {field}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_float_result_is_the_running_mean(backend, gen, dtype):
    """requantize=False: each quantized entry as the reference's float32 running mean of
    the dequantized updates (any widths), cast to its dtype; plain entries as usual."""
    sds = client_state_dicts(gen, 4, dtype, bits="mixed")
    for k, sd in enumerate(sds):
        sd["count"] = torch.tensor(10 + k)
    weights = [3, 1, 0.5, 7]
    got = fk.aggregate_state_dicts(sds, weights, requantize=False)
    fractions = running_fractions("test", weights, 4, torch.device("cpu")).tolist()
    for name in MODEL:
        mean = torch.zeros(sds[0][name].shape)
        for sd, b in zip(sds, fractions):
            q = sd[name]
            values = reference._dequantize_float(q.data, q.scale, q.zero_point, -1 if q.axis is None else q.axis)
            mean = reference._blend(mean, values, torch.tensor(b))
        assert_equal(got[name], mean.to(dtype), name)
    assert int(got["count"]) == round((10 * 3 + 11 * 1 + 12 * 0.5 + 13 * 7) / 11.5)
    single = fk.aggregate([sd["fc.weight"] for sd in sds], weights, requantize=False)
    assert_equal(single, got["fc.weight"])


def test_a_mixed_bits_state_dict_quantizes_each_tensor_at_its_width(gen):
    sd = {name: torch.randn(shape, generator=gen) for name, (shape, _) in MODEL.items()}
    sd["count"] = torch.tensor(7)
    widths = {name: 2 + i % 7 for i, name in enumerate(MODEL)}
    q = fk.quantize_state_dict(sd, bits=widths, symmetric=False)
    for name, width in widths.items():
        axis = 0 if sd[name].dim() >= 2 else None
        expected = fk.quantize(sd[name], bits=width, symmetric=False, axis=axis)
        assert (q[name].bits, q[name].axis) == (width, axis)
        assert_equal(q[name].data, expected.data, name)
        assert_equal(q[name].scale, expected.scale, name)
    assert q["count"] is sd["count"]


BOTH = {"conv.weight": 8, "bn.weight": 4}  # the float entries of bad_bit_map's state dict


@pytest.mark.parametrize(
    "bits,message",
    [
        (
            {"bn.weight": 4},
            r"bits gives no width for 'conv.weight'; a bits map must name every floating-point entry of the state dict",
        ),
        ({**BOTH, "typo": 4}, r"bits names 'typo', which is not a floating-point entry of the state dict"),
        ({**BOTH, "count": 4}, r"bits names 'count', which is not a floating-point entry of the state dict"),
        ({**BOTH, "bn.weight": 9}, r"bits\['bn.weight'\] must be an int in \[2, 8\], got 9"),
        ({**BOTH, "bn.weight": 1}, r"bits\['bn.weight'\] must be an int in \[2, 8\], got 1"),
        ({**BOTH, "bn.weight": True}, r"bits\['bn.weight'\] must be an int in \[2, 8\], got True"),
        ({**BOTH, "bn.weight": "8"}, r"bits\['bn.weight'\] must be an int in \[2, 8\], got '8'"),
        (9, r"bits must be an int in \[2, 8\], got 9"),
        (None, r"bits must be an int in \[2, 8\], got None"),
    ],
)
def test_quantize_state_dict_rejects_bad_bit_maps(bits, message):
    sd = {"conv.weight": torch.randn(4, 3), "bn.weight": torch.randn(4), "count": torch.tensor(3)}
    with pytest.raises(ValueError, match=f"^quantize_state_dict: {message}[^\n]*$"):
        fk.quantize_state_dict(sd, bits=bits)


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


# ---- mixed bit widths: bad input ----


@pytest.mark.parametrize(
    "what,message",
    [
        ("zero_point", r"client 1's 'bn.weight' zero_point must lie in \[-8, 7\], got 10"),
        ("data", r"client 1's 'bn.weight' data holds codes outside the 4-bit range \[-8, 7\]"),
    ],
)
def test_rejects_values_outside_a_clients_own_width(backend, gen, what, message):
    """A 4-bit client's zero point or code inside int8's range but outside its own range
    is refused, though the other clients send the tensor at 8 bits."""
    sds = client_state_dicts(gen, 3, symmetric=False)
    q = fk.quantize(fk.dequantize(sds[1]["bn.weight"]), bits=4, symmetric=False)
    bad = {"zero_point": torch.tensor(10, dtype=torch.int32), "data": q.data.clone().fill_(9)}[what]
    sds[1]["bn.weight"] = fk.QuantizedTensor(**fields_of(q, **{what: bad}))
    with pytest.raises(ValueError, match=f"^aggregate_state_dicts: {message}$"):
        fk.aggregate_state_dicts(sds, [1, 1, 1])


def test_every_backend_checks_each_entry_against_its_own_width(gen):
    """The op itself (a caller may skip aggregate_state_dicts's validation): client 1's
    4-bit zero point 9 is refused though the output range is 8-bit; bad widths too."""
    from fedhq_kernels import dispatch

    q8, q4 = (fk.quantize(torch.randn(6, 5, generator=gen), bits=b, axis=0, symmetric=False) for b in (8, 4))
    zero_point = q4.zero_point.clone()
    zero_point[3] = 9
    args = ([q8.data, q4.data], [q8.scale, q4.scale], [q8.zero_point, zero_point], torch.tensor([0.5, 0.5]), [0])
    ops = [torch.ops.fedhq.aggregate] + [
        dispatch._module(name).KERNELS["aggregate"] for name in ("reference", "cpu", "triton") if dispatch._module(name)
    ]
    for op in ops:
        with pytest.raises(ValueError, match=r"^aggregate: client 1's 'w' zero_point must lie in \[-8, 7\], got 9 at "):
            op(*args, [8, 4], -128, 127, False, ["w"], -1)
        for bits in (1, 9):
            with pytest.raises(
                ValueError, match=rf"^aggregate: client 1's 'w' bits must be an int in \[2, 8\], got {bits}"
            ):
                op(*args, [8, bits], -128, 127, False, ["w"], -1)
        with pytest.raises(ValueError, match=r"^aggregate: expected 2 bit widths \(one per client x tensor\), got 1"):
            op(*args, [8], -128, 127, False, ["w"], -1)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"bits": 9}, ValueError, r"bits must be an int in \[2, 8\], got 9"),
        ({"bits": 1}, ValueError, r"bits must be an int in \[2, 8\], got 1"),
        ({"bits": {**dict.fromkeys(MODEL, 4), "typo": 4}}, ValueError, "bits names 'typo', which is not a quantized"),
        ({"bits": {**dict.fromkeys(MODEL, 4), "count": 4}}, ValueError, "bits names 'count', which is not a quantized"),
        ({"bits": {"scalar": 4}}, ValueError, "bits gives no width for 'conv.weight'"),
        ({"bits": {**dict.fromkeys(MODEL, 4), "empty": 0}}, ValueError, r"bits\['empty'\] must be an int in \[2, 8\]"),
        ({"bits": 4, "requantize": False}, ValueError, "bits=4 has no meaning with requantize=False"),
        ({"requantize": False, "method": "median"}, ValueError, "only the mean has a float result; median requantizes"),
        ({"requantize": "no"}, TypeError, "requantize must be a bool, got 'no'"),
    ],
)
def test_rejects_bad_output_bits(backend, gen, kwargs, error, message):
    sds = client_state_dicts(gen, 3, bits="mixed")
    for sd in sds:
        sd["count"] = torch.tensor(1)
    with pytest.raises(error, match=f"^aggregate_state_dicts: {message}[^\\n]*$"):
        fk.aggregate_state_dicts(sds, [1, 1, 1], **kwargs)
    with pytest.raises(TypeError, match="^aggregate: bits must be an int or None for one tensor, got a mapping$"):
        fk.aggregate([sd["fc.weight"] for sd in sds], [1, 1, 1], bits={"tensor": 4})
