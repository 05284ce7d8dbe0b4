"""The timing harness of the profile and the benchmarks: ``measure`` (warm-up, then
repeats timed by CUDA events or ``perf_counter``; median and spread as a ``Timing``),
``measure_interleaved``, rotating non-zero inputs, and memory sampling
(``heap_bytes``: glibc mallinfo2 on the CPU). See docs/profile.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Timing:
    """Seconds per call: median and spread over ``repeats`` repeats of ``number`` calls."""

    median_s: float
    p10_s: float
    p90_s: float
    min_s: float
    max_s: float
    repeats: int
    number: int
    warmup: int

    @classmethod
    def from_samples(cls, seconds: Sequence[float], *, number: int = 1, warmup: int = 0) -> Timing:
        if not seconds:
            raise ValueError("Timing: no samples")
        s = sorted(seconds)
        if len(s) > 1:
            deciles = statistics.quantiles(s, n=10, method="inclusive")
            p10, p90 = deciles[0], deciles[-1]
        else:
            p10 = p90 = s[0]
        return cls(statistics.median(s), p10, p90, s[0], s[-1], len(s), number, warmup)

    @property
    def spread(self) -> float:
        """(p90 - p10) / median: the relative width of the middle 80%."""
        return (self.p90_s - self.p10_s) / self.median_s if self.median_s > 0 else math.inf

    def figure(self, transform: Callable[[float], float] | None = None, **extra) -> dict[str, Any]:
        """The profile's figure format: {median, p10, p90, repeats}. ``transform`` maps
        seconds to the figure's unit (e.g. bytes / s / 1e9 for GB/s); a decreasing one
        (a rate) swaps p10 and p90 so that p10 <= median <= p90 still holds."""
        f = transform or (lambda s: s)
        lo, mid, hi = f(self.p10_s), f(self.median_s), f(self.p90_s)
        lo, hi = min(lo, hi), max(lo, hi)
        return {"median": mid, "p10": lo, "p90": hi, "repeats": self.repeats, **extra}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def synchronize(device: torch.device | str) -> None:
    """Waits for queued work on ``device`` (no-op on the CPU, where ops are synchronous)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fn: Callable[..., object],
    *,
    device: torch.device | str = "cpu",
    repeats: int = 10,
    warmup: int = 2,
    number: int = 1,
    inputs: Sequence[object] | None = None,
) -> Timing:
    """Seconds per call of ``fn``. With ``inputs``, call k gets ``inputs[k % len]``
    (rotating inputs, see ``rotating_inputs``); otherwise ``fn()``. ``warmup`` calls
    run first and are not timed. Each of the ``repeats`` samples times ``number``
    consecutive calls (raise ``number`` for ops of a few microseconds, or use
    ``calibrate_number``)."""
    if repeats < 1 or number < 1 or warmup < 0:
        raise ValueError(f"measure: need repeats >= 1, number >= 1, warmup >= 0; got {repeats}, {number}, {warmup}")
    device = torch.device(device)
    if inputs is not None and len(inputs) == 0:
        raise ValueError("measure: inputs is empty")
    calls = 0

    def call():
        nonlocal calls
        out = fn(inputs[calls % len(inputs)]) if inputs is not None else fn()
        calls += 1
        return out

    for _ in range(warmup):
        call()
    synchronize(device)
    samples: list[float] = []
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for start, end in events:
            start.record()
            for _ in range(number):
                call()
            end.record()
        torch.cuda.synchronize(device)
        samples = [start.elapsed_time(end) * 1e-3 / number for start, end in events]
    else:
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(number):
                out = call()
            elapsed = time.perf_counter() - start
            del out  # freed outside the timed region (a large output's munmap is not billed)
            samples.append(elapsed / number)
    return Timing.from_samples(samples, number=number, warmup=warmup)


def measure_interleaved(
    fns: dict[str, Callable[..., object]],
    *,
    device: torch.device | str = "cpu",
    repeats: int = 10,
    warmup: int = 2,
    inputs: Sequence[object] | None = None,
) -> dict[str, Timing]:
    """Like ``measure`` for several functions, round-robin: repeat r times one call of
    each function in turn, so drift and bursts of load on a shared machine fall on all
    of them alike and their ratios stay meaningful. Returns a Timing per name."""
    if repeats < 1 or warmup < 0 or not fns:
        raise ValueError(
            f"measure_interleaved: need functions, repeats >= 1, warmup >= 0; got {len(fns)}, {repeats}, {warmup}"
        )
    device = torch.device(device)
    n_inputs = len(inputs) if inputs is not None else 0
    if inputs is not None and n_inputs == 0:
        raise ValueError("measure_interleaved: inputs is empty")
    calls = 0

    def call(fn):
        nonlocal calls
        out = fn(inputs[calls % n_inputs]) if inputs is not None else fn()
        calls += 1
        return out

    for fn in fns.values():
        for _ in range(warmup):
            call(fn)
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                call(fn)
                end.record()
                end.synchronize()
                samples[name].append(start.elapsed_time(end) * 1e-3)
            else:
                start_s = time.perf_counter()
                out = call(fn)
                samples[name].append(time.perf_counter() - start_s)
                del out
    return {name: Timing.from_samples(s, number=1, warmup=warmup) for name, s in samples.items()}


