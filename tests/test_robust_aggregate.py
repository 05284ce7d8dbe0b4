"""Robust aggregation (method="trimmed-mean" / "median"): every backend against the
plain-torch reference bit for bit, the reference against NumPy's coordinate-wise
median / trimmed mean, float and integer entries, and bad arguments."""

import numpy as np
import pytest
import torch
from conftest import assert_equal

import fedhq_kernels as fk
from fedhq_kernels import reference
from fedhq_kernels.quantized_tensor import quant_range

# odd sizes, per-tensor and per-channel (rows and channel-cycling columns), 0-d, empty
MODEL = {"w": ((7, 45), 0), "cyc": ((5, 9), 1), "v": ((301,), None), "s": ((), None), "e": ((0, 3), None)}


def clients(gen, k, bits, symmetric=True, ties=False):
    """``bits``: one width, or "mixed": each client draws each tensor's width from 2..8."""
    sds = []
    for _ in range(k):
        sd = {}
        for name, (shape, axis) in MODEL.items():
            x = torch.randn(shape, generator=gen) * (1 + torch.rand((), generator=gen))
            if ties:  # every client shares one range, so equal codes give equal values
                x = x.clamp(-1, 1)
                x.view(-1)[:1] = 1.0 if x.numel() else x.view(-1)[:1]
            width = int(torch.randint(2, 9, (), generator=gen)) if bits == "mixed" else bits
            sd[name] = fk.quantize(x, bits=width, symmetric=symmetric, axis=axis)
        sd["bias"] = torch.randn(6, generator=gen)
        sd["count"] = torch.randint(0, 1000, (), generator=gen)
        sds.append(sd)
    return sds


def expected(sds, cut, bits=None):
    """The reference per tensor, each client's tensor at its own width, the result at
    ``bits`` (None: the widest)."""
    out = {}
    for name in MODEL:
        qs = [sd[name] for sd in sds]
        axis = -1 if qs[0].axis is None else qs[0].axis
        w = torch.full((len(qs),), 1.0 / len(qs))
        args = ([q.data for q in qs], [q.scale for q in qs], [q.zero_point for q in qs], w, [axis])
        out_range = quant_range(max(q.bits for q in qs) if bits is None else bits)
        out[name] = reference.aggregate(*args, [q.bits for q in qs], *out_range, qs[0].symmetric, [name], cut)
    return out


CASES = [(k, m, t) for k in range(1, 10) for m, t in (("median", 0.1), ("trimmed-mean", 0.1), ("trimmed-mean", 0.34))]


@pytest.mark.parametrize("k,method,trim", CASES)
def test_matches_reference_bit_for_bit(backend, gen, k, method, trim):
    bits = 2 + k % 7
    sds = clients(gen, k, bits, symmetric=k % 2 == 0, ties=k % 3 == 0)
    cut = (k - 1) // 2 if method == "median" else int(trim * k)
    got = fk.aggregate_state_dicts(sds, list(range(1, k + 1)), method=method, trim=trim)
    for name, (codes, scale, zero_point) in expected(sds, cut).items():
        q = got[name]
        assert_equal(q.data.flatten(), codes, f"{name} codes")
        assert_equal(q.scale.flatten(), scale, f"{name} scale")
        assert_equal(q.zero_point.flatten(), zero_point, f"{name} zero point")


@pytest.mark.parametrize("k,method", [(1, "median"), (4, "median"), (7, "median"), (5, "trimmed-mean")])
def test_mixed_bits_match_reference_bit_for_bit(backend, gen, k, method):
    """Each client's tensor at its own width (ties included: equal values at different
    widths), the result at the widest, or at the width given."""
    sds = clients(gen, k, "mixed", symmetric=k % 2 == 1, ties=True)
    cut = (k - 1) // 2 if method == "median" else int(0.2 * k)
    for bits in (None, 3):
        got = fk.aggregate_state_dicts(sds, [1] * k, bits=bits, method=method, trim=0.2)
        for name, (codes, scale, zero_point) in expected(sds, cut, bits).items():
            q = got[name]
            assert q.bits == (max(sd[name].bits for sd in sds) if bits is None else bits), name
            assert_equal(q.data.flatten(), codes, f"{name} codes")
            assert_equal(q.scale.flatten(), scale, f"{name} scale")
            assert_equal(q.zero_point.flatten(), zero_point, f"{name} zero point")
    with pytest.raises(ValueError, match="only the mean has a float result; median requantizes"):
        fk.aggregate_state_dicts(sds, [1] * k, method="median", requantize=False)


