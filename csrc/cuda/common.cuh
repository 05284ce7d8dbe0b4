// Device helpers shared by the CUDA kernels (csrc/cuda/*.cu): vectorized 16-byte
// loads and stores, the walk over a tile's elements, the range observer with its
// fused non-finite check, and small host helpers for the launchers. Per-element math
// is csrc/quant_math.h; tile geometry is tiles.h.
//
// Execution model: every kernel is a grid-stride loop over tiles (tiles.h), one warp
// per tile. Row tiles are walked in 16-byte vectors when every pointer involved is
// 16-byte aligned (checked at run time by the launcher; otherwise element by
// element), with U vectors loaded before any is used so that several loads per lane
// are in flight.
#pragma once

#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

#include "../quant_math.h"
#include "launchers.h"
#include "tiles.h"

namespace fedhq::cuda {

// `#pragma unroll` in functions also compiled for the host (which warns about it).
#define FEDHQ_PRAGMA(text) _Pragma(#text)
#if defined(__CUDA_ARCH__)
#define FEDHQ_UNROLL(n) FEDHQ_PRAGMA(unroll n)
#else
#define FEDHQ_UNROLL(n)
#endif

constexpr int kBlock = 256;  // threads per block: 8 warps
constexpr int kWarpsPerBlock = kBlock / kWarp;
constexpr unsigned kFullMask = 0xffffffffu;

template <FloatType F> struct StorageOf;
template <> struct StorageOf<FloatType::kFloat32> { using type = float; };
template <> struct StorageOf<FloatType::kFloat16> { using type = half_t; };
template <> struct StorageOf<FloatType::kBFloat16> { using type = bf16_t; };

// Calls f(T{}) with T the storage type of `type`.
template <class F>
cudaError_t dispatch_float_type(FloatType type, F&& f) {
  switch (type) {
    case FloatType::kFloat32: return f(float{});
    case FloatType::kFloat16: return f(half_t{});
    case FloatType::kBFloat16: return f(bf16_t{});
  }
  return cudaErrorInvalidValue;
}

// ---- 16-byte vectors ----

template <class T, int N>
struct alignas(16) Vec {
  T v[N];
};

template <class T, int N>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, Vec<T, N>& out) {
  static_assert(sizeof(Vec<T, N>) == N * sizeof(T) && sizeof(Vec<T, N>) % 16 == 0, "whole 16-byte chunks");
  const uint4* src = reinterpret_cast<const uint4*>(p);
  uint4* dst = reinterpret_cast<uint4*>(&out);
#pragma unroll
  for (int c = 0; c < int(sizeof(Vec<T, N>) / 16); ++c) dst[c] = __ldg(src + c);
}

template <class T, int N>
__device__ __forceinline__ void store_vec(T* __restrict__ p, const Vec<T, N>& in) {
  const uint4* src = reinterpret_cast<const uint4*>(&in);
  uint4* dst = reinterpret_cast<uint4*>(p);
#pragma unroll
  for (int c = 0; c < int(sizeof(Vec<T, N>) / 16); ++c) dst[c] = src[c];
}

