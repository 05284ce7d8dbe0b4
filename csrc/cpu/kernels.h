// Pointer-level entry points of the CPU kernels. No torch headers here: csrc/ops.cpp
// unpacks tensors, checks arguments and calls these; the kernels only compute.
// T is float, half_t or bf16_t. Per-channel tensors are described by a layout
// ([outer, channels, inner], see engine.h); scale / zero_point hold one entry per
// channel. Functions that observe a range return the index of the first tensor that
// holds a non-finite value, or -1.
#pragma once

#include <cstdint>
#include <vector>

#include "engine.h"

namespace fedhq::cpu {

// fake_quant.cpp
template <class T>
void fake_quant(const T* x, T* y, const TensorLayout& layout, const float* scale, const int32_t* zero_point,
                int32_t qmin, int32_t qmax, int threads);

template <class T>
void fake_quant_backward(const T* grad, const T* x, T* grad_x, const TensorLayout& layout, const float* scale,
                         const int32_t* zero_point, int32_t qmin, int32_t qmax, int threads);

template <class T>
int64_t fake_quant_observed(const T* x, T* y, const TensorLayout& layout, bool symmetric, int32_t qmin,
                            int32_t qmax, float* scale, int32_t* zero_point, int threads);

// quantize.cpp
template <class T>
int64_t quantize(const T* x, int8_t* codes, const TensorLayout& layout, bool symmetric, int32_t qmin, int32_t qmax,
                 float* scale, int32_t* zero_point, int threads);

template <class T>
void dequantize(const int8_t* codes, T* y, const TensorLayout& layout, const float* scale, const int32_t* zero_point,
                int threads);

// aggregate.cpp: clients' tensors are given client-major: entry k * T + t is client
// k's tensor t. Writes the requantized average of every tensor into one packed
// buffer (tensor t at element_base[t]) with its parameters at layouts[t].segment_base;
// `workspace` holds one float per element (the average, between the two passes).
struct ClientUpdates {
  const int8_t* const* codes;
  const float* const* scales;
  const int32_t* const* zero_points;
  const float* weights;  // one per client: its running fraction (functional.running_fractions)
  int64_t clients;
  int64_t trim = -1;  // < 0: weighted mean; else the trimmed mean cutting `trim` per end
};

int64_t aggregate(const ClientUpdates& updates, const std::vector<TensorLayout>& layouts,
                  const std::vector<int64_t>& element_base, bool symmetric, int32_t qmin, int32_t qmax, float* workspace,
                  int8_t* codes, float* scale, int32_t* zero_point, int threads);

// One update (`update.clients` == 1, its fraction in weights[0]) blended into the
// packed running mean `acc` (tensor t at element_base[t]).
void accumulate(const ClientUpdates& update, const std::vector<TensorLayout>& layouts,
                const std::vector<int64_t>& element_base, float* acc, int threads);

}  // namespace fedhq::cpu