@pytest.mark.parametrize("k", [1, 2, 5, 8])
def test_reference_is_numpys_median_and_trimmed_mean(gen, k):
    """Float32 values: np.median (the mean of the two middle values for even K) and a
    sort-based trimmed mean summed in ascending order, as Flower's FedMedian /
    FedTrimmedAvg compute them."""
    values = [torch.randn(50, generator=gen).round(decimals=1) for _ in range(k)]  # with ties
    stacked = torch.stack(values).numpy()
    assert_equal(reference._trimmed_mean(values, (k - 1) // 2), torch.from_numpy(np.median(stacked, axis=0)))
    cut = k // 4
    kept = np.sort(stacked, axis=0)[cut : k - cut]
    trimmed = np.zeros(50, np.float32)
    for row in kept:
        trimmed = trimmed + row
    assert_equal(reference._trimmed_mean(values, cut), torch.from_numpy(trimmed / np.float32(k - 2 * cut)))


def test_float_and_integer_entries(backend, gen):
    sds = clients(gen, 4, 8)
    for sd, n in zip(sds, (1, 2**63 - 1, 2**63 - 1, 5)):
        sd["count"] = torch.tensor(n)
    got = fk.aggregate_state_dicts(sds, [1, 1, 1, 1], method="median")
    bias = torch.stack([sd["bias"] for sd in sds]).numpy()
    assert_equal(got["bias"], torch.from_numpy(np.median(bias, axis=0)))
    assert int(got["count"]) == 2**62 + 2  # (5 + 2**63 - 1) / 2 exactly, no wrap to -2**63
    odd = fk.aggregate_state_dicts(sds[:3], [1, 1, 1], method="median")
    assert int(odd["count"]) == 2**63 - 1  # the middle value, exactly


def test_integer_mean_saturates_instead_of_wrapping(backend, gen):
    sds = clients(gen, 2, 8)
    for sd in sds:
        sd["count"] = torch.tensor(2**63 - 1)
    assert int(fk.aggregate_state_dicts(sds, [1, 3])["count"]) == 2**63 - 1
    sds[0]["count"] = torch.tensor(2**63 - 2)
    assert int(fk.aggregate_state_dicts(sds, [1, 3])["count"]) == 2**63 - 1


def test_trim_edges(backend, gen):
    sds = clients(gen, 3, 8)
    # 0.1 * 3 cuts nothing: the unweighted mean, whatever the weights
    a = fk.aggregate_state_dicts(sds, [1, 1, 100], method="trimmed-mean", trim=0.1)
    b = fk.aggregate_state_dicts(sds, [5, 2, 1], method="trimmed-mean", trim=0.0)
    # 0.34 * 3 cuts one from each end: the median of three
    c = fk.aggregate_state_dicts(sds, [1, 1, 1], method="trimmed-mean", trim=0.34)
    d = fk.aggregate_state_dicts(sds, [1, 1, 1], method="median")
    for name in MODEL:
        assert_equal(a[name].data, b[name].data, name)
        assert_equal(c[name].data, d[name].data, name)


def test_robust_single_tensor_aggregate(backend, gen):
    updates = [fk.quantize(torch.randn(9, 13, generator=gen), bits=5, axis=1) for _ in range(5)]
    q = fk.aggregate(updates, [1] * 5, method="median")
    r = fk.aggregate_state_dicts([{"t": u} for u in updates], [1] * 5, method="median")["t"]
    assert_equal(q.data, r.data)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"method": "mode"}, "method must be one of mean, trimmed-mean, median, got 'mode'"),
        ({"method": "trimmed-mean", "trim": 0.5}, r"trim must be a fraction in \[0, 0.5\)"),
        ({"method": "trimmed-mean", "trim": -0.1}, r"trim must be a fraction in \[0, 0.5\)"),
        ({"method": "median", "trim": "x"}, r"trim must be a fraction in \[0, 0.5\)"),
    ],
)
def test_rejects_bad_method_and_trim(backend, gen, kwargs, message):
    with pytest.raises(ValueError, match=f"^aggregate_state_dicts: {message}"):
        fk.aggregate_state_dicts(clients(gen, 2, 8), [1, 1], **kwargs)


def test_rejects_bad_weights_and_schemes_with_robust_methods(backend, gen):
    sds = clients(gen, 3, 8)
    with pytest.raises(ValueError, match="weights must be finite and >= 0"):
        fk.aggregate_state_dicts(sds, [1, -1, 1], method="median")
    sds[1]["w"] = fk.quantize(torch.randn(7, 45), bits=8, axis=None)
    with pytest.raises(ValueError, match="'w' of client 1 has axis=None, client 0 has 0"):
        fk.aggregate_state_dicts(sds, [1, 1, 1], method="median")


def test_op_rejects_a_trim_that_leaves_nothing(backend, gen):
    q = [fk.quantize(torch.randn(4), bits=8) for _ in range(2)]
    args = ([x.data for x in q], [x.scale for x in q], [x.zero_point for x in q], torch.tensor([0.5, 0.5]), [-1])
    with pytest.raises(ValueError, match="^aggregate: trimming 1 of 2 clients from each end leaves none$"):
        torch.ops.fedhq.aggregate(*args, [8, 8], -128, 127, True, ["t"], 1)


def test_every_backend_rejects_a_trim_that_leaves_nothing(gen):
    from fedhq_kernels import dispatch

    q = [fk.quantize(torch.randn(4), bits=8) for _ in range(2)]
    args = ([x.data for x in q], [x.scale for x in q], [x.zero_point for x in q], torch.tensor([0.5, 0.5]), [-1])
    for name in ("reference", "cpu", "triton"):
        module = dispatch._module(name)
        if module is not None:
            with pytest.raises(ValueError, match="^aggregate: trimming 1 of 2 clients from each end leaves none"):
                module.KERNELS["aggregate"](*args, [8, 8], -128, 127, True, ["t"], 1)