template <class T>
__device__ __forceinline__ T load_one(const T* p) {
  return __ldg(reinterpret_cast<const T*>(p));
}
template <>
__device__ __forceinline__ half_t load_one(const half_t* p) {
  return half_t{__ldg(&p->bits)};
}
template <>
__device__ __forceinline__ bf16_t load_one(const bf16_t* p) {
  return bf16_t{__ldg(&p->bits)};
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// ---- walking a tile ----
// An Op provides N (elements per vector), U (vectors in flight per lane), Batch (what
// load() fills for one vector), load(i, batch), use(i, batch, params) for the vector
// starting at element i, one(i, params) for a single element, and `vec` (whether
// vectors may be used: all its pointers are 16-byte aligned). The walks are also
// host functions so that tests/cuda/tiles_test.cu can run them for every lane.

#pragma nv_exec_check_disable
template <class Op>
__host__ __device__ __forceinline__ void walk_row(Op& op, const Tile& t, int lane, const QParams& p) {
  constexpr int N = Op::N, U = Op::U;
  const int64_t end = t.begin + t.len;
  if (op.vec) {
    const RowSplit s = split_row(t.begin, t.len, N);
    if (lane < s.body - t.begin) op.one(t.begin + lane, p);
    if (lane < end - s.body_end) op.one(s.body_end + lane, p);
    for (int64_t i0 = s.body + int64_t(lane) * N; i0 < s.body_end; i0 += int64_t(kWarp) * N * U) {
      typename Op::Batch batch[U];
      FEDHQ_UNROLL()
      for (int u = 0; u < U; ++u) {
        const int64_t i = i0 + int64_t(u) * kWarp * N;
        if (i < s.body_end) op.load(i, batch[u]);
      }
      FEDHQ_UNROLL()
      for (int u = 0; u < U; ++u) {
        const int64_t i = i0 + int64_t(u) * kWarp * N;
        if (i < s.body_end) op.use(i, batch[u], p);
      }
    }
  } else {
    FEDHQ_UNROLL(4)
    for (int64_t i = t.begin + lane; i < end; i += kWarp) op.one(i, p);
  }
}

// Column tile: lane l walks channel t.channel + l down the tile's rows.
#pragma nv_exec_check_disable
template <class Op>
__host__ __device__ __forceinline__ void walk_column(Op& op, const TensorDesc& d, const Tile& t, int lane,
                                                     const QParams& p) {
  if (lane >= t.width) return;
  int64_t i = t.begin + lane;
  FEDHQ_UNROLL(4)
  for (int64_t r = 0; r < t.len; ++r, i += d.channels) op.one(i, p);
}

__device__ __forceinline__ int lane_id() { return int(threadIdx.x) % kWarp; }
__device__ __forceinline__ int64_t global_warp() {
  return (int64_t(blockIdx.x) * kBlock + threadIdx.x) / kWarp;
}
__device__ __forceinline__ int64_t total_warps() { return int64_t(gridDim.x) * kWarpsPerBlock; }
__device__ __forceinline__ int64_t global_thread() { return int64_t(blockIdx.x) * kBlock + threadIdx.x; }
__device__ __forceinline__ int64_t total_threads() { return int64_t(gridDim.x) * kBlock; }

// ---- the range observer ----
// Ranges are gathered with atomicMax on order-preserving 32-bit keys: exact (min and
// max do not round) and independent of the order the blocks finish in, so results
// are deterministic. A zeroed slot means "no value seen" (the empty range, as the CPU
// backend's +inf / -inf initial values); no finite value maps to key 0.

// Monotonic in the float's value (-0 sorts just below +0; NaN never gets here unflagged).
__host__ __device__ __forceinline__ uint32_t order_key(float f) {
  const uint32_t u = float_bits(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__host__ __device__ __forceinline__ float key_float(uint32_t k) {
  return bits_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// The workspace of an observing op: Status, then the min and max slots of every segment.
struct RangeSlots {
  Status* status;
  uint32_t* lo;  // max of ~order_key(v): the minimum
  uint32_t* hi;  // max of order_key(v): the maximum
};

__host__ __device__ __forceinline__ RangeSlots range_slots(void* workspace, int64_t segments) {
  Status* status = static_cast<Status*>(workspace);
  uint32_t* lo = reinterpret_cast<uint32_t*>(status + 1);
  return RangeSlots{status, lo, lo + segments};
}

// A lane's running range; `bad` turns true on a NaN or +-Inf.
struct RangeAcc {
  float lo, hi;
  bool bad;
  __device__ __forceinline__ void reset() {
    lo = __int_as_float(0x7f800000);
    hi = -lo;
  }
  __device__ __forceinline__ void add(float v) {
    lo = fminf(lo, v);
    hi = fmaxf(hi, v);
    bad |= !(fabsf(v) <= FLT_MAX);
  }
};

__device__ __forceinline__ void publish_range(const RangeSlots& slots, int64_t segment, float lo, float hi) {
  atomicMax(slots.lo + segment, ~order_key(lo));
  atomicMax(slots.hi + segment, order_key(hi));
}

// Folds the warp's ranges (all lanes hold values of `segment`, -1: nothing pending)
// into the slots and resets them. Called by every lane of the warp.
__device__ __forceinline__ void flush_warp(const RangeSlots& slots, int64_t segment, RangeAcc& acc) {
  if (segment < 0) return;
  float lo = acc.lo, hi = acc.hi;
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    lo = fminf(lo, __shfl_xor_sync(kFullMask, lo, offset));
    hi = fmaxf(hi, __shfl_xor_sync(kFullMask, hi, offset));
  }
  if (lane_id() == 0) publish_range(slots, segment, lo, hi);
  acc.reset();
}

// End of an observing kernel: the warps' pending ranges are merged in shared memory,
// so that per-tensor observation costs one pair of atomics per block, not per warp.
// Called by every thread of the block.
__device__ __forceinline__ void flush_block(const RangeSlots& slots, int64_t segment, RangeAcc& acc) {
  __shared__ int64_t seg[kWarpsPerBlock];
  __shared__ float lo_s[kWarpsPerBlock], hi_s[kWarpsPerBlock];
  float lo = acc.lo, hi = acc.hi;
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    lo = fminf(lo, __shfl_xor_sync(kFullMask, lo, offset));
    hi = fmaxf(hi, __shfl_xor_sync(kFullMask, hi, offset));
  }
  const int warp = int(threadIdx.x) / kWarp;
  if (lane_id() == 0) {
    seg[warp] = segment;
    lo_s[warp] = lo;
    hi_s[warp] = hi;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t current = -1;
    float mn = 0.0f, mx = 0.0f;
    for (int w = 0; w < kWarpsPerBlock; ++w) {
      if (seg[w] < 0) continue;
      if (seg[w] != current) {
        if (current >= 0) publish_range(slots, current, mn, mx);
        current = seg[w];
        mn = lo_s[w];
        mx = hi_s[w];
      } else {
        mn = fminf(mn, lo_s[w]);
        mx = fmaxf(mx, hi_s[w]);
      }
    }
    if (current >= 0) publish_range(slots, current, mn, mx);
  }
}

// Marks `tensor` as holding a non-finite value if any lane saw one. Called by every
// lane of the warp.
__device__ __forceinline__ void flag_nonfinite(const RangeSlots& slots, bool bad, int64_t tensor) {
  if (__any_sync(kFullMask, bad) && lane_id() == 0)
    atomicMax(&slots.status->bad_value, 0x7fffffffu - uint32_t(tensor));
}

// The grid-stride loop of an observing kernel. locate(tile, &tensor) returns the
// descriptor of the tensor holding packed tile `tile`; visit_row(d, tensor, t, acc)
// and visit_column(d, tensor, t, acc) add this lane's values of a tile to acc.
template <class Locate, class VisitRow, class VisitColumn>
__device__ __forceinline__ void observe_tiles(int64_t tiles, const RangeSlots& slots, Locate&& locate,
                                              VisitRow&& visit_row, VisitColumn&& visit_column) {
  const int lane = lane_id();
  int64_t pending = -1;  // segment the warp's acc holds values of (warp-uniform)
  RangeAcc acc;
  acc.reset();
  acc.bad = false;
  for (int64_t i = global_warp(); i < tiles; i += total_warps()) {
    int64_t tensor;
    const TensorDesc d = locate(i, &tensor);
    const Tile t = tile_at(d, i - d.tile_base);
    bool bad;
    if (!d.columns) {
      const int64_t segment = d.segment_base + t.channel;
      if (segment != pending) {
        flush_warp(slots, pending, acc);
        pending = segment;
      }
      acc.bad = false;
      visit_row(d, tensor, t, acc);
      bad = acc.bad;
    } else {
      flush_warp(slots, pending, acc);
      pending = -1;
      RangeAcc column;
      column.reset();
      column.bad = false;
      visit_column(d, tensor, t, column);
      if (lane < t.width) publish_range(slots, d.segment_base + t.channel + lane, column.lo, column.hi);
      bad = column.bad;
    }
    flag_nonfinite(slots, bad, tensor);
  }
  flush_block(slots, pending, acc);
}

// ---- quantization parameters ----

// Given per-channel parameters (fake_quant, its backward).
struct GivenParams {
  const float* scale;
  const int32_t* zero_point;
  int32_t qmin, qmax;
  __device__ __forceinline__ QParams operator()(int64_t segment) const {
    return make_qparams(__ldg(scale + segment), __ldg(zero_point + segment), qmin, qmax);
  }
  __device__ __forceinline__ void publish() const {}
};

// MinMaxObserver's parameters of observed segment s.
__device__ __forceinline__ void observed_qparams(const RangeSlots& slots, int64_t s, bool symmetric, int32_t qmin,
                                                 int32_t qmax, float* scale, int32_t* zero_point) {
  const uint32_t lo_key = __ldg(slots.lo + s), hi_key = __ldg(slots.hi + s);
  const float inf = __int_as_float(0x7f800000);
  const float lo = lo_key == 0 ? inf : key_float(~lo_key);
  const float hi = hi_key == 0 ? -inf : key_float(hi_key);
  qparams_from_range(lo, hi, symmetric, qmin, qmax, scale, zero_point);
}

// Parameters from the observer's slots (the write pass of observing ops); publish()
// also writes every segment's scale / zero point to the op's outputs.
struct ObservedParams {
  RangeSlots slots;
  int64_t segments;
  bool symmetric;
  int32_t qmin, qmax;
  float* scale_out;
  int32_t* zero_point_out;
  __device__ __forceinline__ QParams operator()(int64_t segment) const {
    float scale;
    int32_t zero_point;
    observed_qparams(slots, segment, symmetric, qmin, qmax, &scale, &zero_point);
    return make_qparams(scale, zero_point, qmin, qmax);
  }
  __device__ __forceinline__ void publish() const {
    for (int64_t s = global_thread(); s < segments; s += total_threads())
      observed_qparams(slots, s, symmetric, qmin, qmax, scale_out + s, zero_point_out + s);
  }
};

// A scale / zero point the kernels cannot trust (the CPU binding's check_qparams).
__device__ __forceinline__ bool bad_qparam(float scale, int32_t zero_point, int32_t qmin, int32_t qmax) {
  return !(fabsf(scale) <= FLT_MAX && scale > 0.0f) || zero_point < qmin || zero_point > qmax;
}

__device__ __forceinline__ void flag_bad_qparam(Status* status, int64_t index) {
  atomicMax(&status->bad_qparam, ~static_cast<unsigned long long>(index));
}

// ---- single-tensor kernels' bodies ----

// Writes every tile of a single tensor through `op` with parameters from `params`.
template <class Op, class Params>
__device__ __forceinline__ void elementwise_tiles(Op& op, const Params& params, const TensorDesc& d) {
  params.publish();
  const int lane = lane_id();
  for (int64_t i = global_warp(); i < d.tiles; i += total_warps()) {
    const Tile t = tile_at(d, i);
    if (!d.columns) {
      walk_row(op, t, lane, params(t.channel));
    } else if (lane < t.width) {
      walk_column(op, d, t, lane, params(t.channel + lane));
    }
  }
}

// An elementwise op from `In` to `Out` values through F (a functor (In, QParams) ->
// Out): N elements per vector, U vectors in flight per lane.
template <class In, class Out, int N_, int U_, class F>
struct MapOp {
  using InT = In;
  using OutT = Out;
  static constexpr int N = N_, U = U_;
  using Batch = Vec<In, N>;
  const In* __restrict__ in;
  Out* __restrict__ out;
  bool vec;
  __device__ __forceinline__ void load(int64_t i, Batch& b) const { load_vec(in + i, b); }
  __device__ __forceinline__ void use(int64_t i, const Batch& b, const QParams& p) const {
    Vec<Out, N> o;
#pragma unroll
    for (int j = 0; j < N; ++j) o.v[j] = F{}(b.v[j], p);
    store_vec(out + i, o);
  }
  __device__ __forceinline__ void one(int64_t i, const QParams& p) const { out[i] = F{}(load_one(in + i), p); }
};

// Range of a float tensor's values (pass 1 of fake_quant_observed and quantize).
template <class T>
struct RangeOp {
  static constexpr int N = 16 / sizeof(T), U = 4;
  using Batch = Vec<T, N>;
  const T* __restrict__ x;
  bool vec;
  RangeAcc* acc;
  __device__ __forceinline__ void load(int64_t i, Batch& b) const { load_vec(x + i, b); }
  __device__ __forceinline__ void use(int64_t, const Batch& b, const QParams&) const {
#pragma unroll
    for (int j = 0; j < N; ++j) acc->add(to_float(b.v[j]));
  }
  __device__ __forceinline__ void one(int64_t i, const QParams&) const { acc->add(to_float(load_one(x + i))); }
};

template <class T>
__device__ __forceinline__ void observe_tensor(const T* __restrict__ x, bool vec, const TensorDesc& d,
                                               const RangeSlots& slots) {
  const QParams unused{};
  const int lane = lane_id();
  observe_tiles(
      d.tiles, slots,
      [&](int64_t, int64_t* tensor) {
        *tensor = 0;
        return d;
      },
      [&](const TensorDesc&, int64_t, const Tile& t, RangeAcc& acc) {
        RangeOp<T> op{x, vec, &acc};
        walk_row(op, t, lane, unused);
      },
      [&](const TensorDesc& desc, int64_t, const Tile& t, RangeAcc& acc) {
        RangeOp<T> op{x, vec, &acc};
        walk_column(op, desc, t, lane, unused);
      });
}

// Pass 1 of fake_quant_observed and quantize. In an unnamed namespace: each .cu file
// that launches it gets its own copy (no relocatable device code needed).
namespace {
template <class T>
__global__ void __launch_bounds__(kBlock) kObserveRange(const T* __restrict__ x, bool vec, TensorDesc d,
                                                        RangeSlots slots) {
  observe_tensor(x, vec, d, slots);
}
}  // namespace

// ---- host helpers for the launchers ----

// Blocks for a grid-stride kernel over `tiles` warp tiles: enough to fill the device
// (the kernel's occupancy x SMs), fewer for small tensors; at least one.
template <auto Kernel>
int grid_blocks(int64_t tiles) {
  static const int per_sm = [] {
    int blocks = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, Kernel, kBlock, 0) != cudaSuccess) {
      cudaGetLastError();  // leave no error behind for the launch check
      blocks = 1;
    }
    return blocks > 0 ? blocks : 1;
  }();
  int device = 0, sms = 1;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    cudaGetLastError();
    sms = 1;
  }
  const int64_t wanted = ceil_div(tiles, kWarpsPerBlock);
  return int(max64(1, min64(wanted, int64_t(per_sm) * sms)));
}

