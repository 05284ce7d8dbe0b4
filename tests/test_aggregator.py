"""Aggregator, the streaming server step: bit for bit aggregate_state_dicts on every
backend, an update refused by add leaves it unchanged, it keeps no update (mean), and
the robust methods, weights and templates it accepts or refuses."""

import dataclasses
import gc
import math
import weakref

import pytest
import torch
from conftest import assert_equal
from test_aggregate import MODEL, client_state_dicts
from test_quantize import TAMPERED, tampered

import fedhq_kernels as fk
from fedhq_kernels import reference


def with_plain_entries(gen, sds, shared_count=True):
    """Adds BatchNorm-like float statistics and integer buffers (one shared by every
    client, one that differs) to each client's state dict."""
    for k, sd in enumerate(sds):
        sd["bn.running_mean"] = torch.randn(13, generator=gen)
        sd["bn.half"] = torch.randn(5, generator=gen).half()
        sd["bn.num_batches_tracked"] = torch.tensor(40 if shared_count else 40 + k)
        sd["steps"] = torch.randint(-1000, 1000, (3, 2), generator=gen, dtype=torch.int32)
    return sds


def assert_same_state(got, expected):
    assert list(got) == list(expected)
    for name, want in expected.items():
        have = got[name]
        if isinstance(want, fk.QuantizedTensor):
            assert isinstance(have, fk.QuantizedTensor), name
            for field in ("shape", "dtype", "bits", "axis", "symmetric"):
                assert getattr(have, field) == getattr(want, field), f"{name} {field}"
            for field in ("data", "scale", "zero_point"):
                assert_equal(getattr(have, field), getattr(want, field), f"{name} {field}")
        else:
            assert_equal(have, want, name)


def streamed(sds, weights, **kwargs):
    aggregator = fk.Aggregator(sds[0], **kwargs)
    for sd, w in zip(sds, weights):
        aggregator.add(sd, w)
    return aggregator.result()


@pytest.mark.parametrize("clients", [1, 4, 11])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_matches_aggregate_state_dicts_bit_for_bit(backend, gen, clients, dtype, symmetric):
    sds = with_plain_entries(gen, client_state_dicts(gen, clients, dtype, symmetric=symmetric))
    weights = torch.randint(0, 500, (clients,), generator=gen).tolist()
    weights[-1] += 1  # never all 0
    assert_same_state(streamed(sds, weights), fk.aggregate_state_dicts(sds, weights))


