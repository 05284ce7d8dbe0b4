"""The cpu backend's output cache (csrc/output_pool.h, fedhq_kernels.output_cache): a
freed output of a megabyte or more is reused by the next output of its size, results
stay exact, the byte limit holds, and the cache can be emptied or turned off."""

import pytest
import torch
from conftest import assert_equal

import fedhq_kernels as fk
from fedhq_kernels import cpu, reference

pytestmark = pytest.mark.skipif(cpu.UNAVAILABLE is not None, reason="the C++ cpu backend is not built")

MB = 1 << 20


@pytest.fixture(autouse=True)
def on_cpu(monkeypatch):
    monkeypatch.setenv("FEDHQ_BACKEND", "cpu")
    old = fk.set_output_cache_limit(256 * MB)
    fk.release_output_cache()
    yield
    fk.set_output_cache_limit(old)
    fk.release_output_cache()


def test_a_freed_output_is_reused_and_every_result_stays_exact(gen):
    x = torch.randn(1023, 517, generator=gen)  # odd sizes, 2.0 MiB of float32
    y = fk.fake_quant(x)
    seen, nbytes = {y.data_ptr()}, y.numel() * 4
    assert fk.output_cache_bytes() == 0
    del y
    assert fk.output_cache_bytes() == nbytes
    for step in range(4):  # fresh inputs into recycled buffers: no value of an earlier output survives
        x = torch.randn(1023, 517, generator=gen) * float(torch.rand(1, generator=gen) * 10)
        held = fk.output_cache_bytes()
        leaf = x.clone().requires_grad_()
        y = fk.fake_quant(leaf)
        grad = torch.randn(x.shape, generator=gen)
        (got,) = torch.autograd.grad(y, leaf, grad)
        expected, scale, zero_point = reference.fake_quant_observed(x, -128, 127, True, -1)
        assert_equal(y.detach(), expected, "observed fake_quant")
        assert_equal(got, reference.fake_quant_backward(grad, x, scale, zero_point, -128, 127, -1), "gradient")
        if step > 0:  # the two outputs (forward, gradient) came from the two buffers the last step freed
            assert {y.data_ptr(), got.data_ptr()} <= seen and held - fk.output_cache_bytes() == 2 * nbytes
        seen |= {y.data_ptr(), got.data_ptr()}
        del y, got


def test_small_outputs_are_left_to_torch(gen):
    y = fk.fake_quant(torch.randn(100, 100, generator=gen))
    del y
    assert fk.output_cache_bytes() == 0


def test_the_limit_holds_and_the_cache_empties_or_turns_off(gen):
    outputs = [fk.fake_quant(torch.randn(MB // 4 * k, generator=gen)) for k in (1, 2, 3, 4)]  # 1, 2, 3, 4 MiB
    assert fk.set_output_cache_limit(6 * MB) == 256 * MB
    del outputs
    assert fk.output_cache_bytes() <= 6 * MB and fk.output_cache_bytes() > 0
    assert fk.set_output_cache_limit(2 * MB) == 6 * MB  # lowering it frees what is beyond
    assert fk.output_cache_bytes() <= 2 * MB
    held = fk.output_cache_bytes()
    assert fk.release_output_cache() == held and fk.output_cache_bytes() == 0
    fk.set_output_cache_limit(0)
    y = fk.fake_quant(torch.randn(MB, generator=gen))
    del y
    assert fk.output_cache_bytes() == 0
    for bad in (-1, 1.5, "1", None):
        with pytest.raises(ValueError, match="set_output_cache_limit: limit_bytes must be an int >= 0"):
            fk.set_output_cache_limit(bad)


def test_a_cached_output_can_be_resized_and_written_like_any_tensor(gen):
    y = fk.fake_quant(torch.randn(MB // 2, generator=gen))
    y.resize_(MB)  # grows through the cache's allocator
    y.fill_(1.5)
    assert y.shape == (MB,) and bool((y == 1.5).all())
    torch.add(y, 1, out=y)
    assert bool((y == 2.5).all())