def warm_up_clocks(fn: Callable[[], object], *, device: torch.device | str, seconds: float = 0.5) -> None:
    """Runs ``fn`` for about ``seconds`` on a GPU (no-op on the CPU): an idle GPU's clocks
    are low (an H200 idles at a sixth of its boost clock), and whatever is timed first
    would be slowed down by them."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(20):
            fn()
        torch.cuda.synchronize(device)


def calibrate_number(
    fn: Callable[[], object], *, device: torch.device | str = "cpu", target_s: float = 2e-3, cap: int = 100_000
) -> int:
    """Calls per repeat so that one repeat lasts about ``target_s`` (timer resolution
    and call overhead then stay below the noise): doubles until it does. One untimed
    call first, so lazy initialization does not count."""
    fn()
    number = 1
    while number < cap:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(number):
            fn()
        synchronize(device)
        if time.perf_counter() - start >= target_s:
            break
        number *= 2
    return number


# ---- caches and rotating inputs ----


def _parse_size(text: str) -> int:
    text = text.strip().upper()
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text and text[-1] in units else int(text)


def cache_bytes(device: torch.device | str = "cpu") -> int:
    """Size of the last-level cache of ``device`` (CUDA: L2; CPU: the largest cache
    sysfs reports for cpu0; 32 MiB when unknown)."""
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 0) or 50 << 20)
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            try:
                with open(os.path.join(base, entry, "size")) as f:
                    best = max(best, _parse_size(f.read()))
            except (OSError, ValueError):
                continue
    except OSError:
        pass
    return best or 32 << 20


def rotating_inputs(
    make: Callable[[int], object], nbytes_each: int, *, device: torch.device | str = "cpu", max_copies: int = 16
) -> list:
    """Distinct inputs ``make(0), make(1), ...``: enough that together they span twice
    the last-level cache (so each call finds its input evicted), when one input would
    fit in it; a single input otherwise. At most ``max_copies``."""
    if nbytes_each <= 0:
        raise ValueError(f"rotating_inputs: nbytes_each must be > 0, got {nbytes_each}")
    cache = cache_bytes(device)
    copies = 1 if nbytes_each >= cache else min(max_copies, math.ceil(2 * cache / nbytes_each))
    return [make(k) for k in range(copies)]


def randn_nonzero(shape, *, generator: torch.Generator | None = None, device="cpu", dtype=torch.float32):
    """Standard normal values with no exact zeros (timing on zeros can flatter a
    kernel: denormal-free, branch-predictable, sometimes short-cut)."""
    x = torch.randn(shape, generator=generator, dtype=torch.float32)
    x = torch.where(x == 0, torch.full_like(x, 0.5), x)
    return x.to(device=device, dtype=dtype)


# ---- memory ----


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _load_mallinfo2():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    fn.argtypes = []
    return fn


_MALLINFO2 = _load_mallinfo2()


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def heap_method() -> str:
    """How ``heap_bytes`` measures: 'mallinfo2' (live malloc bytes, exact for what
    torch's CPU allocator holds) or 'rss' (resident set size: includes freed memory
    the allocator keeps, and page-granular)."""
    return "mallinfo2" if _MALLINFO2 is not None else "rss"


def heap_bytes() -> int:
    """Bytes this process currently holds from malloc (glibc ``mallinfo2``:
    ``uordblks + hblkhd``), or its RSS where mallinfo2 is unavailable."""
    if _MALLINFO2 is not None:
        info = _MALLINFO2()
        return int(info.uordblks + info.hblkhd)
    return _rss_bytes()


def process_rss_bytes() -> int:
    """Resident set size of this process (the runtime's own footprint)."""
    return _rss_bytes()


def device_memory_bytes(device: torch.device | str = "cpu") -> tuple[int, str]:
    """Total memory of ``device`` and where the number comes from (CPU: physical
    memory, or the cgroup limit when lower)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory), "torch.cuda.get_device_properties"
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    source = "physical memory (sysconf)"
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < total:
            total, source = int(text), f"cgroup limit ({path})"
        break
    return int(total), source