@pytest.mark.parametrize("clients", [1, 4, 11])
@pytest.mark.parametrize("symmetric", [True, False])
def test_mixed_bits_match_aggregate_state_dicts_bit_for_bit(backend, gen, clients, symmetric):
    """Each client's tensor at its own width, the template at 8 bits: the result at the
    widest width added (default), at one width, per tensor from a map, or as floats;
    robust methods too."""
    sds = with_plain_entries(gen, client_state_dicts(gen, clients, torch.bfloat16, bits="mixed", symmetric=symmetric))
    template = client_state_dicts(gen, 1, torch.bfloat16, symmetric=symmetric)[0] | {
        k: v for k, v in sds[0].items() if k not in MODEL
    }
    weights = torch.randint(0, 500, (clients,), generator=gen).tolist()
    weights[-1] += 1  # never all 0
    chosen = {name: int(torch.randint(2, 9, (), generator=gen)) for name in MODEL}
    for method in ("mean", "median") if clients < 10 else ("mean",):  # the interpreter's median of 11 is slow
        aggregator = fk.Aggregator(template, method=method)
        for sd, w in zip(sds, weights):
            aggregator.add(sd, w)
        for bits in (None, 3, chosen):
            expected = fk.aggregate_state_dicts(sds, weights, bits=bits, method=method)
            assert_same_state(aggregator.result(bits=bits), expected)
    for name, q in aggregator.result().items():
        if name in MODEL:
            assert q.bits == max(sd[name].bits for sd in sds), name
    mean = fk.Aggregator(template)
    for sd, w in zip(sds, weights):
        mean.add(sd, w)
    assert_same_state(mean.result(requantize=False), fk.aggregate_state_dicts(sds, weights, requantize=False))
    for bad, message in (
        (9, r"bits must be an int in \[2, 8\], got 9"),
        ({"typo": 4}, "bits names 'typo', which is not a quantized entry"),
        ({"scalar": 4}, "bits gives no width for 'conv.weight'"),
    ):
        with pytest.raises(ValueError, match=f"^Aggregator: {message}"):
            mean.result(bits=bad)
    with pytest.raises(ValueError, match="^Aggregator: bits=4 has no meaning with requantize=False"):
        mean.result(requantize=False, bits=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float_result_is_the_running_mean_itself(backend, gen, dtype):
    """result(requantize=False): each quantized entry as the reference's float32 running
    mean of the dequantized updates, cast to its dtype; plain entries as result()'s."""
    sds = with_plain_entries(gen, client_state_dicts(gen, 4, dtype))
    weights = [3, 1, 0.5, 7]
    aggregator = fk.Aggregator(sds[0])
    for sd, w in zip(sds, weights):
        aggregator.add(sd, w)
    got, requantized = aggregator.result(requantize=False), aggregator.result()
    fractions = fk.functional.running_fractions("test", weights, 4, torch.device("cpu")).tolist()
    for name, want in requantized.items():
        if not isinstance(want, fk.QuantizedTensor):
            assert_equal(got[name], want, name)
            continue
        mean = torch.zeros(want.shape)
        for sd, b in zip(sds, fractions):
            q = sd[name]
            values = reference._dequantize_float(q.data, q.scale, q.zero_point, -1 if q.axis is None else q.axis)
            mean = reference._blend(mean, values, torch.tensor(b))
        assert_equal(got[name], mean.to(dtype), name)
    assert list(got) == list(requantized)
    kept = {name: value.clone() for name, value in got.items()}
    aggregator.add(sds[0], 5)  # the float result views the accumulator: adding copies it first
    for name, value in got.items():
        assert_equal(value, kept[name], name)
    again = fk.Aggregator(sds[0])
    for sd, w in zip([*sds, sds[0]], [*weights, 5]):
        again.add(sd, w)
    assert_same_state(aggregator.result(), again.result())
    robust = fk.Aggregator(sds[0], method="median")
    robust.add(sds[0], 1)
    with pytest.raises(ValueError, match="only the mean has a float result"):
        robust.result(requantize=False)


def test_a_reused_accumulator_gives_the_same_mean(backend, gen):
    sds = with_plain_entries(gen, client_state_dicts(gen, 3))
    elements = sum(v.data.numel() for v in sds[0].values() if isinstance(v, fk.QuantizedTensor))
    buffer = torch.full((elements,), float("nan"))  # whatever it held is zeroed first
    for _ in range(2):  # round after round
        aggregator = fk.Aggregator(sds[0], accumulator=buffer)
        for sd, w in zip(sds, [1, 2, 3]):
            aggregator.add(sd, w)
        assert_same_state(aggregator.result(), streamed(sds, [1, 2, 3]))
    for bad in (torch.zeros(elements - 1), torch.zeros(elements, dtype=torch.float64), torch.zeros(2, elements)[:, 0]):
        with pytest.raises(ValueError, match="the accumulator must be a contiguous 1-d float32 tensor"):
            fk.Aggregator(sds[0], accumulator=bad)


def test_mixed_bit_widths_and_non_contiguous_codes(backend, gen):
    def client():
        x = torch.randn(9, 17, generator=gen)
        wide = fk.quantize(x, bits=8, axis=1)
        t = fk.quantize(torch.randn(17, 9, generator=gen), bits=3, axis=0)
        # the same codes seen through a transpose: a non-contiguous data tensor
        transposed = fk.QuantizedTensor(
            t.data.t().contiguous().t(), t.scale, t.zero_point, 3, 0, True, torch.float32, t.shape
        )
        assert not transposed.data.is_contiguous()
        return {"a": wide, "b": fk.quantize(torch.randn(31, generator=gen), bits=5, symmetric=False), "c": transposed}

    sds = [client() for _ in range(5)]
    weights = [0.5, 3, 1e-3, 2.25, 7]
    assert_same_state(streamed(sds, weights), fk.aggregate_state_dicts(sds, weights))


def test_accumulate_is_the_fused_mean_step(backend, gen):
    """The op behind add: successive accumulate calls from 0 equal the reference's
    running mean, element by element."""
    sds = client_state_dicts(gen, 3)
    names = list(MODEL)
    axes = [-1 if MODEL[n][1] is None else MODEL[n][1] for n in names]
    fractions = fk.functional.running_fractions("test", [2, 5, 3], 3, torch.device("cpu"))
    acc = torch.zeros(sum(sds[0][n].data.numel() for n in names))
    expected = [torch.zeros(sds[0][n].shape) for n in names]
    for sd, b in zip(sds, fractions.tolist()):
        qs = [sd[n] for n in names]
        torch.ops.fedhq.accumulate(
            acc, [q.data for q in qs], [q.scale for q in qs], [q.zero_point for q in qs], axes, b, names
        )
        for t, q in enumerate(qs):
            values = reference._dequantize_float(q.data, q.scale, q.zero_point, axes[t])
            expected[t] = reference._blend(expected[t], values, torch.tensor(b))
    assert_equal(acc, torch.cat([e.flatten() for e in expected]))


def test_refused_update_leaves_the_aggregator_unchanged(backend, gen):
    sds = with_plain_entries(gen, client_state_dicts(gen, 3, bits=4))
    good = fk.Aggregator(sds[0])
    for sd in sds:
        good.add(sd, 3)
    expected = good.result()

    bad_updates = []
    for name in ("conv.weight", "fc.weight"):
        for field, value in (("bits", 9), ("axis", None), ("symmetric", False), ("dtype", torch.float16)):
            q = sds[1][name]
            bad = fk.QuantizedTensor(q.data, q.scale, q.zero_point, q.bits, q.axis, q.symmetric, q.dtype, q.shape)
            object.__setattr__(bad, field, value)
            bad_updates.append((f"{name} {field}", {**sds[1], name: bad}))
    q = sds[1]["fc.weight"]
    scale = q.scale.clone()
    scale[3] = math.nan
    bad_updates.append(
        (
            "nan scale",
            {**sds[1], "fc.weight": fk.QuantizedTensor(q.data, scale, q.zero_point, 4, 0, True, q.dtype, q.shape)},
        )
    )
    codes = q.data.clone()
    codes[-1, -1] = 9  # outside the 4-bit range
    bad_updates.append(
        (
            "codes",
            {**sds[1], "fc.weight": fk.QuantizedTensor(codes, q.scale, q.zero_point, 4, 0, True, q.dtype, q.shape)},
        )
    )
    meta = fk.QuantizedTensor(
        q.data.to("meta"), q.scale.to("meta"), q.zero_point.to("meta"), 4, 0, True, q.dtype, q.shape
    )
    bad_updates.append(("device", {**sds[1], "fc.weight": meta}))
    bad_updates.append(("missing", {k: v for k, v in sds[1].items() if k != "scalar"}))
    bad_updates.append(("extra", {**sds[1], "new": torch.zeros(2)}))
    bad_updates.append(("plain as quantized", {**sds[1], "bn.running_mean": sds[1]["bn.weight"]}))
    bad_updates.append(("int dtype", {**sds[1], "steps": sds[1]["steps"].long()}))
    bad_updates.append(("not a mapping", [sds[1]]))

    aggregator = fk.Aggregator(sds[0])
    for i, sd in enumerate(sds):
        aggregator.add(sd, 3)
        if i == 0:
            acc = aggregator.acc.clone()
            for what, update in bad_updates:
                with pytest.raises((TypeError, ValueError), match="Aggregator: ") as refused:
                    aggregator.add(update, 3)
                assert_equal(aggregator.acc, acc, what)
                # the public check is the same rule, word for word
                with pytest.raises(type(refused.value)) as checked:
                    fk.check_update(sds[0], update, op="Aggregator")
                assert str(checked.value) == str(refused.value), what
            assert fk.check_update(sds[0], sds[2]) is None
            for weight in (-1, math.nan, math.inf, True, "3", None):
                with pytest.raises(ValueError, match="Aggregator: a weight must be a finite number >= 0"):
                    aggregator.add(sds[1], weight)
                assert_equal(aggregator.acc, acc, f"weight {weight!r}")
            assert aggregator.clients == 1
    assert_same_state(aggregator.result(), expected)


@pytest.mark.parametrize("what", TAMPERED)
def test_refuses_every_altered_quantized_tensor(backend, what):
    template = {"tensor": fk.quantize(torch.randn(3, 5), bits=4, axis=0)}
    aggregator = fk.Aggregator(template)
    aggregator.add(template, 1)
    acc = aggregator.acc.clone()
    with pytest.raises((TypeError, ValueError), match="Aggregator: "):
        aggregator.add({"tensor": tampered(what)}, 1)
    assert_equal(aggregator.acc, acc, what)


def test_mean_keeps_no_reference_to_an_update(backend, gen):
    template = client_state_dicts(gen, 1)[0]
    aggregator = fk.Aggregator(template)
    update = client_state_dicts(gen, 1)[0]
    codes = weakref.ref(update["fc.weight"].data)
    aggregator.add(update, 2)
    del update
    gc.collect()
    assert codes() is None
    assert aggregator.acc.numel() == sum(q.data.numel() for q in template.values())


@pytest.mark.parametrize("method", ["median", "trimmed-mean"])
def test_robust_methods_keep_the_updates_and_match(backend, gen, method):
    sds = with_plain_entries(gen, client_state_dicts(gen, 5), shared_count=False)
    weights = [1, 2, 3, 4, 5]
    got = streamed(sds, weights, method=method, trim=0.2)
    assert_same_state(got, fk.aggregate_state_dicts(sds, weights, method=method, trim=0.2))


def test_weights(backend, gen):
    sds = client_state_dicts(gen, 3)
    # exact running totals: huge weights neither overflow nor lose the ratio
    assert_same_state(streamed(sds[:2], [1e308, 1e308]), streamed(sds[:2], [1, 1]))
    assert_same_state(streamed(sds, [0, 2, 6]), streamed(sds[1:], [1, 3]))
    assert_same_state(streamed(sds, torch.tensor([4, 1, 2]).tolist()), streamed(sds, [0.4, 0.1, 0.2]))
    aggregator = fk.Aggregator(sds[0])
    with pytest.raises(ValueError, match="Aggregator: no update was added"):
        aggregator.result()
    aggregator.add(sds[0], 0)
    with pytest.raises(ValueError, match="Aggregator: weights sum to 0"):
        aggregator.result()
    aggregator.add(sds[1], 2**70)  # an int beyond float64's exact range
    assert_same_state(aggregator.result(), streamed(sds[1:2], [1]))


def test_integer_entries_are_exact(backend, gen):
    big = torch.iinfo(torch.int64).max
    sds = [{"count": torch.tensor([7, big, -3]), "small": torch.tensor([1, 2], dtype=torch.int8)} for _ in range(3)]
    sds[1]["small"] = torch.tensor([127, 2], dtype=torch.int8)
    got = streamed(sds, [1, 1, 1])
    assert_equal(got["count"], torch.tensor([7, big, -3]))  # shared by every client: kept exactly
    assert_equal(got["small"], torch.tensor([43, 2], dtype=torch.int8))


def test_non_finite_plain_entries_are_refused_and_weight_zero_changes_nothing(backend, gen):
    sds = with_plain_entries(gen, client_state_dicts(gen, 3))
    aggregator = fk.Aggregator(sds[0])
    aggregator.add(sds[0], 2)
    before = aggregator.result()
    for bad in (float("nan"), float("inf")):
        poisoned = dict(sds[1], **{"bn.running_mean": torch.full((13,), bad)})
        for weight in (0, 3):  # weight 0 too: 0 x NaN is NaN
            with pytest.raises(ValueError, match="'bn.running_mean' holds NaN or Inf"):
                aggregator.add(poisoned, weight)
            assert_same_state(aggregator.result(), before)
    aggregator.add(sds[2], 0)  # a finite client of weight 0 leaves the mean as it was
    assert_same_state(aggregator.result(), before)
    mean = aggregator.result()["bn.running_mean"]
    mean.add_(1)  # a result is the caller's: the aggregator's mean is unchanged
    assert_same_state(aggregator.result(), before)


def test_overflowing_average_is_a_clear_error(backend):
    q = fk.quantize(torch.tensor([1.5e38, -1.5e38, 1.0]), symmetric=False)  # below half of float32's max: taken
    aggregator = fk.Aggregator({"w": q})
    aggregator.add({"w": q}, 1)
    big = fk.QuantizedTensor(
        torch.tensor([127, -128, 127], dtype=torch.int8),
        torch.tensor(3e38),
        torch.tensor(0, dtype=torch.int32),
        8,
        None,
        False,
        torch.float32,
        q.shape,
    )
    before = aggregator.result()
    with pytest.raises(
        ValueError, match="Aggregator: the update's 'w' has a scale so large its values reach float32's limit"
    ):
        aggregator.add({"w": big}, 1)  # 127 x 3e38 is inf in float32: refused before it enters the mean
    assert_same_state(aggregator.result(), before)
    float_mean = aggregator.result(requantize=False)["w"]
    assert bool(torch.isfinite(float_mean).all())


@pytest.mark.parametrize(
    "template,kwargs,error,message",
    [
        ([1], {}, TypeError, "the template must be a mapping"),
        ({"b": torch.zeros(2, dtype=torch.bool)}, {}, TypeError, "'b' is a bool tensor"),
        ({"x": 3.0}, {}, TypeError, "'x' must be a QuantizedTensor or a tensor"),
        ({}, {"method": "mode"}, ValueError, "method must be one of"),
        ({}, {"method": "median", "trim": 0.5}, ValueError, "trim must be a fraction"),
    ],
)
def test_refuses_bad_templates_and_methods(template, kwargs, error, message):
    with pytest.raises(error, match=f"Aggregator: .*{message}"):
        fk.Aggregator(template, **kwargs)


def test_a_refused_update_leaves_the_widest_width_unchanged(backend, gen):
    narrow = {"w": fk.quantize(torch.randn(4, 6, generator=gen), bits=2, axis=0)}
    aggregator = fk.Aggregator(narrow)
    aggregator.add(narrow, 1)
    wide = fk.quantize(torch.randn(4, 6, generator=gen), bits=8, axis=0)
    bad_scale = dataclasses.replace(wide, scale=torch.full_like(wide.scale, -1.0))
    for update, weight in (({"w": bad_scale}, 1), ({"w": wide}, -1)):
        with pytest.raises(ValueError, match="Aggregator: "):
            aggregator.add(update, weight)
        assert aggregator.result()["w"].bits == 2
    aggregator.add({"w": wide}, 1)
    assert aggregator.result()["w"].bits == 8
