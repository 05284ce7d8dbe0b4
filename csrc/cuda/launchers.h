// The CUDA backend's launcher API: plain C++ over raw device pointers, no torch
// headers, so the binding (csrc/cuda_ops.cpp) is the only file that sees at::Tensor
// and the .cu files compile in about a second each.
//
// Layers (as bitsandbytes): kernels `k*` in csrc/cuda/*.cu -> launchers declared here
// (enqueue on the given stream, check the launch error, return it) -> torch binding.
// Launchers never synchronize and never print: they return a cudaError_t, and ops
// that can fail on the data (a non-finite input, a bad client scale) also leave a
// Status in device memory that the binding reads back once, after everything is
// queued.
//
// Conventions shared with the CPU backend (csrc/cpu/kernels.h):
//   - a tensor is viewed as [outer, channels, inner] (Layout); per-tensor
//     quantization is one channel with inner = numel;
//   - scale is float32 and zero_point int32, one entry per channel;
//   - float tensors are float32, float16 or bfloat16 (FloatType);
//   - per-element math is csrc/quant_math.h, so results equal the CPU backend's bit
//     for bit (NaN payloads aside: GPU arithmetic returns its canonical NaN).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace fedhq::cuda {

enum class FloatType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// [outer, channels, inner]: element i belongs to channel (i / inner) % channels.
struct Layout {
  int64_t numel;
  int64_t channels;  // 1 for per-tensor
  int64_t inner;     // elements between consecutive channels (>= 1)
};

// Written by the kernels into the first bytes of an op's workspace; zero means "no
// problem". Both fields store a complement so that a zeroed buffer is the neutral
// value and an atomicMax keeps the smallest index.
struct Status {
  unsigned long long bad_qparam;  // ~(index of the first bad scale / zero point), see below
  uint32_t bad_value;             // 0x7fffffff - (first tensor with a NaN / Inf value)
  uint32_t reserved;
};

// Index of the first invalid (non-finite or <= 0 scale, or zero point outside
// [qmin, qmax]) parameter, or -1. For aggregate the index is k * segments + s: client
// k's parameter of packed segment s, the order in which the CPU binding checks them.
inline int64_t first_bad_qparam(const Status& s) {
  return s.bad_qparam == 0 ? -1 : int64_t(~s.bad_qparam);
}

// The first tensor (0 for single-tensor ops) whose observed values held a NaN or Inf,
// or -1.
inline int64_t first_nonfinite_tensor(const Status& s) {
  return s.bad_value == 0 ? -1 : int64_t(0x7fffffffu - s.bad_value);
}

// Bytes of device workspace an observing op needs for `segments` channels: the
// Status plus two range slots per segment. The launcher clears it itself.
inline size_t observe_workspace_bytes(int64_t segments) {
  return sizeof(Status) + 2 * sizeof(uint32_t) * size_t(segments);
}

// ---- fake_quant.cu ----

// y = fake_quant(x) with the given parameters; no host synchronization and no value
// checks (they would need a device -> host read on every QAT step).
cudaError_t fake_quant(FloatType type, const void* x, void* y, Layout layout, const float* scale,
                       const int32_t* zero_point, int32_t qmin, int32_t qmax, cudaStream_t stream);

// grad_x = grad * (qmin <= code(x) <= qmax): the straight-through estimator, with
// the mask recomputed from x instead of stored by the forward.
cudaError_t fake_quant_backward(FloatType type, const void* grad, const void* x, void* grad_x, Layout layout,
                                const float* scale, const int32_t* zero_point, int32_t qmin, int32_t qmax,
                                cudaStream_t stream);

// The fused observer: range of x per channel (MinMaxObserver), then y = fake_quant(x)
// with the parameters it implies, written to scale / zero_point. Status.bad_value
// flags a NaN / Inf input. `workspace` has observe_workspace_bytes(channels) bytes.
cudaError_t fake_quant_observed(FloatType type, const void* x, void* y, Layout layout, bool symmetric, int32_t qmin,
                                int32_t qmax, float* scale, int32_t* zero_point, void* workspace, cudaStream_t stream);

