// quantize (observe the range, then write int8 codes) and dequantize on the CPU.
#include "kernels.h"

namespace fedhq::cpu {

template <class T>
int64_t quantize(const T* x, int8_t* codes, const TensorLayout& layout, bool symmetric, int32_t qmin, int32_t qmax,
                 float* scale, int32_t* zero_point, int threads) {
  const std::vector<TensorLayout> layouts{layout};
  const std::vector<Task> tasks = make_tasks(layouts);
  std::vector<QParams> params;
  const int64_t bad = observe(layouts, tasks, threads, symmetric, qmin, qmax, scale, zero_point, params,
                              [&](int, int32_t, const Run& run) { return x + run.begin; });
  if (bad >= 0) return bad;
  parallel_runs(layouts, tasks, threads, [&](int, int32_t, const Run& run) {
    const T* __restrict xr = x + run.begin;
    int8_t* __restrict out = codes + run.begin;
    for_run(run, params.data(), [&](int64_t j, const QParams& p) { out[j] = quantize_value(to_float(xr[j]), p); });
  });
  return -1;
}

template <class T>
void dequantize(const int8_t* codes, T* y, const TensorLayout& layout, const float* scale, const int32_t* zero_point,
                int threads) {
  // The clamp range is irrelevant to dequantization; int8's bounds keep QParams valid.
  const std::vector<QParams> params = given_qparams(scale, zero_point, layout.channels, -128, 127);
  const std::vector<TensorLayout> layouts{layout};
  parallel_runs(layouts, make_tasks(layouts), threads, [&](int, int32_t, const Run& run) {
    const int8_t* __restrict in = codes + run.begin;
    T* __restrict out = y + run.begin;
    for_run(run, params.data(),
            [&](int64_t j, const QParams& p) { out[j] = from_float<T>(dequantize_code(float(in[j]), p)); });
  });
}

#define FEDHQ_INSTANTIATE(T)                                                                                    \
  template int64_t quantize<T>(const T*, int8_t*, const TensorLayout&, bool, int32_t, int32_t, float*, int32_t*, \
                               int);                                                                          \
  template void dequantize<T>(const int8_t*, T*, const TensorLayout&, const float*, const int32_t*, int);
FEDHQ_INSTANTIATE(float)
FEDHQ_INSTANTIATE(half_t)
FEDHQ_INSTANTIATE(bf16_t)
#undef FEDHQ_INSTANTIATE

}  // namespace fedhq::cpu