// Warps for pass 2 of an observing or checking op: its tiles, and at least one thread
// per segment for the parameters it publishes or checks.
inline int64_t pass2_warps(const TensorDesc& d, int64_t segments) {
  return max64(d.tiles, ceil_div(segments, kBlock) * kWarpsPerBlock);
}

// Row-layout elements per tile for an op: R batches of U vectors of N per lane.
template <class Op>
constexpr int64_t tile_elems(int repeats = 2) {
  return int64_t(kWarp) * Op::N * Op::U * repeats;
}

namespace {
// Pass 1 of fake_quant_observed and quantize: clears the workspace (Status and range
// slots) and queues the range kernel, none for an empty tensor.
template <class T>
cudaError_t launch_observe_range(const T* x, const Layout& layout, void* workspace, cudaStream_t stream) {
  cudaError_t error = cudaMemsetAsync(workspace, 0, observe_workspace_bytes(layout.channels), stream);
  if (error != cudaSuccess) return error;
  const TensorDesc d = make_desc(layout.numel, layout.channels, layout.inner, tile_elems<RangeOp<T>>());
  if (d.tiles == 0) return cudaSuccess;
  constexpr auto kernel = kObserveRange<T>;
  kernel<<<grid_blocks<kernel>(d.tiles), kBlock, 0, stream>>>(x, aligned16(x), d,
                                                               range_slots(workspace, layout.channels));
  return cudaGetLastError();
}

// An elementwise op's kernel: every tile through `op`, parameters from `params`.
template <class Op, class Params>
__global__ void __launch_bounds__(kBlock) kElementwise(Op op, Params params, TensorDesc d) {
  elementwise_tiles(op, params, d);
}

// fake_quant_observed and quantize: pass 1 observes the range, pass 2 writes through
// the MapOp `Op` with the parameters the range implies. Pass 2 runs even for an empty
// tensor: it writes every channel's scale / zero point.
template <class Op>
cudaError_t launch_observed(const typename Op::InT* x, typename Op::OutT* out, const Layout& layout, bool symmetric,
                            int32_t qmin, int32_t qmax, float* scale, int32_t* zero_point, void* workspace,
                            cudaStream_t stream) {
  const cudaError_t error = launch_observe_range(x, layout, workspace, stream);
  if (error != cudaSuccess) return error;
  const TensorDesc d = make_desc(layout.numel, layout.channels, layout.inner, tile_elems<Op>());
  const Op op{x, out, aligned16(x) && aligned16(out)};
  const ObservedParams params{range_slots(workspace, layout.channels), layout.channels, symmetric, qmin, qmax, scale,
                              zero_point};
  constexpr auto kernel = kElementwise<Op, ObservedParams>;
  kernel<<<grid_blocks<kernel>(pass2_warps(d, layout.channels)), kBlock, 0, stream>>>(op, params, d);
  return cudaGetLastError();
}
}  // namespace

}  // namespace fedhq::cuda