// ---- quantize.cu ----

// The observer, then int8 codes; as fake_quant_observed.
cudaError_t quantize(FloatType type, const void* x, int8_t* codes, Layout layout, bool symmetric, int32_t qmin,
                     int32_t qmax, float* scale, int32_t* zero_point, void* workspace, cudaStream_t stream);

// y = (code - zero_point) * scale. The same kernel checks every scale / zero point
// (zero points against int8's range) into Status.bad_qparam: `workspace` has
// sizeof(Status) bytes.
cudaError_t dequantize(FloatType type, const int8_t* codes, void* y, Layout layout, const float* scale,
                       const int32_t* zero_point, void* workspace, cudaStream_t stream);

// ---- aggregate.cu: the server step over a whole model, one launch per pass ----
//
// Clients' tensors are given client-major (entry k * tensors + t is client k's tensor
// t), as in the CPU backend. The host describes the model in a table that it copies
// to the device: aggregate_table_bytes() bytes, written by aggregate_write_table().

struct AggregateEntry {
  const int8_t* codes;
  const float* scale;
  const int32_t* zero_point;
};

// An entry's code range: the signed range of its own bit width (clients may send a
// tensor at different widths). Kept apart from AggregateEntry, which the averaging
// loops load: a 32-byte entry made pass 1 spill registers.
struct EntryRange {
  int32_t qmin;
  int32_t qmax;
};

struct AggregatePlan {
  int64_t tensors;
  int64_t clients;
  int64_t elements;  // packed output size (sum of numel)
  int64_t segments;  // packed parameter count (sum of channels)
  int64_t tiles;     // units of work of one warp, over all tensors
};

size_t aggregate_table_bytes(int64_t tensors, int64_t clients);

// Fills `host_table` (aggregate_table_bytes() bytes, 8-byte aligned) from the tensors'
// layouts and the clients' entries and their ranges; returns what the launch needs to know.
AggregatePlan aggregate_write_table(void* host_table, const Layout* layouts, int64_t tensors,
                                    const AggregateEntry* entries, const EntryRange* ranges, int64_t clients);

// Whether keeping the float32 average in a workspace (4 bytes written and read per
// element) beats recomputing it from the clients' codes in pass 2 (`clients` bytes).
inline bool aggregate_keeps_average(int64_t clients, int64_t trim) { return clients > 8 || trim >= 0; }

// Pass 1 (one launch): checks every client's scale / zero point (Status.bad_qparam;
// zero points against the entry's own range),
// averages acc = (1 - b_k) * acc + b_k * ((q_k - zp_k) * s_k) from 0 in float32,
// client by client in order, and observes each segment's range (Status.bad_value: a non-finite average).
// Pass 2 (one launch): requantizes the average with the fresh range into the packed
// `codes`, `scale`, `zero_point` in [qmin, qmax]. `average` (elements floats) is used when non-null
// (see aggregate_keeps_average); `weights` (clients floats: their running fractions) and
// `device_table` live on the device; `workspace` has observe_workspace_bytes(segments).
// trim >= 0: the unweighted trimmed mean instead (trim values cut from each end).
cudaError_t aggregate(const void* device_table, const AggregatePlan& plan, const float* weights, int64_t trim,
                      bool symmetric, int32_t qmin, int32_t qmax, float* average, int8_t* codes, float* scale,
                      int32_t* zero_point, void* workspace, cudaStream_t stream);

// The streaming step over one tensor: acc = (1 - b) * acc + b * ((q - zp) * s), b =
// `fraction`, as pass 1 blends each client. The caller has checked the parameters.
cudaError_t accumulate(float* acc, const int8_t* codes, const float* scale, const int32_t* zero_point,
                       const Layout& layout, float fraction, cudaStream_t stream);

}  // namespace fedhq::cuda
