"""Micro-benchmarks of the profile: memory bandwidth (also the benchmarks' copy
reference), matmul throughput, per-op launch overhead, the quantization ops in GB/s.
Figures are {median, p10, p90, repeats} of logical bytes (read + written by an ideal
kernel) per second; see docs/profile.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

import fedhq_kernels as fk
from fedhq.profile import timing


def _gbps(nbytes: float) -> Callable[[float], float]:
    return lambda s: nbytes / s / 1e9


def bandwidth_calls(x: torch.Tensor) -> dict[str, tuple[Callable[[], object], int]]:
    """The bandwidth measurements of ``x``, name -> (call, bytes moved per call): ``copy``
    into a preallocated tensor (read + write), a read-only ``sum``, an allocating
    ``clone`` (on a CPU first-touch page faults of the fresh output dominate it)."""
    out = torch.empty_like(x)
    size = x.numel() * x.element_size()
    return {"copy": (lambda: out.copy_(x), 2 * size), "read": (x.sum, size), "clone": (x.clone, 2 * size)}


def bandwidth(device: torch.device, nbytes: int, *, repeats: int, warmup: int = 2) -> dict:
    """Figures of ``bandwidth_calls`` on ``nbytes`` of float32. ``nbytes`` should be
    several times the last-level cache, so these are memory, not cache, bandwidths."""
    gen = torch.Generator().manual_seed(1)
    x = timing.randn_nonzero((nbytes // 4,), generator=gen, device=device)
    calls = bandwidth_calls(x)
    timing.warm_up_clocks(calls["copy"][0], device=device)
    figures = {}
    for name, key in (
        ("copy", "copy_bandwidth_gbps"),
        ("read", "read_bandwidth_gbps"),
        ("clone", "alloc_copy_bandwidth_gbps"),
    ):
        fn, size = calls[name]
        t = timing.measure(fn, device=device, repeats=repeats, warmup=warmup)
        figures[key] = t.figure(_gbps(size), bytes=size)
    return figures


def _matmul_case(device: torch.device, dtype_name: str, n: int):
    """(callable, flops per call) for an n x n x n matmul at ``dtype_name``, or a reason
    it cannot run here."""
    gen = torch.Generator().manual_seed(2)
    if dtype_name == "int8":
        a = torch.randint(-128, 128, (n, n), dtype=torch.int8, generator=gen).to(device)
        b = torch.randint(-128, 128, (n, n), dtype=torch.int8, generator=gen).to(device)
        if not hasattr(torch, "_int_mm"):
            return None, "torch._int_mm is not available in this torch"
        return (lambda: torch._int_mm(a, b)), 2 * n**3
    dtype = {"float32": torch.float32, "tf32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[
        dtype_name
    ]
    a = timing.randn_nonzero((n, n), generator=gen, device=device, dtype=dtype)
    b = timing.randn_nonzero((n, n), generator=gen, device=device, dtype=dtype)
    return (lambda: torch.mm(a, b)), 2 * n**3


def matmul_throughput(
    device: torch.device, n: int, *, repeats: int, warmup: int = 1, low_precision_n: int | None = None
) -> dict:
    """TFLOP/s (TOPS for int8) of an n x n x n matmul per dtype: float32, tf32 (CUDA
    only: float32 inputs with TF32 tensor cores allowed), float16, bfloat16, int8
    (torch._int_mm). A dtype that cannot run here is ``None`` with the reason in
    ``unsupported``. ``low_precision_n`` sizes float16/bfloat16/int8 separately
    (CPUs without native support run them orders of magnitude slower)."""
    figures: dict = {}
    unsupported: dict[str, str] = {}
    for name in ("float32", "tf32", "float16", "bfloat16", "int8"):
        if name == "tf32" and device.type != "cuda":
            figures[name], unsupported[name] = None, "TF32 is a CUDA tensor-core mode"
            continue
        size = n if name in ("float32", "tf32") or low_precision_n is None else low_precision_n
        previous_tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = name == "tf32"
        try:
            fn, flops = _matmul_case(device, name, size)
            if fn is None:
                figures[name], unsupported[name] = None, flops
                continue
            fn()  # fails here if the dtype has no kernel on this device
            t = timing.measure(fn, device=device, repeats=repeats, warmup=warmup)
            figures[name] = t.figure(lambda s, flops=flops: flops / s / 1e12, n=size)
        except (RuntimeError, NotImplementedError) as error:
            figures[name], unsupported[name] = None, f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous_tf32
    if unsupported:
        figures["unsupported"] = unsupported
    return figures


def launch_overhead(device: torch.device, *, repeats: int) -> dict:
    """Microseconds per call of a tiny op (in-place add on one element): eager
    dispatch on the CPU, dispatch + kernel launch on a GPU."""
    x = torch.ones(1, device=device)

    def tiny():
        return x.add_(1.0)

    number = timing.calibrate_number(tiny, device=device, target_s=2e-3)
    t = timing.measure(tiny, device=device, repeats=repeats, warmup=2, number=number)
    return t.figure(lambda s: s * 1e6)


def quant_ops(device: torch.device, elements: int, *, repeats: int, clients: int = 10) -> dict:
    """The fedhq_kernels ops in logical GB/s (each tensor read or written once):
    fake_quant with a given scale (8 B/element), fake_quant with the observed range
    (8 B/element; the range pass is not counted), quantize (5 B/element), and
    aggregate over ``clients`` int8 updates of ``elements // clients`` each
    (clients + 1 bytes per element)."""
    gen = torch.Generator().manual_seed(3)
    x = timing.randn_nonzero((elements,), generator=gen, device=device)
    scale = float(x.abs().max()) / 127
    per_client = max(1, elements // clients)
    updates = [fk.quantize(timing.randn_nonzero((per_client,), generator=gen, device=device)) for _ in range(clients)]
    weights = [float(k + 1) for k in range(clients)]
    cases = {
        "fake_quant": (lambda: fk.fake_quant(x, scale, 0), 8 * elements),
        "fake_quant_observed": (lambda: fk.fake_quant(x), 8 * elements),
        "quantize": (lambda: fk.quantize(x), 5 * elements),
        "aggregate": (lambda: fk.aggregate(updates, weights), (clients + 1) * per_client),
    }
    out = {}
    for name, (fn, nbytes) in cases.items():
        t = timing.measure(fn, device=device, repeats=repeats, warmup=2)
        out[name] = t.figure(_gbps(nbytes), bytes=nbytes)
    return out


def small_op_latency(device: torch.device, *, repeats: int) -> dict:
    """Microseconds per fake_quant call on a 1024-element tensor with a given scale:
    what a small layer pays per quantization, mostly per-call overhead."""
    small = timing.randn_nonzero((1024,), generator=torch.Generator().manual_seed(4), device=device)

    def call():
        return fk.fake_quant(small, 0.02, 0)

    number = timing.calibrate_number(call, device=device, target_s=2e-3)
    return timing.measure(call, device=device, repeats=repeats, warmup=2, number=number).figure(lambda s: s * 1e6)


def default_sizes(device: torch.device, quick: bool) -> dict:
    """Sizes that fill the device: bandwidth buffers of 4x the last-level cache (at
    least 64 MiB, at most 1/16 of the device's memory), matmuls large enough to be
    compute-bound."""
    cache = timing.cache_bytes(device)
    memory, _ = timing.device_memory_bytes(device)
    nbytes = int(min(max(64 << 20, 4 * cache), memory // 16))
    if device.type == "cuda":
        n, low_n = (4096, 4096) if quick else (8192, 8192)
        elements = (16 << 20) if quick else (64 << 20)
    else:
        n, low_n = (512, 128) if quick else (1024, 256)
        elements = (4 << 20) if quick else (16 << 20)
    return {"bandwidth_bytes": nbytes, "matmul_n": n, "matmul_low_precision_n": low_n, "quant_elements": elements}


def run_micro(
    device: torch.device, *, quick: bool, repeats: int, sizes: dict | None = None, log=lambda s: None
) -> dict:
    """All micro-benchmarks; ``sizes`` overrides entries of ``default_sizes`` (tests use
    small ones: the figures are then cache, not memory, figures)."""
    sizes = {**default_sizes(device, quick), **(sizes or {})}
    log(f"bandwidth ({sizes['bandwidth_bytes'] / 2**20:.0f} MiB) ...")
    figures = bandwidth(device, sizes["bandwidth_bytes"], repeats=repeats)
    log(f"matmul (n = {sizes['matmul_n']}) ...")
    figures["matmul_tflops"] = matmul_throughput(
        device, sizes["matmul_n"], repeats=max(3, repeats // 2), low_precision_n=sizes["matmul_low_precision_n"]
    )
    log("launch overhead ...")
    figures["launch_overhead_us"] = launch_overhead(device, repeats=repeats)
    log(f"quantization ops ({sizes['quant_elements'] / 2**20:.0f}M elements) ...")
    figures["quant_ops_gbps"] = quant_ops(device, sizes["quant_elements"], repeats=repeats)
    figures["fake_quant_small_latency_us"] = small_op_latency(device, repeats=repeats)
    figures["sizes"] = sizes
    if any(math.isnan(v["median"]) for v in figures.values() if isinstance(v, dict) and "median" in v):
        raise RuntimeError("profile: a micro-benchmark produced NaN")
    return figures
