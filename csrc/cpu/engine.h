// The CPU execution engine shared by every op family: how tensors are cut into runs
// of elements that share quantization parameters, how runs are spread over OpenMP
// threads, and the fused range reduction (the observer) over those runs.
//
// A tensor is viewed as [outer, channels, inner] (per-tensor: one channel). Its
// elements are walked as runs of at most kRunMax elements:
//   - inner > 1 or one channel: a run lies inside one channel's contiguous row, so
//     its quantization parameters are constant (the common case: per-tensor, and
//     per-channel along axis 0);
//   - inner == 1 with several channels (per-channel along the last axis): a run is a
//     piece of one [channels] row and element j of the run belongs to channel
//     `first channel + j` ("cycling" runs, still vectorizable).
// Several tensors (a whole model) form one packed index space: each tensor's
// channels are numbered from its `segment_base` in the packed parameter arrays.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "../quant_math.h"

namespace fedhq::cpu {

constexpr int64_t kRunMax = 4096;        // elements per run: a run's float staging fits in L1
constexpr int64_t kTaskElems = 1 << 16;  // elements per parallel task: amortizes scheduling

struct Run {
  int64_t begin;    // first element, relative to the tensor
  int64_t len;
  int64_t channel;  // the run's channel, or its first channel when cycling
  bool cycling;
};

struct TensorLayout {
  int64_t numel;
  int64_t channels;  // 1 for per-tensor
  int64_t inner;     // elements between consecutive channels
  int64_t segment_base = 0;

  bool cycling() const { return channels > 1 && inner == 1; }
  int64_t run_len() const { return std::min(cycling() ? channels : inner, kRunMax); }
  int64_t pieces_per_row() const { return ((cycling() ? channels : inner) + kRunMax - 1) / kRunMax; }
  int64_t rows() const { return cycling() ? numel / channels : numel / inner; }
  int64_t run_count() const { return numel == 0 ? 0 : rows() * pieces_per_row(); }

  Run run(int64_t i) const {
    const int64_t pieces = pieces_per_row();
    const int64_t row = i / pieces;
    const int64_t offset = (i % pieces) * kRunMax;
    if (cycling()) return Run{row * channels + offset, std::min(kRunMax, channels - offset), offset, true};
    return Run{row * inner + offset, std::min(kRunMax, inner - offset), row % channels, false};
  }
};

// Per-tensor layout (axis < 0) or per-channel layout of a contiguous tensor.
inline TensorLayout make_layout(const std::vector<int64_t>& sizes, int64_t axis, int64_t segment_base = 0) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  if (axis < 0) return TensorLayout{numel, 1, std::max<int64_t>(numel, 1), segment_base};
  int64_t inner = 1;
  for (size_t d = size_t(axis) + 1; d < sizes.size(); ++d) inner *= sizes[d];
  return TensorLayout{numel, sizes[size_t(axis)], std::max<int64_t>(inner, 1), segment_base};
}

struct Task {
  int32_t tensor;
  int64_t first_run;
  int64_t end_run;
};

inline std::vector<Task> make_tasks(const std::vector<TensorLayout>& layouts) {
  std::vector<Task> tasks;
  for (size_t t = 0; t < layouts.size(); ++t) {
    const int64_t runs = layouts[t].run_count();
    const int64_t step = std::max<int64_t>(1, kTaskElems / std::max<int64_t>(1, layouts[t].run_len()));
    for (int64_t r = 0; r < runs; r += step) tasks.push_back(Task{int32_t(t), r, std::min(runs, r + step)});
  }
  return tasks;
}

// Calls body(thread, tensor, run) for every run of every tensor, tasks spread over
// up to `threads` OpenMP threads (torch's pool: the extension shares its libgomp).
template <class Body>
void parallel_runs(const std::vector<TensorLayout>& layouts, const std::vector<Task>& tasks, int threads,
                   Body&& body) {
  const int64_t n = int64_t(tasks.size());
  const int used = int(std::max<int64_t>(1, std::min<int64_t>(threads, n)));
#pragma omp parallel for num_threads(used) schedule(dynamic, 1) if (used > 1)
  for (int64_t i = 0; i < n; ++i) {
    const int thread = omp_get_thread_num();
    const Task& task = tasks[size_t(i)];
    const TensorLayout& layout = layouts[size_t(task.tensor)];
    for (int64_t r = task.first_run; r < task.end_run; ++r) body(thread, task.tensor, layout.run(r));
  }
}

// Per-thread min / max per segment, plus a per-tensor probe that becomes NaN when
// any value was NaN or +-Inf (v - v is 0 exactly for finite v).
class RangeReducer {
 public:
  RangeReducer(int64_t segments, int64_t tensors, int threads)
      : segments_(segments),
        tensors_(tensors),
        lo_(size_t(segments * threads), std::numeric_limits<float>::infinity()),
        hi_(size_t(segments * threads), -std::numeric_limits<float>::infinity()),
        probe_(size_t(tensors * threads), 0.0f) {}

