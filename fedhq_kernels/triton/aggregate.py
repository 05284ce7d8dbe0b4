"""The server's aggregation in Triton, whole models at once: two launches over every
tensor (range, then write), driven by small int64 tables built on the host, one
read-back at the end. Layout of the tables and the passes: docs/kernels.md,
"Triton aggregation"."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fedhq_kernels import reference
from fedhq_kernels.quantized_tensor import input_ranges
from fedhq_kernels.triton import _common as cm
from fedhq_kernels.triton._common import (
    COL,
    ROW,
    View,
    clamp_code,
    launch,
    observe_values,
    tile_offsets,
    unclamped_code,
)

# Tile [BR, BW] of the aggregate: one shape for every tensor of the model, so BW is
# moderate (a row of a per-channel conv weight, inner = Cin * 9, is 576..4608 wide).
AGG_BR, AGG_BW, AGG_WARPS = (16, 2048, 4) if cm.INTERPRET else (8, 256, 4)
_META = 8  # int64 fields per tensor in the meta table


@triton.jit
def _dequantized(code_ptrs, params_ptr, k, T, S, t, offs, mask, seg, seg_ok):
    """(q_k - zp_k) * s_k in float32: client k's values of the tile."""
    codes = tl.load(code_ptrs + k * T + t).to(tl.pointer_type(tl.int8))
    q = tl.load(codes + offs, mask=mask, other=0).to(tl.float32)
    packed = tl.load(params_ptr + k * S + seg, mask=seg_ok, other=0)  # (scale, zero point) as float32 bits
    scale = packed.to(tl.int32).to(tl.float32, bitcast=True)
    zero_point = (packed >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    return (q - zero_point) * scale


@triton.jit
def _blend(acc, values, fraction):
    """reference._blend: (1 - b) * acc + b * values in float32 (no FMA: launch())."""
    return (1.0 - fraction) * acc + fraction * values


@triton.jit
def _weighted_average(code_ptrs, params_ptr, w_ptr, K, T, S, t, offs, mask, seg, seg_ok):
    """The running weighted mean: acc = 0, then for each client k in order
    acc = _blend(acc, (q_k - zp_k) * s_k, b_k), in float32."""
    acc = tl.zeros(offs.shape, tl.float32)
    for k in range(K):
        values = _dequantized(code_ptrs, params_ptr, k, T, S, t, offs, mask, seg, seg_ok)
        acc = _blend(acc, values, tl.load(w_ptr + k))
    return acc


@triton.jit
def _trimmed_average(code_ptrs, params_ptr, K, T, S, t, offs, mask, seg, seg_ok, trim):
    """The unweighted trimmed mean of reference._trimmed_mean without a sort: walk the
    distinct values in ascending order (the next one is the least value above the last;
    its multiplicity fills that many ranks), adding those of ranks trim .. K - trim - 1
    one by one in float32."""
    acc = tl.zeros(offs.shape, tl.float32)
    last = tl.full(offs.shape, float("-inf"), tl.float32)
    below = tl.zeros(offs.shape, tl.int32)  # ranks filled so far
    for step in range(K):
        cur = tl.full(offs.shape, float("inf"), tl.float32)
        for k in range(K):
            v = _dequantized(code_ptrs, params_ptr, k, T, S, t, offs, mask, seg, seg_ok)
            cur = tl.where(((v > last) | (step == 0)) & (v < cur), v, cur)
        mult = tl.zeros(offs.shape, tl.int32)
        for k in range(K):
            v = _dequantized(code_ptrs, params_ptr, k, T, S, t, offs, mask, seg, seg_ok)
            mult += (v == cur).to(tl.int32)
        live = below < K
        for i in range(K):
            rank = below + i
            acc = tl.where(live & (i < mult) & (rank >= trim) & (rank < K - trim), acc + cur, acc)
        below = tl.where(live, below + mult, below)
        last = cur
    return tl.math.div_rn(acc, tl.full(offs.shape, 1.0, tl.float32) * (K - 2 * trim))


@triton.jit
def _aggregate_tile(
    ptrs,
    K,
    T,
    S,
    t,
    rb,
    cb,
    qmin,
    qmax,
    trim,
    IS_COL: tl.constexpr,
    WRITE: tl.constexpr,
    ROBUST: tl.constexpr,
    BR: tl.constexpr,
    BW: tl.constexpr,
):
    code_ptrs, params_ptr, w_ptr, meta_ptr, lo_ptr, hi_ptr, out_ptr, scale_ptr, zp_ptr = ptrs
    nrows = tl.load(meta_ptr + t * 8 + 1)
    ncols = tl.load(meta_ptr + t * 8 + 2)
    C = tl.load(meta_ptr + t * 8 + 3)
    seg_base = tl.load(meta_ptr + t * 8 + 4)
    rows = rb * BR + tl.arange(0, BR)
    cols = cb * BW + tl.arange(0, BW)
    if IS_COL:
        offs, mask = tile_offsets(rb, cb, nrows, ncols, COL, BR, BW, False)
        seg = seg_base + cols[None, :]
        seg_ok = (cols < ncols)[None, :]
    else:
        offs, mask = tile_offsets(rb, cb, nrows, ncols, ROW, BR, BW, False)
        seg = seg_base + (rows % C)[:, None]
        seg_ok = (rows < nrows)[:, None]
    mask = mask & (offs < tl.load(meta_ptr + t * 8 + 6))  # per-tensor matrices end mid-row
    if ROBUST:
        acc = _trimmed_average(code_ptrs, params_ptr, K, T, S, t, offs, mask, seg, seg_ok, trim)
    else:
        acc = _weighted_average(code_ptrs, params_ptr, w_ptr, K, T, S, t, offs, mask, seg, seg_ok)
    if WRITE:
        scale = tl.load(scale_ptr + seg, mask=seg_ok, other=1.0)
        zero_point = tl.load(zp_ptr + seg, mask=seg_ok, other=0).to(tl.float32)
        inv_scale = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
        code = clamp_code(unclamped_code(acc, inv_scale, zero_point, qmin, qmax), qmin, qmax)
        out_base = tl.load(meta_ptr + t * 8 + 5)
        tl.store(out_ptr + out_base + offs, code.to(tl.int8), mask=mask)
    else:
        # masked lanes count as 0, which the observer's widening to 0 makes harmless
        zeros = tl.zeros([BR, BW], tl.float32)
        lo, hi = observe_values(tl.where(mask, acc, 0.0), zeros, zeros)
        if IS_COL:
            ok = cols < ncols
            tl.atomic_min(lo_ptr + seg_base + cols, tl.min(lo, axis=0), mask=ok, sem="relaxed")
            tl.atomic_max(hi_ptr + seg_base + cols, tl.max(hi, axis=0), mask=ok, sem="relaxed")
        elif C == 1:
            tl.atomic_min(lo_ptr + seg_base, tl.min(lo), sem="relaxed")
            tl.atomic_max(hi_ptr + seg_base, tl.max(hi), sem="relaxed")
        else:
            ok = rows < nrows
            tl.atomic_min(lo_ptr + seg_base + rows % C, tl.min(lo, axis=1), mask=ok, sem="relaxed")
            tl.atomic_max(hi_ptr + seg_base + rows % C, tl.max(hi, axis=1), mask=ok, sem="relaxed")


@triton.jit
def _aggregate_kernel(
    tiles_ptr,
    meta_ptr,
    code_ptrs,
    params_ptr,
    w_ptr,
    lo_ptr,
    hi_ptr,
    out_ptr,
    scale_ptr,
    zp_ptr,
    K,
    T,
    S,
    qmin,
    qmax,
    trim,
    WRITE: tl.constexpr,
    ROBUST: tl.constexpr,
    BR: tl.constexpr,
    BW: tl.constexpr,
):
    """One tile per program: its range into lo / hi (pass 1), or its codes (WRITE)."""
    pid = tl.program_id(0)
    t = tl.load(tiles_ptr + pid * 3)
    rb = tl.load(tiles_ptr + pid * 3 + 1)
    cb = tl.load(tiles_ptr + pid * 3 + 2)
    ptrs = (code_ptrs, params_ptr, w_ptr, meta_ptr, lo_ptr, hi_ptr, out_ptr, scale_ptr, zp_ptr)
    if tl.load(meta_ptr + t * 8) != 0:  # the same tile, its layout a compile-time constant
        _aggregate_tile(ptrs, K, T, S, t, rb, cb, qmin, qmax, trim, True, WRITE, ROBUST, BR, BW)
    else:
        _aggregate_tile(ptrs, K, T, S, t, rb, cb, qmin, qmax, trim, False, WRITE, ROBUST, BR, BW)


def _aggregate_view(shape, axis: int) -> View:
    """Per-tensor tensors become [cdiv(numel, BW), BW] one-channel ROW matrices: full
    tiles however small or odd the tensor (the mask stops at numel)."""
    view = View.of(shape, axis)
    if view.mode == cm.FLAT.value:
        return View(ROW.value, max(1, triton.cdiv(view.numel, AGG_BW)), AGG_BW, 1, view.numel)
    return view


def _tables(views: list[View], code_ptrs: list[int]) -> tuple[torch.Tensor, int, int, int]:
    """One int64 host tensor: code_ptrs | meta | tiles | seg_tensor (see the module
    docstring). Returns it with the number of tiles and the total elements / segments."""
    T = len(views)
    meta, counts, n_cbs, channels = [], [], [], []
    elements = segments = 0
    for v in views:  # metadata only, one entry per tensor
        n_rb, n_cb = v.tile_count(AGG_BR, AGG_BW)
        meta += [int(v.mode == COL.value), v.nrows, v.ncols, v.channels, segments, elements, v.numel, 0]
        counts.append(n_rb * n_cb if v.numel else 0)
        n_cbs.append(n_cb)
        channels.append(v.channels)
        elements += v.numel
        segments += v.channels
    counts_t = torch.tensor(counts, dtype=torch.int64)
    tile_tensor = torch.repeat_interleave(torch.arange(T), counts_t)
    local = torch.arange(tile_tensor.numel()) - (torch.cumsum(counts_t, 0) - counts_t)[tile_tensor]
    n_cb_t = torch.tensor(n_cbs, dtype=torch.int64)[tile_tensor]
    tiles = torch.stack([tile_tensor, local // n_cb_t, local % n_cb_t], dim=1).flatten()
    seg_tensor = torch.repeat_interleave(torch.arange(T), torch.tensor(channels, dtype=torch.int64))
    table = torch.cat(
        [torch.tensor(code_ptrs, dtype=torch.int64), torch.tensor(meta, dtype=torch.int64), tiles, seg_tensor]
    )
    return table, int(tile_tensor.numel()), elements, segments


def aggregate(codes, scales, zero_points, weights, axes, bits, quant_min, quant_max, symmetric, names, trim=-1):
    if cm.INTERPRET and weights.device.type != "cpu":
        # The interpreter runs on host copies of the arguments, so the device addresses in
        # the code pointer table would be read on the host: run on CPU copies instead.
        out = aggregate(
            [c.cpu() for c in codes],
            [s.cpu() for s in scales],
            [z.cpu() for z in zero_points],
            weights.cpu(),
            axes,
            bits,
            quant_min,
            quant_max,
            symmetric,
            names,
            trim,
        )
        return tuple(t.to(weights.device) for t in out)
    cm.check_range("aggregate", quant_min, quant_max)
    if not (quant_min >= -128 and quant_max <= 127):
        raise ValueError("aggregate: codes are stored as int8")
    T = len(axes)
    weights = weights.to(torch.float32).contiguous()
    K = weights.numel()
    device = weights.device
    if not (K > 0 and len(codes) == K * T == len(scales) == len(zero_points) and len(names) == T):
        raise ValueError(f"aggregate: expected {K} clients x {T} tensors of codes, scales and zero points")
    if trim >= 0 and not 2 * trim < K:
        raise ValueError(f"aggregate: trimming {trim} of {K} clients from each end leaves none")
    ranges = input_ranges("aggregate", bits, K * T, names)  # each entry's own code range
    if device.type != "cuda":
        # free on CPU tensors: check in the reference's order, with its messages
        for t in range(T):
            for k in range(K):
                e = k * T + t
                reference.check_qparams(
                    "aggregate", scales[e], zero_points[e], *ranges[e], f"client {k}'s '{names[t]}'"
                )

    views = [_aggregate_view(codes[t].shape, axes[t]) for t in range(T)]
    keep = [c.contiguous() for c in codes]  # alive until the kernels have read them
    table, n_tiles, E, S = _tables(views, [c.data_ptr() for c in keep])
    table = table.to(device, non_blocking=True)
    code_ptrs, meta = table[: K * T], table[K * T : K * T + _META * T]
    tiles, seg_tensor = table[K * T + _META * T : K * T + _META * T + 3 * n_tiles], table[len(table) - S :]

    out_codes = torch.empty(E, dtype=torch.int8, device=device)
    out_scale = torch.empty(S, dtype=torch.float32, device=device)
    out_zero_point = torch.empty(S, dtype=torch.int32, device=device)
    if S == 0:
        return out_codes, out_scale, out_zero_point
    scale_all = torch.cat([s.reshape(-1).to(torch.float32) for s in scales])  # [K * S], client-major
    zp_all = torch.cat([z.reshape(-1) for z in zero_points])
    params = torch.stack([scale_all, zp_all.to(torch.float32)], dim=1).view(torch.int64).reshape(-1)
    workspace = torch.zeros(2 * S + 1, dtype=torch.float32, device=device)
    lo, hi, flag = workspace[:S], workspace[S : 2 * S], workspace[2 * S :].view(torch.int32)

    with cm.on_device(weights):
        for write in (False, True):  # pass 1 observes, then qparams; pass 2 writes codes
            if write:
                cm.finalize_qparams(
                    lo, hi, out_scale, out_zero_point, seg_tensor, flag, T, symmetric, quant_min, quant_max
                )
            if n_tiles:
                launch(
                    _aggregate_kernel,
                    (n_tiles,),
                    tiles,
                    meta,
                    code_ptrs,
                    params,
                    weights,
                    lo,
                    hi,
                    out_codes,
                    out_scale,
                    out_zero_point,
                    K,
                    T,
                    S,
                    float(quant_min),
                    float(quant_max),
                    trim,
                    WRITE=write,
                    ROBUST=trim >= 0,
                    BR=AGG_BR,
                    BW=AGG_BW,
                    num_warps=AGG_WARPS,
                )

    if device.type == "cuda":
        channels = torch.tensor([s.numel() for s in scales])  # each entry's range, per parameter, built on the host
        zp_min, zp_max = (
            torch.tensor(bound, dtype=torch.int32).repeat_interleave(channels).to(device, non_blocking=True)
            for bound in zip(*ranges)
        )
        bad_params = (~(torch.isfinite(scale_all) & (scale_all > 0)) | (zp_all < zp_min) | (zp_all > zp_max)).any()
        bad_params, bad_tensor = torch.stack([bad_params.to(torch.int32), flag[0]]).tolist()  # the one read
        if bad_params:
            for t in range(T):
                for k in range(K):
                    e = k * T + t
                    reference.check_qparams(
                        "aggregate", scales[e].cpu(), zero_points[e].cpu(), *ranges[e], f"client {k}'s '{names[t]}'"
                    )
    else:
        bad_tensor = int(flag.item())
    if bad_tensor:
        raise ValueError(
            f"aggregate: the weighted average of '{names[T - bad_tensor]}' is not finite "
            "(client scales too large for float32)"
        )
    return out_codes, out_scale, out_zero_point


ACC_BLOCK = 4096 if cm.INTERPRET else 1024


@triton.jit
def _accumulate_kernel(acc_ptr, codes_ptr, scale_ptr, zp_ptr, fraction, numel, C, inner, BLOCK: tl.constexpr):
    """acc = _blend(acc, (q - zp) * s, fraction) over one tensor, [outer, C, inner]."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    channel = (offs // inner) % C
    q = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.float32)
    scale = tl.load(scale_ptr + channel, mask=mask, other=1.0)
    zero_point = tl.load(zp_ptr + channel, mask=mask, other=0).to(tl.float32)
    acc = tl.load(acc_ptr + offs, mask=mask, other=0.0)
    tl.store(acc_ptr + offs, _blend(acc, (q - zero_point) * scale, fraction), mask=mask)


def accumulate(acc, codes, scales, zero_points, axes, fraction, names):
    if cm.INTERPRET and acc.device.type != "cpu":  # as aggregate: the interpreter reads host memory
        host = acc.cpu()
        accumulate(
            host,
            [c.cpu() for c in codes],
            [s.cpu() for s in scales],
            [z.cpu() for z in zero_points],
            axes,
            fraction,
            names,
        )
        acc.copy_(host)
        return
    # every parameter checked before acc is touched (one read-back on a GPU)
    scale_all = torch.cat([s.reshape(-1) for s in scales]) if scales else acc.new_empty(0)
    zp_all = torch.cat([z.reshape(-1) for z in zero_points]) if zero_points else acc.new_empty(0, dtype=torch.int32)
    bad = ~(torch.isfinite(scale_all) & (scale_all > 0)) | (zp_all < -128) | (zp_all > 127)
    if bool(bad.any()):
        for t in range(len(axes)):
            reference.check_qparams(
                "accumulate", scales[t].cpu(), zero_points[t].cpu(), -128, 127, f"the update's '{names[t]}'"
            )
    start = 0
    with cm.on_device(acc):
        for c, s, z, axis in zip(codes, scales, zero_points, axes):
            channels = 1 if axis < 0 else c.shape[axis]
            inner = 1 if axis < 0 else math.prod(c.shape[axis + 1 :])
            if c.numel():
                launch(
                    _accumulate_kernel,
                    (triton.cdiv(c.numel(), ACC_BLOCK),),
                    acc[start:],
                    c.contiguous(),
                    s.contiguous(),
                    z.contiguous(),
                    fraction,
                    c.numel(),
                    channels,
                    inner,
                    BLOCK=ACC_BLOCK,
                )
            start += c.numel()
