// The server's aggregation on the GPU, with the semantics of csrc/cpu/aggregate.cpp:
// dequantize every client's update, average with the clients' weights in float32 as
// a running mean (docs/kernels.md, "The weighted mean"): acc = 0, then for each client
// k in order acc = (1 - b_k) * acc + b_k * ((q_k - zp_k) * s_k), b_k its fraction;
// then requantize each segment with its freshly observed range. A whole model is one
// packed index space (tiles.h), described by a table the host copies to the device,
// so each pass is one launch however many tensors the model has (a ResNet-18 is 62).
//   pass 1 (kAggregateObserve): checks every client scale / zero point, averages and
//          observes the range (non-finite averages flagged per tensor); keeps the
//          average in a float32 workspace when there are many clients;
//   pass 2 (kAggregateQuantize): publishes the fresh scales / zero points and
//          requantizes the average (re-read, or recomputed from the codes).
#include <cstring>

#include "common.cuh"

namespace fedhq::cuda {
namespace {

constexpr int kVector = 16;  // elements per vector: one 16-byte load of each client's codes
constexpr int64_t kTileElems = int64_t(kWarp) * kVector * 4;
// Blocks per SM the kernels are compiled for. With only a 256-thread bound, ptxas
// (CUDA 13, sm_90) aims at 4 blocks (64 registers) and spilled pass 1, which holds a
// 16-float average per lane; 3 blocks let it use the ~80 registers it needs. An
// estimate, not yet measured: 768 threads x 2 clients' 16-byte loads = 24 KB in
// flight per SM, above the ~15 KB an H100 needs (3.35 TB/s x ~0.6 us / 132 SMs).
constexpr int kMinBlocks = 3;

struct Model {
  const TensorDesc* descs;
  const AggregateEntry* entries;  // client-major: entry k * tensors + t
  const EntryRange* ranges;       // entry e's code range
  const float* weights;
  int64_t tensors, clients, segments;
  int64_t trim;  // < 0: weighted mean; else the trimmed mean cutting `trim` per end
};

__device__ __forceinline__ TensorDesc locate_tile(const Model& m, int64_t tile, int64_t* tensor) {
  *tensor = find_tensor(m.descs, m.tensors, tile, false);
  return m.descs[*tensor];
}

// One client blended into the running mean, as the CPU computes it (no FMA).
__device__ __forceinline__ float blend(float acc, float b, int8_t q, float zero_point, float scale) {
  return __fadd_rn(mul_rn(1.0f - b, acc), mul_rn(b, mul_rn(float(q) - zero_point, scale)));
}

__device__ __forceinline__ float dequantized(const Model& m, int64_t k, int64_t t, int64_t c, int64_t i) {
  const AggregateEntry e = m.entries[k * m.tensors + t];
  return mul_rn(float(__ldg(e.codes + i)) - float(__ldg(e.zero_point + c)), __ldg(e.scale + c));
}

// The unweighted trimmed mean of element i, as the Triton kernel computes it (no sort,
// no per-thread array): walk the distinct values in ascending order, each filling as
// many ranks as it has copies, adding ranks trim .. K - trim - 1 in float32 from +0.
__device__ __forceinline__ float trimmed_one(const Model& m, int64_t t, int64_t c, int64_t i) {
  const int K = int(m.clients), lo = int(m.trim), hi = K - lo;
  float acc = 0.0f, last = -INFINITY;
  int below = 0;
#pragma unroll 1
  for (int step = 0; below < K; ++step) {
    float cur = INFINITY;
#pragma unroll 1
    for (int k = 0; k < K; ++k) {
      const float v = dequantized(m, k, t, c, i);
      if ((v > last || step == 0) && v < cur) cur = v;
    }
    int mult = 0;
#pragma unroll 1
    for (int k = 0; k < K; ++k) mult += dequantized(m, k, t, c, i) == cur;
#pragma unroll 1
    for (int r = below; r < below + mult; ++r)
      if (r >= lo && r < hi) acc = __fadd_rn(acc, cur);
    below += mult;
    last = cur;
  }
  return __fdiv_rn(acc, float(hi - lo));
}

// The average of tensor t's 16 elements from i (channel c), client by client in order.
__device__ __forceinline__ void average_vec(const Model& m, int64_t t, int64_t c, int64_t i, float (&acc)[kVector]) {
#pragma unroll
  for (int j = 0; j < kVector; ++j) acc[j] = 0.0f;
#pragma unroll 2
  for (int64_t k = 0; k < m.clients; ++k) {
    const AggregateEntry e = m.entries[k * m.tensors + t];
    Vec<int8_t, kVector> q;
    load_vec(e.codes + i, q);
    const float w = __ldg(m.weights + k), s = __ldg(e.scale + c), z = float(__ldg(e.zero_point + c));
#pragma unroll
    for (int j = 0; j < kVector; ++j) acc[j] = blend(acc[j], w, q.v[j], z, s);
  }
}

__device__ __forceinline__ float average_one(const Model& m, int64_t t, int64_t c, int64_t i) {
  if (m.trim >= 0) return trimmed_one(m, t, c, i);
  float acc = 0.0f;
#pragma unroll 4
  for (int64_t k = 0; k < m.clients; ++k) {
    const AggregateEntry e = m.entries[k * m.tensors + t];
    acc = blend(acc, __ldg(m.weights + k), __ldg(e.codes + i), float(__ldg(e.zero_point + c)), __ldg(e.scale + c));
  }
  return acc;
}

// Pass 1 over one tile of tensor t: average, keep it in `average` if given, observe.
struct AverageOp {
  static constexpr int N = kVector, U = 1;
  using Batch = Vec<float, kVector>;
  Model m;
  int64_t t, channel, base;  // channel: the tile's (rows) or the lane's (columns)
  float* __restrict__ average;
  bool vec;
  RangeAcc* acc;
  __device__ __forceinline__ void load(int64_t i, Batch& b) const {
    average_vec(m, t, channel, i, b.v);
    if (average != nullptr) store_vec(average + base + i, b);
  }
  __device__ __forceinline__ void use(int64_t, const Batch& b, const QParams&) const {
#pragma unroll
    for (int j = 0; j < N; ++j) acc->add(b.v[j]);
  }
  __device__ __forceinline__ void one(int64_t i, const QParams&) const {
    const float v = average_one(m, t, channel, i);
    if (average != nullptr) average[base + i] = v;
    acc->add(v);
  }
};

// Pass 2 over one tile of tensor t: requantize the average into the packed codes.
struct RequantizeOp {
  static constexpr int N = kVector, U = 1;
  using Batch = Vec<float, kVector>;
  Model m;
  int64_t t, channel, base;
  const float* __restrict__ average;
  int8_t* __restrict__ codes;
  bool vec;
  __device__ __forceinline__ void load(int64_t i, Batch& b) const {
    if (average != nullptr) load_vec(average + base + i, b);
    else average_vec(m, t, channel, i, b.v);
  }
  __device__ __forceinline__ void use(int64_t i, const Batch& b, const QParams& p) const {
    Vec<int8_t, N> out;
#pragma unroll
    for (int j = 0; j < N; ++j) out.v[j] = quantize_value(b.v[j], p);
    store_vec(codes + base + i, out);
  }
  __device__ __forceinline__ void one(int64_t i, const QParams& p) const {
    const float v = average != nullptr ? __ldg(average + base + i) : average_one(m, t, channel, i);
    codes[base + i] = quantize_value(v, p);
  }
};

__global__ void __launch_bounds__(kBlock, kMinBlocks) kAggregateObserve(Model m, int64_t tiles, float* average,
                                                                        bool vec, RangeSlots slots) {
  // Every client's parameters, in the CPU binding's order: index k * segments + s,
  // each against its entry's own code range.
  for (int64_t j = global_thread(); j < m.clients * m.segments; j += total_threads()) {
    const int64_t k = j / m.segments, s = j % m.segments;
    const int64_t t = find_tensor(m.descs, m.tensors, s, true);
    const AggregateEntry e = m.entries[k * m.tensors + t];
    const EntryRange r = m.ranges[k * m.tensors + t];
    const int64_t c = s - m.descs[t].segment_base;
    if (bad_qparam(__ldg(e.scale + c), __ldg(e.zero_point + c), r.qmin, r.qmax)) flag_bad_qparam(slots.status, j);
  }
  const QParams unused{};
  const int lane = lane_id();
  observe_tiles(
      tiles, slots, [&](int64_t tile, int64_t* tensor) { return locate_tile(m, tile, tensor); },
      [&](const TensorDesc& d, int64_t t, const Tile& tile, RangeAcc& acc) {
        AverageOp op{m, t, tile.channel, d.element_base, average, vec && d.vectors, &acc};
        walk_row(op, tile, lane, unused);
      },
      [&](const TensorDesc& d, int64_t t, const Tile& tile, RangeAcc& acc) {
        AverageOp op{m, t, tile.channel + lane, d.element_base, average, false, &acc};
        walk_column(op, d, tile, lane, unused);
      });
}

__global__ void __launch_bounds__(kBlock, kMinBlocks) kAggregateQuantize(Model m, int64_t tiles, bool symmetric, int32_t qmin,
                                                             int32_t qmax, const float* average, bool vec,
                                                             RangeSlots slots, int8_t* codes, float* scale,
                                                             int32_t* zero_point) {
  const ObservedParams params{slots, m.segments, symmetric, qmin, qmax, scale, zero_point};
  params.publish();
  const int lane = lane_id();
  for (int64_t i = global_warp(); i < tiles; i += total_warps()) {
    int64_t t;
    const TensorDesc d = locate_tile(m, i, &t);
    const Tile tile = tile_at(d, i - d.tile_base);
    if (!d.columns) {
      RequantizeOp op{m, t, tile.channel, d.element_base, average, codes, vec && d.vectors};
      walk_row(op, tile, lane, params(d.segment_base + tile.channel));
    } else if (lane < tile.width) {
      RequantizeOp op{m, t, tile.channel + lane, d.element_base, average, codes, false};
      walk_column(op, d, tile, lane, params(d.segment_base + tile.channel + lane));
    }
  }
}

}  // namespace

size_t aggregate_table_bytes(int64_t tensors, int64_t clients) {
  return sizeof(TensorDesc) * size_t(tensors) + (sizeof(AggregateEntry) + sizeof(EntryRange)) * size_t(tensors * clients);
}

AggregatePlan aggregate_write_table(void* host_table, const Layout* layouts, int64_t tensors,
                                    const AggregateEntry* entries, const EntryRange* ranges, int64_t clients) {
  TensorDesc* descs = static_cast<TensorDesc*>(host_table);
  AggregatePlan plan{tensors, clients, 0, 0, 0};
  for (int64_t t = 0; t < tensors; ++t) {
    const Layout& l = layouts[t];
    TensorDesc d = make_desc(l.numel, l.channels, l.inner, kTileElems, plan.elements, plan.segments, plan.tiles);
    // 16-element vectors need every client's codes and the packed outputs at this
    // tensor 16-byte aligned (the output base pointers are checked at launch).
    bool vectors = plan.elements % kVector == 0;
    for (int64_t k = 0; k < clients; ++k) vectors = vectors && aligned16(entries[k * tensors + t].codes);
    d.vectors = vectors;
    descs[t] = d;
    plan.elements += l.numel;
    plan.segments += l.channels;
    plan.tiles += d.tiles;
  }
  AggregateEntry* table_entries = reinterpret_cast<AggregateEntry*>(descs + tensors);
  std::memcpy(table_entries, entries, sizeof(AggregateEntry) * size_t(tensors * clients));
  std::memcpy(table_entries + tensors * clients, ranges, sizeof(EntryRange) * size_t(tensors * clients));
  return plan;
}

cudaError_t aggregate(const void* device_table, const AggregatePlan& plan, const float* weights, int64_t trim,
                      bool symmetric, int32_t qmin, int32_t qmax, float* average, int8_t* codes, float* scale,
                      int32_t* zero_point, void* workspace, cudaStream_t stream) {
  const TensorDesc* descs = static_cast<const TensorDesc*>(device_table);
  const AggregateEntry* entries = reinterpret_cast<const AggregateEntry*>(descs + plan.tensors);
  const EntryRange* ranges = reinterpret_cast<const EntryRange*>(entries + plan.tensors * plan.clients);
  const Model m{descs, entries, ranges, weights, plan.tensors, plan.clients, plan.segments, trim};
  const RangeSlots slots = range_slots(workspace, plan.segments);
  cudaError_t error = cudaMemsetAsync(workspace, 0, observe_workspace_bytes(plan.segments), stream);
  if (error != cudaSuccess) return error;
  // the trimmed mean goes element by element (average_one), its average always kept
  const bool vec = trim < 0 && aligned16(codes) && (average == nullptr || aligned16(average));
  // pass 1 needs a thread per client parameter as well as a warp per tile
  const int64_t check_warps = ceil_div(plan.clients * plan.segments, kBlock) * kWarpsPerBlock;
  kAggregateObserve<<<grid_blocks<kAggregateObserve>(max64(plan.tiles, check_warps)), kBlock, 0, stream>>>(
      m, plan.tiles, average, vec, slots);
  if ((error = cudaGetLastError()) != cudaSuccess) return error;
  kAggregateQuantize<<<grid_blocks<kAggregateQuantize>(max64(plan.tiles, ceil_div(plan.segments, kBlock) *
                                                                              kWarpsPerBlock)),
                       kBlock, 0, stream>>>(m, plan.tiles, symmetric, qmin, qmax, average, vec, slots, codes, scale,
                                            zero_point);
  return cudaGetLastError();
}

namespace {

__global__ void __launch_bounds__(kBlock) kAccumulate(float* __restrict__ acc, const int8_t* __restrict__ codes,
                                                      const float* __restrict__ scale,
                                                      const int32_t* __restrict__ zero_point, Layout l, float b) {
  for (int64_t i = int64_t(blockIdx.x) * kBlock + threadIdx.x; i < l.numel; i += total_threads()) {
    const int64_t c = (i / l.inner) % l.channels;
    acc[i] = blend(acc[i], b, __ldg(codes + i), float(__ldg(zero_point + c)), __ldg(scale + c));
  }
}

}  // namespace

cudaError_t accumulate(float* acc, const int8_t* codes, const float* scale, const int32_t* zero_point,
                       const Layout& layout, float fraction, cudaStream_t stream) {
  if (layout.numel == 0) return cudaSuccess;
  const int blocks = int(std::min<int64_t>(ceil_div(layout.numel, kBlock), 8192));
  kAccumulate<<<blocks, kBlock, 0, stream>>>(acc, codes, scale, zero_point, layout, fraction);
  return cudaGetLastError();
}

}  // namespace fedhq::cuda