  // Adds the run's values (x[0..run.len)) of tensor `tensor` seen by thread `thread`.
  template <class T>
  void add(int thread, int32_t tensor, const TensorLayout& layout, const Run& run, const T* __restrict x) {
    float* __restrict lo = lo_.data() + thread * segments_ + layout.segment_base + run.channel;
    float* __restrict hi = hi_.data() + thread * segments_ + layout.segment_base + run.channel;
    float probe = 0.0f;
    if (run.cycling) {
#pragma omp simd reduction(+ : probe)
      for (int64_t j = 0; j < run.len; ++j) {
        const float v = to_float(x[j]);
        lo[j] = min_f(v, lo[j]);
        hi[j] = max_f(v, hi[j]);
        probe += v - v;
      }
    } else {
      float mn = lo[0], mx = hi[0];
#pragma omp simd reduction(min : mn) reduction(max : mx) reduction(+ : probe)
      for (int64_t j = 0; j < run.len; ++j) {
        const float v = to_float(x[j]);
        mn = v < mn ? v : mn;
        mx = v > mx ? v : mx;
        probe += v - v;
      }
      lo[0] = mn;
      hi[0] = mx;
    }
    probe_[size_t(thread * tensors_ + tensor)] += probe;
  }

  // Folds the threads' partials into lo[0..segments), hi[0..segments). Returns the
  // index of the first tensor that held a non-finite value, or -1.
  int64_t finish(int threads, float* lo, float* hi) const {
    for (int64_t t = 0; t < tensors_; ++t)
      for (int th = 0; th < threads; ++th)
        if (probe_[size_t(th * tensors_ + t)] != 0.0f) return t;
    for (int64_t s = 0; s < segments_; ++s) {
      float mn = lo_[size_t(s)], mx = hi_[size_t(s)];
      for (int th = 1; th < threads; ++th) {
        mn = std::min(mn, lo_[size_t(th * segments_ + s)]);
        mx = std::max(mx, hi_[size_t(th * segments_ + s)]);
      }
      lo[s] = mn;
      hi[s] = mx;
    }
    return -1;
  }

 private:
  int64_t segments_, tensors_;
  std::vector<float> lo_, hi_, probe_;
};

// Observed range -> scale / zero point per segment, and the QParams the writers use.
inline void observe_qparams(const float* lo, const float* hi, int64_t segments, bool symmetric, int32_t qmin,
                            int32_t qmax, float* scale, int32_t* zero_point, std::vector<QParams>& params) {
  params.resize(size_t(segments));
  for (int64_t s = 0; s < segments; ++s) {
    qparams_from_range(lo[s], hi[s], symmetric, qmin, qmax, &scale[s], &zero_point[s]);
    params[size_t(s)] = make_qparams(scale[s], zero_point[s], qmin, qmax);
  }
}

// The fused observer over tensors whose values come from load(thread, tensor, run),
// which returns a pointer to the run's values: pass 1 of every op that observes a
// range. Fills scale / zero_point / params per segment; returns the first tensor
// holding a non-finite value, or -1.
template <class Load>
int64_t observe(const std::vector<TensorLayout>& layouts, const std::vector<Task>& tasks, int threads, bool symmetric,
                int32_t qmin, int32_t qmax, float* scale, int32_t* zero_point, std::vector<QParams>& params,
                Load&& load) {
  int64_t segments = 0;
  for (const TensorLayout& l : layouts) segments = std::max(segments, l.segment_base + l.channels);
  RangeReducer reducer(segments, int64_t(layouts.size()), threads);
  parallel_runs(layouts, tasks, threads, [&](int thread, int32_t tensor, const Run& run) {
    reducer.add(thread, tensor, layouts[size_t(tensor)], run, load(thread, tensor, run));
  });
  std::vector<float> lo(static_cast<size_t>(segments)), hi(static_cast<size_t>(segments));
  const int64_t bad = reducer.finish(threads, lo.data(), hi.data());
  if (bad < 0) observe_qparams(lo.data(), hi.data(), segments, symmetric, qmin, qmax, scale, zero_point, params);
  return bad;
}

inline std::vector<QParams> given_qparams(const float* scale, const int32_t* zero_point, int64_t segments,
                                          int32_t qmin, int32_t qmax) {
  std::vector<QParams> params(static_cast<size_t>(segments));
  for (int64_t s = 0; s < segments; ++s) params[size_t(s)] = make_qparams(scale[s], zero_point[s], qmin, qmax);
  return params;
}

// Applies f(value_index, params) over a run: constant params, or one per element
// when the run cycles through channels.
template <class F>
inline void for_run(const Run& run, const QParams* __restrict params, F&& f) {
  if (run.cycling) {
    const QParams* __restrict p = params + run.channel;
#pragma omp simd
    for (int64_t j = 0; j < run.len; ++j) f(j, p[j]);
  } else {
    const QParams p = params[run.channel];
#pragma omp simd
    for (int64_t j = 0; j < run.len; ++j) f(j, p);
  }
}

}  // namespace fedhq::cpu
