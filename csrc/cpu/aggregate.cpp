// The server's aggregation on the CPU: dequantize every client's update, average
// with the clients' weights in float32, requantize with a freshly observed range.
// Whole models at once: all tensors form one packed index space, and each pass is
// one parallel sweep over it. The average is recomputed in the second pass rather
// than stored: re-reading the int8 codes costs about as much as writing and reading
// a float32 copy, and saves allocating (and page-faulting) 4 bytes per parameter.
#include "kernels.h"

namespace fedhq::cpu {

// acc[j] = sum over clients k, in order, of w_k * ((q_k[j] - zp_k) * s_k), in float32.
static void average_run(const ClientUpdates& u, int64_t tensors, int32_t t, const Run& run, float* __restrict acc) {
  std::fill(acc, acc + run.len, 0.0f);
  for (int64_t k = 0; k < u.clients; ++k) {
    const int64_t entry = k * tensors + t;
    const int8_t* __restrict q = u.codes[entry] + run.begin;
    const float* __restrict s = u.scales[entry] + run.channel;
    const int32_t* __restrict z = u.zero_points[entry] + run.channel;
    const float w = u.weights[k];
    if (run.cycling) {
#pragma omp simd
      for (int64_t j = 0; j < run.len; ++j) acc[j] += w * ((float(q[j]) - float(z[j])) * s[j]);
    } else {
      const float sk = s[0], zk = float(z[0]);
#pragma omp simd
      for (int64_t j = 0; j < run.len; ++j) acc[j] += w * ((float(q[j]) - zk) * sk);
    }
  }
}

int64_t aggregate(const ClientUpdates& updates, const std::vector<TensorLayout>& layouts,
                  const std::vector<int64_t>& element_base, bool symmetric, int32_t qmin, int32_t qmax, int8_t* codes,
                  float* scale, int32_t* zero_point, int threads) {
  const int64_t tensors = int64_t(layouts.size());
  const std::vector<Task> tasks = make_tasks(layouts);
  std::vector<float> staging(size_t(threads * kRunMax));
  auto average = [&](int thread, int32_t t, const Run& run) {
    float* acc = staging.data() + thread * kRunMax;
    average_run(updates, tensors, t, run, acc);
    return acc;
  };
  std::vector<QParams> params;
  const int64_t bad = observe(layouts, tasks, threads, symmetric, qmin, qmax, scale, zero_point, params, average);
  if (bad >= 0) return bad;
  const QParams* p_all = params.data();
  parallel_runs(layouts, tasks, threads, [&](int thread, int32_t t, const Run& run) {
    const float* __restrict acc = average(thread, t, run);
    int8_t* __restrict out = codes + element_base[size_t(t)] + run.begin;
    for_run(run, p_all + layouts[size_t(t)].segment_base,
            [&](int64_t j, const QParams& p) { out[j] = quantize_value(acc[j], p); });
  });
  return -1;
}

}  // namespace fedhq::cpu
