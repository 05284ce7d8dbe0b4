// quantize (observe the range, then write int8 codes) and dequantize on the GPU.
// Vectors are 16 elements: one 16-byte access on the int8 side, 2-4 on the float side.
#include "common.cuh"

namespace fedhq::cuda {
namespace {

template <class T>
struct QuantizeValue {
  __device__ __forceinline__ int8_t operator()(T v, const QParams& p) const { return quantize_value(to_float(v), p); }
};

template <class T>
struct DequantizeValue {
  __device__ __forceinline__ T operator()(int8_t code, const QParams& p) const {
    return from_float<T>(dequantize_code(float(code), p));
  }
};

template <class T>
using QuantizeOp = MapOp<T, int8_t, 16, 2, QuantizeValue<T>>;

template <class T>
using DequantizeOp = MapOp<int8_t, T, 16, 4, DequantizeValue<T>>;

// Dequantization's parameters: the given ones, each checked once (by the grid's
// threads, before the tiles) into Status.bad_qparam. The clamp range is irrelevant
// to dequantization; int8's bounds keep QParams valid and bound the zero points.
struct CheckedParams {
  GivenParams given;
  int64_t segments;
  Status* status;
  __device__ __forceinline__ QParams operator()(int64_t segment) const { return given(segment); }
  __device__ __forceinline__ void publish() const {
    for (int64_t s = global_thread(); s < segments; s += total_threads())
      if (bad_qparam(__ldg(given.scale + s), __ldg(given.zero_point + s), given.qmin, given.qmax))
        flag_bad_qparam(status, s);
  }
};

}  // namespace

cudaError_t quantize(FloatType type, const void* x, int8_t* codes, Layout layout, bool symmetric, int32_t qmin,
                     int32_t qmax, float* scale, int32_t* zero_point, void* workspace, cudaStream_t stream) {
  return dispatch_float_type(type, [&](auto tag) {
    using T = decltype(tag);
    return launch_observed<QuantizeOp<T>>(static_cast<const T*>(x), codes, layout, symmetric, qmin, qmax, scale,
                                          zero_point, workspace, stream);
  });
}

cudaError_t dequantize(FloatType type, const int8_t* codes, void* y, Layout layout, const float* scale,
                       const int32_t* zero_point, void* workspace, cudaStream_t stream) {
  return dispatch_float_type(type, [&](auto tag) {
    using T = decltype(tag);
    Status* status = static_cast<Status*>(workspace);
    const cudaError_t error = cudaMemsetAsync(status, 0, sizeof(Status), stream);
    if (error != cudaSuccess) return error;
    const TensorDesc d = make_desc(layout.numel, layout.channels, layout.inner, tile_elems<DequantizeOp<T>>());
    const DequantizeOp<T> op{codes, static_cast<T*>(y), aligned16(codes) && aligned16(y)};
    const CheckedParams params{GivenParams{scale, zero_point, -128, 127}, layout.channels, status};
    constexpr auto kernel = kElementwise<DequantizeOp<T>, CheckedParams>;
    kernel<<<grid_blocks<kernel>(pass2_warps(d, layout.channels)), kBlock, 0, stream>>>(op, params, d);
    return cudaGetLastError();
  });
}

}  // namespace fedhq::cuda
