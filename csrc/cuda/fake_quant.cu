// Fake quantization on the GPU: one pass with given parameters, the fused observer
// (pass 1: range, pass 2: write), and the straight-through backward, which recomputes
// the clamp mask from the saved input (docs/kernels.md) instead of keeping a mask.
#include "common.cuh"

namespace fedhq::cuda {
namespace {

template <class T>
struct FakeQuantValue {
  __device__ __forceinline__ T operator()(T v, const QParams& p) const {
    return from_float<T>(fake_quant_value(to_float(v), p));
  }
};

template <class T>
using FakeQuantOp = MapOp<T, T, 16 / sizeof(T), 4, FakeQuantValue<T>>;

// grad * mask, as PyTorch computes it: a NaN gradient stays NaN even where masked.
__device__ __forceinline__ float masked_grad(float grad, float x, const QParams& p) {
  return grad * (in_range(unclamped_code(x, p), p) ? 1.0f : 0.0f);
}

template <class T>
struct BackwardOp {
  static constexpr int N = 16 / sizeof(T), U = 2;
  struct Batch {
    Vec<T, N> grad, x;
  };
  const T* __restrict__ grad;
  const T* __restrict__ x;
  T* __restrict__ grad_x;
  bool vec;
  __device__ __forceinline__ void load(int64_t i, Batch& b) const {
    load_vec(grad + i, b.grad);
    load_vec(x + i, b.x);
  }
  __device__ __forceinline__ void use(int64_t i, const Batch& b, const QParams& p) const {
    Vec<T, N> out;
#pragma unroll
    for (int j = 0; j < N; ++j) out.v[j] = from_float<T>(masked_grad(to_float(b.grad.v[j]), to_float(b.x.v[j]), p));
    store_vec(grad_x + i, out);
  }
  __device__ __forceinline__ void one(int64_t i, const QParams& p) const {
    grad_x[i] = from_float<T>(masked_grad(to_float(load_one(grad + i)), to_float(load_one(x + i)), p));
  }
};

// fake_quant and its backward: every tile through `op` with the given parameters.
template <class Op>
cudaError_t launch_given(const Op& op, const Layout& layout, const GivenParams& params, cudaStream_t stream) {
  const TensorDesc d = make_desc(layout.numel, layout.channels, layout.inner, tile_elems<Op>());
  if (d.tiles == 0) return cudaSuccess;
  constexpr auto kernel = kElementwise<Op, GivenParams>;
  kernel<<<grid_blocks<kernel>(d.tiles), kBlock, 0, stream>>>(op, params, d);
  return cudaGetLastError();
}

}  // namespace

cudaError_t fake_quant(FloatType type, const void* x, void* y, Layout layout, const float* scale,
                       const int32_t* zero_point, int32_t qmin, int32_t qmax, cudaStream_t stream) {
  return dispatch_float_type(type, [&](auto tag) {
    using T = decltype(tag);
    const FakeQuantOp<T> op{static_cast<const T*>(x), static_cast<T*>(y), aligned16(x) && aligned16(y)};
    return launch_given(op, layout, GivenParams{scale, zero_point, qmin, qmax}, stream);
  });
}

cudaError_t fake_quant_backward(FloatType type, const void* grad, const void* x, void* grad_x, Layout layout,
                                const float* scale, const int32_t* zero_point, int32_t qmin, int32_t qmax,
                                cudaStream_t stream) {
  return dispatch_float_type(type, [&](auto tag) {
    using T = decltype(tag);
    const BackwardOp<T> op{static_cast<const T*>(grad), static_cast<const T*>(x), static_cast<T*>(grad_x),
                           aligned16(grad) && aligned16(x) && aligned16(grad_x)};
    return launch_given(op, layout, GivenParams{scale, zero_point, qmin, qmax}, stream);
  });
}

cudaError_t fake_quant_observed(FloatType type, const void* x, void* y, Layout layout, bool symmetric, int32_t qmin,
                                int32_t qmax, float* scale, int32_t* zero_point, void* workspace,
                                cudaStream_t stream) {
  return dispatch_float_type(type, [&](auto tag) {
    using T = decltype(tag);
    return launch_observed<FakeQuantOp<T>>(static_cast<const T*>(x), static_cast<T*>(y), layout, symmetric, qmin,
                                           qmax, scale, zero_point, workspace, stream);
  });
}

}  // namespace fedhq::cuda
