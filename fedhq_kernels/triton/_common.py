"""What every Triton op family shares: the exact per-element math (the Triton twin of
csrc/quant_math.h), the 2-D tiling of a tensor into quantization segments (FLAT, ROW,
COL), the range observer, the elementwise kernels and the host-side launch helpers.
Why the math is exact and how tiles are laid out: docs/kernels.md.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fedhq_kernels import qparams, reference

# Set (by tests/conftest.py, say) before this module is imported: @triton.jit reads it
# when the kernels are defined.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

FLAT = tl.constexpr(0)
ROW = tl.constexpr(1)
COL = tl.constexpr(2)
INF = tl.constexpr(float("inf"))
SCALE_EPS = tl.constexpr(qparams.SCALE_EPS)  # float32 eps: MinMaxObserver's smallest scale
SCALE_MAX = tl.constexpr(qparams.FLOAT32_MAX)  # float32's max: the largest affine scale
ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23

if INTERPRET:
    # Measured here (2 cores): ~1 ms per program instance and per nested @jit call,
    # ~0.1 ms per operation on a 64K-element block, so few, large tiles.
    BLOCK = 1 << 16
    NUM_WARPS = 4  # ignored by the interpreter
else:
    # Not yet measured on a GPU (none was lent to this work): 4096 elements over 8
    # warps is 16 float32 per thread, four 16-byte loads in flight per thread, the
    # usual choice for streaming kernels on A100/H100. bench/ should confirm or retune.
    BLOCK = 4096
    NUM_WARPS = 8
# Pass 1 of the observer loops over tiles and ends with one float atomic min / max per
# row or column of its tile (exact and order-independent, hence deterministic). It
# runs about this many programs per SM, so a 64M-element tensor costs ~500 atomics on
# an H100 rather than one per tile (16K).
PROGRAMS_PER_SM = 4
FINALIZE_BLOCK = 1 << 16 if INTERPRET else 1024
# Observed ops on tensors up to this size run as one program (observe_small): one
# launch instead of four (memset, range, qparams, write), which is what small tensors
# pay for on a GPU. Under the interpreter one tile, so the tests' larger tensors still
# take (and test) the general multi-program path.
SMALL_NUMEL = BLOCK if INTERPRET else 4 * BLOCK


# ---------------------------------------------------------------------------------
# Per-element math (csrc/quant_math.h)
# ---------------------------------------------------------------------------------


@triton.jit
def round_half_even(v):
    """Round half to even, as torch.round / std::nearbyint. Exact for |v| < 2^22:
    adding 1.5 * 2^23 leaves no fraction bits, so the add itself rounds (needs
    enable_fp_fusion=False and no fast-math; callers saturate v first)."""
    return (v + ROUND_MAGIC) - ROUND_MAGIC


@triton.jit
def unclamped_code(x, inv_scale, zero_point, qmin, qmax):
    """zero_point + round(x * inv_scale) in float32, x * inv_scale saturated to
    [qmin - zp - 1, qmax - zp + 1] first (a NaN input lands on qmin - 1, as PyTorch)."""
    v = x * inv_scale
    lo = qmin - zero_point - 1.0
    hi = qmax - zero_point + 1.0
    v = tl.where(v > lo, v, lo)  # NaN -> lo
    v = tl.where(v < hi, v, hi)
    return round_half_even(v) + zero_point


@triton.jit
def clamp_code(code, qmin, qmax):
    return tl.minimum(tl.maximum(code, qmin), qmax)


@triton.jit
def load_f32(ptr, offs, mask, BF16: tl.constexpr):
    """Loads float32 / float16 values, or bfloat16 passed as its int16 bit patterns."""
    if BF16:
        bits = tl.load(ptr + offs, mask=mask, other=0).to(tl.uint16, bitcast=True).to(tl.uint32)
        v = (bits << 16).to(tl.float32, bitcast=True)
    else:
        v = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return v


@triton.jit
def store_f32(ptr, offs, v, mask, BF16: tl.constexpr):
    """Stores float32 values as the pointer's type, rounding half to even; bfloat16
    goes to int16 bit patterns with csrc/quant_math.h's integer rounding (the
    interpreter's own float32 -> bfloat16 cast truncates)."""
    if BF16:
        u = v.to(tl.uint32, bitcast=True)
        rounded = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
        nan = (u & 0x7FFFFFFF) > 0x7F800000
        bits = tl.where(nan, (u >> 16) | 0x40, rounded)
        tl.store(ptr + offs, bits.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    else:
        tl.store(ptr + offs, v.to(ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------
# Tiles and per-tile quantization parameters
# ---------------------------------------------------------------------------------


@triton.jit
def tile_offsets(rb, cb, nrows, ncols, MODE: tl.constexpr, BR: tl.constexpr, BW: tl.constexpr, EVEN: tl.constexpr):
    """Element offsets [BR, BW] (int64) of tile (rb, cb) and their mask. EVEN (FLAT
    only): the tile is full, so the mask is a constant and, with offsets pid * BW +
    arange that the compiler knows are aligned, loads and stores become 16-byte vector
    accesses whatever numel is (a masked FLAT tile vectorizes only when numel % 16 == 0)."""
    r = tl.arange(0, BR)
    c = tl.arange(0, BW)
    if MODE == FLAT:  # BR == 1
        offs = tl.cast(cb, tl.int64) * BW + c[None, :]
        if EVEN:
            mask = tl.full([1, BW], 1, tl.int1)
        else:
            mask = offs < ncols
    else:
        # r * ncols fits in int32: BR > 1 only when ncols <= BW, and BR * BW <= BLOCK
        offs = (tl.cast(rb, tl.int64) * BR * ncols + tl.cast(cb, tl.int64) * BW) + (r[:, None] * ncols + c[None, :])
        mask = ((rb * BR + r) < nrows)[:, None] & ((cb * BW + c) < ncols)[None, :]
    return offs, mask


@triton.jit
def tile_qparams(scale_ptr, zp_ptr, rb, cb, nrows, ncols, C, MODE: tl.constexpr, BR: tl.constexpr, BW: tl.constexpr):
    """scale, 1 / scale (exact division, as torch.reciprocal) and zero point (float) of
    tile (rb, cb): scalars (FLAT), [BR, 1] (ROW: channel = row % C) or [1, BW] (COL:
    channel = column)."""
    if MODE == FLAT:
        scale = tl.load(scale_ptr)
        zero_point = tl.load(zp_ptr).to(tl.float32)
    elif MODE == ROW:
        rows = rb * BR + tl.arange(0, BR)
        ok = rows < nrows
        scale = tl.load(scale_ptr + rows % C, mask=ok, other=1.0)[:, None]
        zero_point = tl.load(zp_ptr + rows % C, mask=ok, other=0).to(tl.float32)[:, None]
    else:
        cols = cb * BW + tl.arange(0, BW)
        ok = cols < ncols
        scale = tl.load(scale_ptr + cols, mask=ok, other=1.0)[None, :]
        zero_point = tl.load(zp_ptr + cols, mask=ok, other=0).to(tl.float32)[None, :]
    inv_scale = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
    return scale, inv_scale, zero_point


@triton.jit
def observe_values(v, lo, hi):
    """Folds values into running elementwise min / max; a NaN becomes -inf / +inf so the
    non-finite check downstream sees it (tl.minimum ignores NaN on the GPU)."""
    ok = v == v
    lo = tl.minimum(lo, tl.where(ok, v, -INF))
    hi = tl.maximum(hi, tl.where(ok, v, INF))
    return lo, hi


@triton.jit
def observe_tile(
    x_ptr,
    rb,
    cb,
    nrows,
    ncols,
    lo,
    hi,
    MODE: tl.constexpr,
    BR: tl.constexpr,
    BW: tl.constexpr,
    BF16: tl.constexpr,
    EVEN: tl.constexpr,
):
    offs, mask = tile_offsets(rb, cb, nrows, ncols, MODE, BR, BW, EVEN)
    return observe_values(load_f32(x_ptr, offs, mask, BF16), lo, hi)


@triton.jit
def observe_tiles(
    x_ptr,
    a,
    start,
    end,
    nrows,
    ncols,
    lo,
    hi,
    MODE: tl.constexpr,
    BR: tl.constexpr,
    BW: tl.constexpr,
    BF16: tl.constexpr,
):
    """Observes tiles start..end-1 along the loop dimension (columns for FLAT / ROW,
    rows for COL) of row / column block a. FLAT peels the one partial tile off the
    loop so the others run unmasked."""
    if MODE == COL:
        for i in range(start, end):
            lo, hi = observe_tile(x_ptr, i, a, nrows, ncols, lo, hi, MODE, BR, BW, BF16, False)
    elif MODE == ROW:
        for i in range(start, end):
            lo, hi = observe_tile(x_ptr, a, i, nrows, ncols, lo, hi, MODE, BR, BW, BF16, False)
    else:
        full = tl.minimum(end, ncols // BW)
        for i in range(start, full):
            lo, hi = observe_tile(x_ptr, 0, i, nrows, ncols, lo, hi, MODE, BR, BW, BF16, True)
        for i in range(tl.maximum(start, full), end):
            lo, hi = observe_tile(x_ptr, 0, i, nrows, ncols, lo, hi, MODE, BR, BW, BF16, False)
    return lo, hi


# ---------------------------------------------------------------------------------
# Pass 1 of the observed ops: per-segment range of one tensor
# ---------------------------------------------------------------------------------


@triton.jit
def _range_kernel(
    x_ptr, lo_ptr, hi_ptr, nrows, ncols, C, MODE: tl.constexpr, BR: tl.constexpr, BW: tl.constexpr, BF16: tl.constexpr
):
    """Grid (A, splits): program (a, s) owns row block a (FLAT / ROW) or column block a
    (COL) and loops over its share s of the other dimension's blocks, keeping an
    elementwise min / max; then it reduces the tile and folds the result into
    lo_ptr / hi_ptr [C] with float atomics.

    lo / hi start at 0, and masked lanes load 0: harmless, since MinMaxObserver widens
    every range to include 0 before using it (min(lo, 0), max(hi, 0))."""
    a = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    if MODE == COL:
        n_loop = tl.cdiv(nrows, BR)
    else:
        n_loop = tl.cdiv(ncols, BW)
    per = tl.cdiv(n_loop, splits)
    start = split * per
    end = tl.minimum(start + per, n_loop)
    lo = tl.zeros([BR, BW], tl.float32)
    hi = tl.zeros([BR, BW], tl.float32)
    lo, hi = observe_tiles(x_ptr, a, start, end, nrows, ncols, lo, hi, MODE, BR, BW, BF16)
    if MODE == FLAT:
        tl.atomic_min(lo_ptr, tl.min(lo), sem="relaxed")
        tl.atomic_max(hi_ptr, tl.max(hi), sem="relaxed")
    elif MODE == ROW:
        rows = a * BR + tl.arange(0, BR)
        ok = rows < nrows
        tl.atomic_min(lo_ptr + rows % C, tl.min(lo, axis=1), mask=ok, sem="relaxed")
        tl.atomic_max(hi_ptr + rows % C, tl.max(hi, axis=1), mask=ok, sem="relaxed")
    else:
        cols = a * BW + tl.arange(0, BW)
        ok = cols < ncols
        tl.atomic_min(lo_ptr + cols, tl.min(lo, axis=0), mask=ok, sem="relaxed")
        tl.atomic_max(hi_ptr + cols, tl.max(hi, axis=0), mask=ok, sem="relaxed")


# ---------------------------------------------------------------------------------
# Observed range -> scale / zero point (MinMaxObserver), and the non-finite flag
# ---------------------------------------------------------------------------------


@triton.jit
def qparams_from_range(lo, hi, qmin, qmax, half_range, span, SYMMETRIC: tl.constexpr):
    """fedhq_kernels.qparams.qparams_from_range: float32 scale and int32 zero point of observed
    ranges, the same float32 operations in the same order (divisions exact)."""
    lo_neg = tl.minimum(lo, 0.0)
    hi_pos = tl.maximum(hi, 0.0)
    if SYMMETRIC:
        magnitude = tl.maximum(-lo_neg, hi_pos)
        scale = tl.maximum(tl.math.div_rn(magnitude, tl.full(lo.shape, half_range, tl.float32)), SCALE_EPS)
        zero_point = tl.zeros(lo.shape, tl.int32)
    else:
        span_t = tl.full(lo.shape, span, tl.float32)
        width = hi_pos - lo_neg
        # a range wider than float32's max is divided piecewise; the scale is capped at that max
        wide = tl.math.div_rn(hi_pos, span_t) - tl.math.div_rn(lo_neg, span_t)
        scale = tl.where(width < INF, tl.math.div_rn(width, span_t), wide)
        scale = tl.minimum(tl.maximum(scale, SCALE_EPS), SCALE_MAX)
        # |lo_neg / scale| <= span (+ rounding), well inside the rounding trick's 2^22
        zp = qmin - round_half_even(tl.math.div_rn(lo_neg, scale))
        zero_point = clamp_code(zp, qmin, qmax).to(tl.int32)
    return scale, zero_point


@triton.jit
def range_is_finite(lo, hi):
    return (tl.abs(lo) < INF) & (tl.abs(hi) < INF)


@triton.jit
def _qparams_kernel(
    lo_ptr,
    hi_ptr,
    scale_ptr,
    zp_ptr,
    seg_tensor_ptr,
    flag_ptr,
    S,
    T,
    qmin,
    qmax,
    half_range,
    span,
    SYMMETRIC: tl.constexpr,
    PER_TENSOR_TABLE: tl.constexpr,
    BS: tl.constexpr,
):
    """Scales and zero points of segments [pid * BS, ...). A segment whose range is not
    finite (the observer turned NaN into -inf) marks its tensor t in flag_ptr as
    max(T - t): the host reads back the first bad tensor. seg_tensor_ptr maps segment
    -> tensor when PER_TENSOR_TABLE (aggregate); otherwise all belong to tensor 0."""
    seg = tl.program_id(0) * BS + tl.arange(0, BS)
    ok = seg < S
    lo = tl.load(lo_ptr + seg, mask=ok, other=0.0)
    hi = tl.load(hi_ptr + seg, mask=ok, other=0.0)
    bad = ok & ~range_is_finite(lo, hi)
    if PER_TENSOR_TABLE:
        tensor = tl.load(seg_tensor_ptr + seg, mask=ok, other=0).to(tl.int32)
    else:
        tensor = tl.zeros([BS], tl.int32)
    tl.atomic_max(flag_ptr + tl.zeros([BS], tl.int32), T - tensor, mask=bad, sem="relaxed")
    scale, zero_point = qparams_from_range(lo, hi, qmin, qmax, half_range, span, SYMMETRIC)
    tl.store(scale_ptr + seg, scale, mask=ok)
    tl.store(zp_ptr + seg, zero_point, mask=ok)


@triton.jit
def observe_small(
    x_ptr,
    scale_ptr,
    zp_ptr,
    flag_ptr,
    nrows,
    ncols,
    qmin,
    qmax,
    half_range,
    span,
    MODE: tl.constexpr,
    BR: tl.constexpr,
    BW: tl.constexpr,
    BF16: tl.constexpr,
    SYMMETRIC: tl.constexpr,
):
    """The observer for a tensor one program can handle alone (View.small_tile): every
    channel on one side of the tile (FLAT: one; ROW: rows == channels <= BR; COL:
    columns == channels <= BW), looping over the other side. Stores scale, zero point
    and the non-finite flag (0 / 1, no memset needed) and returns (scale, 1 / scale,
    zero point) shaped to broadcast against tiles. Saves the general path's memset,
    qparams launch and atomics: small tensors are latency-bound."""
    if MODE == COL:
        n_loop = tl.cdiv(nrows, BR)
    else:
        n_loop = tl.cdiv(ncols, BW)
    lo = tl.zeros([BR, BW], tl.float32)
    hi = tl.zeros([BR, BW], tl.float32)
    lo, hi = observe_tiles(x_ptr, 0, 0, n_loop, nrows, ncols, lo, hi, MODE, BR, BW, BF16)
    if MODE == FLAT:
        lo_c = tl.min(lo)
        hi_c = tl.max(hi)
        scale, zero_point = qparams_from_range(lo_c, hi_c, qmin, qmax, half_range, span, SYMMETRIC)
        tl.store(scale_ptr, scale)
        tl.store(zp_ptr, zero_point)
        tl.store(flag_ptr, (~range_is_finite(lo_c, hi_c)).to(tl.int32))
        inv_scale = tl.math.div_rn(tl.full([], 1.0, tl.float32), scale)
        zero_point = zero_point.to(tl.float32)
    elif MODE == ROW:
        scale, inv_scale, zero_point = _store_channel_qparams(
            tl.min(lo, axis=1),
            tl.max(hi, axis=1),
            scale_ptr,
            zp_ptr,
            flag_ptr,
            nrows,
            qmin,
            qmax,
            half_range,
            span,
            SYMMETRIC,
            BR,
        )
        scale, inv_scale, zero_point = scale[:, None], inv_scale[:, None], zero_point[:, None]
    else:
        scale, inv_scale, zero_point = _store_channel_qparams(
            tl.min(lo, axis=0),
            tl.max(hi, axis=0),
            scale_ptr,
            zp_ptr,
            flag_ptr,
            ncols,
            qmin,
            qmax,
            half_range,
            span,
            SYMMETRIC,
            BW,
        )
        scale, inv_scale, zero_point = scale[None, :], inv_scale[None, :], zero_point[None, :]
    return scale, inv_scale, zero_point, n_loop


@triton.jit
def _store_channel_qparams(
    lo_c, hi_c, scale_ptr, zp_ptr, flag_ptr, n, qmin, qmax, half_range, span, SYMMETRIC: tl.constexpr, CH: tl.constexpr
):
    """observe_small's per-channel end: scale and zero point of channels 0..n-1 from
    their ranges [CH], stored with the non-finite flag; returns (scale, 1 / scale, float
    zero point)."""
    ch = tl.arange(0, CH)
    scale, zero_point = qparams_from_range(lo_c, hi_c, qmin, qmax, half_range, span, SYMMETRIC)
    tl.store(scale_ptr + ch, scale, mask=ch < n)
    tl.store(zp_ptr + ch, zero_point, mask=ch < n)
    tl.store(flag_ptr, tl.max((~range_is_finite(lo_c, hi_c)).to(tl.int32)))
    inv_scale = tl.math.div_rn(tl.full([CH], 1.0, tl.float32), scale)
    return scale, inv_scale, zero_point.to(tl.float32)


# ---------------------------------------------------------------------------------
# The elementwise ops' tiles and programs (fake_quant.py, quantize.py)
# ---------------------------------------------------------------------------------

FAKE_QUANT = tl.constexpr(0)
FAKE_QUANT_BACKWARD = tl.constexpr(1)
QUANTIZE = tl.constexpr(2)
DEQUANTIZE = tl.constexpr(3)


@triton.jit
def elementwise_tile(
    a_ptr,
    b_ptr,
    out_ptr,
    q,
    dims,
    rb,
    cb,
    KIND: tl.constexpr,
    MODE: tl.constexpr,
    BR: tl.constexpr,
    BW: tl.constexpr,
    BF16: tl.constexpr,
    EVEN: tl.constexpr,
):
    """Tile (rb, cb) of op KIND: out = fake_quant(a), quantize(a) (int8 codes),
    dequantize(a) (a: int8 codes), or a * mask(b) (the backward: a = grad, b = x).
    q = (scale, inv_scale, zero point), dims = (nrows, ncols, qmin, qmax)."""
    scale, inv_scale, zero_point = q
    nrows, ncols, qmin, qmax = dims
    offs, mask = tile_offsets(rb, cb, nrows, ncols, MODE, BR, BW, EVEN)
    if KIND == DEQUANTIZE:
        code = tl.load(a_ptr + offs, mask=mask, other=0).to(tl.float32)
        store_f32(out_ptr, offs, (code - zero_point) * scale, mask, BF16)
    elif KIND == FAKE_QUANT_BACKWARD:
        code = unclamped_code(load_f32(b_ptr, offs, mask, BF16), inv_scale, zero_point, qmin, qmax)
        inside = ((code >= qmin) & (code <= qmax)).to(tl.float32)
        # grad * mask as PyTorch computes it: a NaN gradient stays NaN even where masked
        store_f32(out_ptr, offs, load_f32(a_ptr, offs, mask, BF16) * inside, mask, BF16)
    else:
        code = clamp_code(
            unclamped_code(load_f32(a_ptr, offs, mask, BF16), inv_scale, zero_point, qmin, qmax), qmin, qmax
        )
        if KIND == QUANTIZE:
            tl.store(out_ptr + offs, code.to(tl.int8), mask=mask)
        else:
            store_f32(out_ptr, offs, (code - zero_point) * scale, mask, BF16)


@triton.jit
def _elementwise_kernel(
    a_ptr,
    b_ptr,
    out_ptr,
    scale_ptr,
    zp_ptr,
    nrows,
    ncols,
    C,
    qmin,
    qmax,
    KIND: tl.constexpr,
    MODE: tl.constexpr,
    BR: tl.constexpr,
    BW: tl.constexpr,
    BF16: tl.constexpr,
):
    """Op KIND, one tile per program, with parameters from scale_ptr / zp_ptr (given,
    or observed by pass 1); FLAT runs its full tiles unmasked."""
    pid = tl.program_id(0)
    n_cb = tl.cdiv(ncols, BW)
    rb = pid // n_cb
    cb = pid % n_cb
    q = tile_qparams(scale_ptr, zp_ptr, rb, cb, nrows, ncols, C, MODE, BR, BW)
    dims = (nrows, ncols, qmin, qmax)
    if MODE == FLAT:
        if cb < ncols // BW:
            elementwise_tile(a_ptr, b_ptr, out_ptr, q, dims, rb, cb, KIND, MODE, BR, BW, BF16, True)
        else:
            elementwise_tile(a_ptr, b_ptr, out_ptr, q, dims, rb, cb, KIND, MODE, BR, BW, BF16, False)
    else:
        elementwise_tile(a_ptr, b_ptr, out_ptr, q, dims, rb, cb, KIND, MODE, BR, BW, BF16, False)


@triton.jit
def _observed_small_kernel(
    x_ptr,
    out_ptr,
    scale_ptr,
    zp_ptr,
    flag_ptr,
    nrows,
    ncols,
    qmin,
    qmax,
    half_range,
    span,
    KIND: tl.constexpr,
    MODE: tl.constexpr,
    BR: tl.constexpr,
    BW: tl.constexpr,
    BF16: tl.constexpr,
    SYMMETRIC: tl.constexpr,
):
    """Observer and writer (fake_quant or quantize) in one program, for tensors of
    View.small_tile."""
    scale, inv_scale, zero_point, n_loop = observe_small(
        x_ptr, scale_ptr, zp_ptr, flag_ptr, nrows, ncols, qmin, qmax, half_range, span, MODE, BR, BW, BF16, SYMMETRIC
    )
    q, dims = (scale, inv_scale, zero_point), (nrows, ncols, qmin, qmax)
    if MODE == COL:
        for i in range(n_loop):
            elementwise_tile(x_ptr, x_ptr, out_ptr, q, dims, i, 0, KIND, MODE, BR, BW, BF16, False)
    elif MODE == ROW:
        for i in range(n_loop):
            elementwise_tile(x_ptr, x_ptr, out_ptr, q, dims, 0, i, KIND, MODE, BR, BW, BF16, False)
    else:
        full = ncols // BW
        for i in range(full):
            elementwise_tile(x_ptr, x_ptr, out_ptr, q, dims, 0, i, KIND, MODE, BR, BW, BF16, True)
        for i in range(full, n_loop):
            elementwise_tile(x_ptr, x_ptr, out_ptr, q, dims, 0, i, KIND, MODE, BR, BW, BF16, False)


# ---------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@dataclass(frozen=True)
class View:
    """A contiguous tensor as a [nrows, ncols] matrix of quantization segments."""

    mode: int  # FLAT, ROW or COL
    nrows: int
    ncols: int
    channels: int  # C: segments (1 per-tensor)
    numel: int

    @staticmethod
    def of(shape, axis: int) -> View:
        numel = 1
        for s in shape:
            numel *= int(s)
        if axis < 0:
            return View(FLAT.value, 1, numel, 1, numel)
        outer = inner = 1
        for s in shape[:axis]:
            outer *= int(s)
        for s in shape[axis + 1 :]:
            inner *= int(s)
        channels = int(shape[axis])
        if inner == 1 and channels > 1:
            return View(COL.value, outer, channels, channels, numel)
        return View(ROW.value, outer * channels, inner, channels, numel)

    def tile(self, block: int | None = None) -> tuple[int, int]:
        """(BR, BW): the widest power-of-two row slice up to `block`, then as many rows
        as fit."""
        block = BLOCK if block is None else block
        bw = min(next_pow2(self.ncols), block)
        br = 1 if self.mode == FLAT.value else min(next_pow2(self.nrows), block // bw)
        return br, bw

    def tile_count(self, br: int, bw: int) -> tuple[int, int]:
        return triton.cdiv(self.nrows, br), triton.cdiv(self.ncols, bw)

    def small_tile(self) -> tuple[int, int] | None:
        """(BR, BW) when one program can observe and write the whole tensor (see
        observe_small), else None."""
        if not 0 < self.numel <= SMALL_NUMEL:
            return None
        if self.mode == FLAT.value:
            return 1, min(next_pow2(self.ncols), BLOCK)
        if self.mode == ROW.value and self.nrows == self.channels and next_pow2(self.nrows) * 16 <= BLOCK:
            br = next_pow2(self.nrows)  # per-channel along axis 0: a row per channel
            return br, min(next_pow2(self.ncols), BLOCK // br)
        if self.mode == COL.value and next_pow2(self.ncols) <= BLOCK:
            bw = next_pow2(self.ncols)
            return min(next_pow2(self.nrows), BLOCK // bw), bw
        return None


def launch(kernel, grid, *args, num_warps: int = NUM_WARPS, **constexprs) -> None:
    """Every launch goes through here: FP fusion off, or `x * inv + magic` becomes an
    FMA and codes change (docs/kernels.md, "Exactness")."""
    kernel[grid](*args, **constexprs, num_warps=num_warps, enable_fp_fusion=False)


def on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it t's."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def range_splits(device: torch.device, programs: int, n_loop: int) -> int:
    """How many programs share the reduction dimension in pass 1: enough to fill the
    GPU, no more (each ends with one atomic per row / column). One under the
    interpreter, where a program costs as much as a loop iteration."""
    if INTERPRET or device.type != "cuda":
        return 1
    target = PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(n_loop, triton.cdiv(target, max(programs, 1)), 65535))


def bf16_bits(t: torch.Tensor) -> torch.Tensor:
    """bfloat16 tensors travel as their int16 bit patterns (see store_f32)."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def check_range(op: str, quant_min: int, quant_max: int, int8: bool = False) -> None:
    """The same checks, and messages, as csrc/ops.cpp."""
    if not (quant_min < quant_max and quant_min >= -(1 << 15) and quant_max < (1 << 15)):
        raise ValueError(
            f"{op}: need -32768 <= quant_min < quant_max < 32768, got quant_min={quant_min}, quant_max={quant_max}"
        )
    if int8 and not (quant_min >= -128 and quant_max <= 127):
        raise ValueError(f"{op}: codes are stored as int8, got quant_min={quant_min}, quant_max={quant_max}")


def check_qparams(
    op: str, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int, quant_max: int, owner: str = "the"
) -> None:
    """Scales finite and > 0, zero points in range, with reference.check_qparams's
    messages. On a GPU this is one small device -> host read (a host sync): one flag
    for all values; only when it is set are the details read to name the culprit."""
    if scale.is_cuda:
        bad = (~(torch.isfinite(scale) & (scale > 0))).any() | (
            (zero_point < quant_min) | (zero_point > quant_max)
        ).any()
        if not bool(bad):  # the one device -> host read
            return
    reference.check_qparams(op, scale.cpu(), zero_point.cpu(), quant_min, quant_max, owner)


def raise_if_flagged(op: str, flag: torch.Tensor) -> None:
    """The observer's non-finite flag: one small device -> host read (a host sync on a
    GPU; launched after the write pass so the GPU never waits on the host)."""
    if int(flag.item()) != 0:
        raise ValueError(f"{op}: the input contains NaN or Inf, so its range cannot be observed")


def empty_qparams(x: torch.Tensor, view: View) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """scale [C], zero point [C] and the non-finite flag, for kernels that write all three."""
    C = view.channels
    return (
        torch.empty(C, dtype=torch.float32, device=x.device),
        torch.empty(C, dtype=torch.int32, device=x.device),
        torch.empty(1, dtype=torch.int32, device=x.device),
    )


def observe(
    op: str, x: torch.Tensor, view: View, symmetric: bool, quant_min: int, quant_max: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pass 1 of the observed ops plus the qparams kernel: returns scale and zero point
    ([C], float32 / int32, on x's device) and the non-finite flag (not read yet).

    Launches: one memset (range accumulators and flag in one buffer), the range kernel
    (skipped for empty tensors, whose range is [0, 0] as in the reference), and the
    tiny qparams kernel."""
    C = view.channels
    workspace = torch.zeros(2 * C + 1, dtype=torch.float32, device=x.device)
    lo, hi, flag = workspace[:C], workspace[C : 2 * C], workspace[2 * C :].view(torch.int32)
    scale = torch.empty(C, dtype=torch.float32, device=x.device)
    zero_point = torch.empty(C, dtype=torch.int32, device=x.device)
    if C == 0:
        return scale, zero_point, flag
    if view.numel > 0:
        br, bw = view.tile()
        n_rb, n_cb = view.tile_count(br, bw)
        programs, n_loop = (n_cb, n_rb) if view.mode == COL.value else (n_rb, n_cb)
        grid = (programs, range_splits(x.device, programs, n_loop))
        launch(
            _range_kernel,
            grid,
            bf16_bits(x),
            lo,
            hi,
            view.nrows,
            view.ncols,
            C,
            MODE=view.mode,
            BR=br,
            BW=bw,
            BF16=x.dtype == torch.bfloat16,
        )
    finalize_qparams(lo, hi, scale, zero_point, None, flag, 1, symmetric, quant_min, quant_max)
    return scale, zero_point, flag


def range_constants(quant_min: int, quant_max: int) -> tuple[float, float, float, float]:
    """qmin, qmax, (qmax - qmin) / 2 and qmax - qmin as the float32 kernel arguments."""
    return float(quant_min), float(quant_max), float((quant_max - quant_min) / 2), float(quant_max - quant_min)


def finalize_qparams(lo, hi, scale, zero_point, seg_tensor, flag, tensors, symmetric, quant_min, quant_max) -> None:
    S = scale.numel()
    if S == 0:
        return
    bs = min(next_pow2(S), FINALIZE_BLOCK)
    launch(
        _qparams_kernel,
        (triton.cdiv(S, bs),),
        lo,
        hi,
        scale,
        zero_point,
        lo if seg_tensor is None else seg_tensor,
        flag,
        S,
        tensors,
        *range_constants(quant_min, quant_max),
        SYMMETRIC=bool(symmetric),
        PER_TENSOR_TABLE=seg_tensor is not None,
        BS=bs,
        num_warps=4,
    )


def qparams_shape(x: torch.Tensor, axis: int) -> tuple[int, ...]:
    return () if axis < 0 else (x.shape[axis],)


def write_tiles(kind, view: View, a, b, out, scale, zero_point, quant_min, quant_max, bf16: bool) -> None:
    """Launches op ``kind`` (_elementwise_kernel), one program per tile; a, b and out
    have the same contiguous layout (b is read by the backward only)."""
    if view.numel == 0:
        return
    br, bw = view.tile()
    n_rb, n_cb = view.tile_count(br, bw)
    launch(
        _elementwise_kernel,
        (n_rb * n_cb,),
        a,
        b,
        out,
        scale,
        zero_point,
        view.nrows,
        view.ncols,
        view.channels,
        float(quant_min),
        float(quant_max),
        KIND=kind.value,
        MODE=view.mode,
        BR=br,
        BW=bw,
        BF16=bf16,
    )


def run_observed(
    op: str, kind, x: torch.Tensor, out: torch.Tensor, symmetric: bool, quant_min: int, quant_max: int, axis: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """fake_quant_observed / quantize (``kind``): observe x's range, then write ``out``
    with it, in one program (View.small_tile) or through observe and write_tiles.
    The non-finite flag is read once, after everything is queued. Returns the scale and
    zero point, shaped as the schema says."""
    view = View.of(x.shape, axis)
    bf16 = x.dtype == torch.bfloat16
    small = view.small_tile()
    with on_device(x):
        if small:
            scale, zero_point, flag = empty_qparams(x, view)
            launch(
                _observed_small_kernel,
                (1,),
                bf16_bits(x),
                bf16_bits(out),
                scale,
                zero_point,
                flag,
                view.nrows,
                view.ncols,
                *range_constants(quant_min, quant_max),
                KIND=kind.value,
                MODE=view.mode,
                BR=small[0],
                BW=small[1],
                BF16=bf16,
                SYMMETRIC=bool(symmetric),
            )
        else:
            scale, zero_point, flag = observe(op, x, view, symmetric, quant_min, quant_max)
            write_tiles(
                kind, view, bf16_bits(x), bf16_bits(x), bf16_bits(out), scale, zero_point, quant_min, quant_max, bf16
            )
    raise_if_flagged(op, flag)
    shape = qparams_shape(x, axis)
    return scale.view(shape), zero_point.view(shape)
