// Fake quantization (quantize -> dequantize) on the CPU: one pass with given
// parameters, two passes (range, then write) when the range is observed, and the
// straight-through backward, which recomputes the clamp mask from the saved input
// instead of storing a byte per element.
#include "kernels.h"

namespace fedhq::cpu {

template <class T>
static void fake_quant_pass(const T* __restrict x, T* __restrict y, const TensorLayout& layout,
                            const std::vector<QParams>& params, int threads) {
  const std::vector<TensorLayout> layouts{layout};
  parallel_runs(layouts, make_tasks(layouts), threads, [&](int, int32_t, const Run& run) {
    const T* __restrict xr = x + run.begin;
    T* __restrict yr = y + run.begin;
    for_run(run, params.data(), [&](int64_t j, const QParams& p) {
      yr[j] = from_float<T>(fake_quant_value(to_float(xr[j]), p));
    });
  });
}

template <class T>
void fake_quant(const T* x, T* y, const TensorLayout& layout, const float* scale, const int32_t* zero_point,
                int32_t qmin, int32_t qmax, int threads) {
  fake_quant_pass(x, y, layout, given_qparams(scale, zero_point, layout.channels, qmin, qmax), threads);
}

template <class T>
void fake_quant_backward(const T* grad, const T* x, T* grad_x, const TensorLayout& layout, const float* scale,
                         const int32_t* zero_point, int32_t qmin, int32_t qmax, int threads) {
  const std::vector<QParams> params = given_qparams(scale, zero_point, layout.channels, qmin, qmax);
  const std::vector<TensorLayout> layouts{layout};
  parallel_runs(layouts, make_tasks(layouts), threads, [&](int, int32_t, const Run& run) {
    const T* __restrict gr = grad + run.begin;
    const T* __restrict xr = x + run.begin;
    T* __restrict out = grad_x + run.begin;
    for_run(run, params.data(), [&](int64_t j, const QParams& p) {
      // grad * mask as PyTorch computes it: a NaN gradient stays NaN even where masked.
      const float mask = in_range(unclamped_code(to_float(xr[j]), p), p) ? 1.0f : 0.0f;
      out[j] = from_float<T>(to_float(gr[j]) * mask);
    });
  });
}

// Rows of at most this many elements are rewritten while still in cache (64 KiB of
// float32: L2 on any x86 core).
constexpr int64_t kCachedRowMax = 1 << 14;

// Channels along the first axis whose rows fit in cache (a conv / linear weight: 9 to
// 4608 elements per output channel): each row is reduced, then rewritten from cache, so
// memory is read once instead of twice. Same range, parameters and bits as the two-pass
// path (min / max are exact in any order; a zero's sign does not reach the parameters).
template <class T>
static int64_t fake_quant_observed_rows(const T* x, T* y, const TensorLayout& layout, bool symmetric, int32_t qmin,
                                        int32_t qmax, float* scale, int32_t* zero_point, int threads) {
  const int64_t rows = layout.channels, len = layout.inner;
  const int64_t chunk = std::max<int64_t>(1, kTaskElems / len);
  const int used = int(std::max<int64_t>(1, std::min<int64_t>(threads, (rows + chunk - 1) / chunk)));
  int nonfinite = 0;
#pragma omp parallel for num_threads(used) schedule(dynamic, chunk) reduction(| : nonfinite) if (used > 1)
  for (int64_t c = 0; c < rows; ++c) {
    const T* __restrict xr = x + c * len;
    T* __restrict yr = y + c * len;
    float mn = std::numeric_limits<float>::infinity(), mx = -mn, probe = 0.0f;
#pragma omp simd reduction(min : mn) reduction(max : mx) reduction(+ : probe)
    for (int64_t j = 0; j < len; ++j) {
      const float v = to_float(xr[j]);
      mn = v < mn ? v : mn;
      mx = v > mx ? v : mx;
      probe += v - v;  // NaN for a NaN or +-Inf value
    }
    if (probe != 0.0f) {
      nonfinite = 1;
      continue;
    }
    qparams_from_range(mn, mx, symmetric, qmin, qmax, &scale[c], &zero_point[c]);
    const QParams p = make_qparams(scale[c], zero_point[c], qmin, qmax);
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) yr[j] = from_float<T>(fake_quant_value(to_float(xr[j]), p));
  }
  return nonfinite ? 0 : -1;
}

template <class T>
int64_t fake_quant_observed(const T* x, T* y, const TensorLayout& layout, bool symmetric, int32_t qmin,
                            int32_t qmax, float* scale, int32_t* zero_point, int threads) {
  const bool rows_in_cache = layout.channels > 1 && !layout.cycling() && layout.rows() == layout.channels &&
                             layout.inner <= kCachedRowMax && layout.numel > 0;
  if (rows_in_cache) return fake_quant_observed_rows(x, y, layout, symmetric, qmin, qmax, scale, zero_point, threads);
  const std::vector<TensorLayout> layouts{layout};
  std::vector<QParams> params;
  const int64_t bad = observe(layouts, make_tasks(layouts), threads, symmetric, qmin, qmax, scale, zero_point,
                              params, [&](int, int32_t, const Run& run) { return x + run.begin; });
  if (bad >= 0) return bad;
  fake_quant_pass(x, y, layout, params, threads);
  return -1;
}

#define FEDHQ_INSTANTIATE(T)                                                                                   \
  template void fake_quant<T>(const T*, T*, const TensorLayout&, const float*, const int32_t*, int32_t, int32_t, \
                              int);                                                                          \
  template void fake_quant_backward<T>(const T*, const T*, T*, const TensorLayout&, const float*, const int32_t*, \
                                       int32_t, int32_t, int);                                               \
  template int64_t fake_quant_observed<T>(const T*, T*, const TensorLayout&, bool, int32_t, int32_t, float*,     \
                                          int32_t*, int);
FEDHQ_INSTANTIATE(float)
FEDHQ_INSTANTIATE(half_t)
FEDHQ_INSTANTIATE(bf16_t)
#undef FEDHQ_INSTANTIATE

}  // namespace fedhq::cpu
