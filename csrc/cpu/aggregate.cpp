// The server's aggregation on the CPU: dequantize every client's update, average
// with the clients' weights in float32 (a running mean: docs/kernels.md, "The
// weighted mean"), requantize with a freshly observed range; and the streaming step,
// one update blended into a caller-held running mean (accumulate).
// Whole models at once: all tensors form one packed index space, and each pass is
// one parallel sweep over it. Pass 1 averages and observes the range, keeping the
// float32 average in a workspace; pass 2 requantizes it. Averaging is the costly
// part on a CPU (compute-bound: 10 clients of a ResNet-18 took 69 ms on one core and
// 36 ms on two), so storing the average and re-reading it (4 + 4 bytes per parameter)
// beat recomputing it in pass 2 on the 2-core CI machine.
#include "kernels.h"

namespace fedhq::cpu {

// One step of the running weighted mean (reference._blend): acc[j] = (1 - b) *
// acc[j] + b * ((q[j] - zp) * s), in float32, for the update at `entry` with fraction b.
static void blend_run(const ClientUpdates& u, int64_t entry, float b, const Run& run, float* __restrict acc) {
  const int8_t* __restrict q = u.codes[entry] + run.begin;
  const float* __restrict s = u.scales[entry] + run.channel;
  const int32_t* __restrict z = u.zero_points[entry] + run.channel;
  const float keep = 1.0f - b;
  if (run.cycling) {
#pragma omp simd
    for (int64_t j = 0; j < run.len; ++j) acc[j] = keep * acc[j] + b * ((float(q[j]) - float(z[j])) * s[j]);
  } else {
    const float sk = s[0], zk = float(z[0]);
#pragma omp simd
    for (int64_t j = 0; j < run.len; ++j) acc[j] = keep * acc[j] + b * ((float(q[j]) - zk) * sk);
  }
}

// acc = 0, then every client k in order blended with its fraction u.weights[k].
// (Keeping sums for a block of 16-256 elements in registers while walking the clients
// was measured slower than this: the per-client setup per block costs more than the
// L1-resident acc traffic it saves.)
static void average_run(const ClientUpdates& u, int64_t tensors, int32_t t, const Run& run, float* __restrict acc) {
  std::fill(acc, acc + run.len, 0.0f);
  for (int64_t k = 0; k < u.clients; ++k) blend_run(u, k * tensors + t, u.weights[k], run, acc);
}

// The unweighted trimmed mean of the K dequantized values of each element, as
// reference._trimmed_mean: sort them, then sum ranks trim .. K - trim - 1 in ascending
// order in float32 from +0 and divide by their count (median: trim = (K - 1) / 2). A
// block of elements at a time, the clients' values as K rows, sorted by odd-even
// transposition (K rounds of vectorized min / max between neighbouring rows).
static void trimmed_run(const ClientUpdates& u, int64_t tensors, int32_t t, const Run& run, float* __restrict acc) {
  constexpr int64_t kBlock = 64;
  const int64_t K = u.clients, lo = u.trim, hi = u.clients - u.trim;
  const float count = float(hi - lo);
  std::vector<float> buffer(size_t(K * kBlock));
  for (int64_t b0 = 0; b0 < run.len; b0 += kBlock) {
    const int64_t n = std::min(kBlock, run.len - b0);
    for (int64_t k = 0; k < K; ++k) {  // row k: client k's dequantized values
      const int64_t entry = k * tensors + t;
      const int8_t* __restrict q = u.codes[entry] + run.begin + b0;
      const float* __restrict s = u.scales[entry] + run.channel + (run.cycling ? b0 : 0);
      const int32_t* __restrict z = u.zero_points[entry] + run.channel + (run.cycling ? b0 : 0);
      float* __restrict v = buffer.data() + k * kBlock;
      if (run.cycling) {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) v[j] = (float(q[j]) - float(z[j])) * s[j];
      } else {
        const float sk = s[0], zk = float(z[0]);
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) v[j] = (float(q[j]) - zk) * sk;
      }
    }
    for (int64_t round = 0; round < K; ++round) {
      for (int64_t k = round % 2; k + 1 < K; k += 2) {
        float* __restrict a = buffer.data() + k * kBlock;
        float* __restrict b = a + kBlock;
#pragma omp simd
        for (int64_t j = 0; j < kBlock; ++j) {
          const float x = a[j], y = b[j];
          a[j] = y < x ? y : x;
          b[j] = y < x ? x : y;
        }
      }
    }
    float* __restrict out = acc + b0;
    std::fill(out, out + n, 0.0f);
    for (int64_t r = lo; r < hi; ++r) {
      const float* __restrict v = buffer.data() + r * kBlock;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) out[j] += v[j];
    }
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) out[j] /= count;
  }
}

int64_t aggregate(const ClientUpdates& updates, const std::vector<TensorLayout>& layouts,
                  const std::vector<int64_t>& element_base, bool symmetric, int32_t qmin, int32_t qmax, float* workspace,
                  int8_t* codes, float* scale, int32_t* zero_point, int threads) {
  const int64_t tensors = int64_t(layouts.size());
  const std::vector<Task> tasks = make_tasks(layouts);
  auto average = [&](int, int32_t t, const Run& run) {
    float* acc = workspace + element_base[size_t(t)] + run.begin;
    if (updates.trim < 0) {
      average_run(updates, tensors, t, run, acc);
    } else {
      trimmed_run(updates, tensors, t, run, acc);
    }
    return acc;
  };
  std::vector<QParams> params;
  const int64_t bad = observe(layouts, tasks, threads, symmetric, qmin, qmax, scale, zero_point, params, average);
  if (bad >= 0) return bad;
  const QParams* p_all = params.data();
  parallel_runs(layouts, tasks, threads, [&](int, int32_t t, const Run& run) {
    const float* __restrict acc = workspace + element_base[size_t(t)] + run.begin;
    int8_t* __restrict out = codes + element_base[size_t(t)] + run.begin;
    for_run(run, p_all + layouts[size_t(t)].segment_base,
            [&](int64_t j, const QParams& p) { out[j] = quantize_value(acc[j], p); });
  });
  return -1;
}

void accumulate(const ClientUpdates& update, const std::vector<TensorLayout>& layouts,
                const std::vector<int64_t>& element_base, float* acc, int threads) {
  parallel_runs(layouts, make_tasks(layouts), threads, [&](int, int32_t t, const Run& run) {
    blend_run(update, t, update.weights[0], run, acc + element_base[size_t(t)] + run.begin);
  });
}

}  // namespace fedhq::cpu
