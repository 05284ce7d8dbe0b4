// Torch-side helpers shared by the CPU binding (csrc/ops.cpp, torch.ops.fedhq_cpu)
// and the CUDA binding (csrc/cuda_ops.cpp, torch.ops.fedhq_cuda): the op
// registration, the Python module, the argument checks and their messages, so both
// backends reject the same input with the same words. Conventions: docs/kernels.md.
#pragma once

#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

namespace fedhq::binding {

// Registers a binding's functions, named as the ops, as namespace `ns`'s kernels for
// dispatch key `key`. The schemas are fedhq_kernels/optable.py's, declared by the
// Python side (cpu.py, cuda.py) once the library has loaded.
#define FEDHQ_IMPLEMENT_OPS(ns, key)                       \
  TORCH_LIBRARY_IMPL(ns, key, m) {                         \
    m.impl("fake_quant", &fake_quant);                     \
    m.impl("fake_quant_out", &fake_quant_out);             \
    m.impl("fake_quant_backward", &fake_quant_backward);   \
    m.impl("fake_quant_observed", &fake_quant_observed);   \
    m.impl("fake_quant_observed_out", &fake_quant_observed_out); \
    m.impl("quantize", &quantize);                         \
    m.impl("dequantize", &dequantize);                     \
    m.impl("dequantize_out", &dequantize_out);             \
    m.impl("aggregate", &aggregate);                       \
    m.impl("accumulate", &accumulate);                     \
  }

// The Python module fedhq_kernels.<name>: importing it loads the library, which runs
// its registrations.
#define FEDHQ_PYTHON_MODULE(name, doc)                                                                            \
  PyMODINIT_FUNC PyInit_##name(void) {                                                                            \
    static PyModuleDef module = {PyModuleDef_HEAD_INIT, #name, doc, -1, nullptr, nullptr, nullptr, nullptr, nullptr}; \
    return PyModule_Create(&module);                                                                              \
  }

// [outer, channels, inner] of a contiguous tensor quantized along `axis` (< 0: per
// tensor, one channel with inner = numel). inner is at least 1.
struct Dims {
  int64_t numel;
  int64_t channels;
  int64_t inner;
};

inline Dims dims_of(const at::Tensor& x, int64_t axis) {
  const int64_t numel = x.numel();
  if (axis < 0) return Dims{numel, 1, std::max<int64_t>(numel, 1)};
  int64_t inner = 1;
  for (int64_t d = axis + 1; d < x.dim(); ++d) inner *= x.size(d);
  return Dims{numel, x.size(axis), std::max<int64_t>(inner, 1)};
}

inline void check_float_type(at::ScalarType type, const char* op) {
  TORCH_CHECK_TYPE(type == at::kFloat || type == at::kHalf || type == at::kBFloat16, op,
                   ": expected a float32, float16 or bfloat16 tensor, got ", type);
}

inline void check_range(const char* op, int64_t qmin, int64_t qmax) {
  TORCH_CHECK_VALUE(qmin < qmax && qmin >= -(1 << 15) && qmax < (1 << 15), op,
                    ": need -32768 <= quant_min < quant_max < 32768, got quant_min=", qmin, ", quant_max=", qmax);
}

inline void check_int8_codes(const char* op, int64_t qmin, int64_t qmax) {
  TORCH_CHECK_VALUE(qmin >= -128 && qmax <= 127, op, ": codes are stored as int8, got quant_min=", qmin,
                    ", quant_max=", qmax);
}

// dtypes and counts of one scale / zero-point pair. `what` names whose they are.
inline void check_qparams_meta(const char* op, const std::string& what, const at::Tensor& scale,
                               const at::Tensor& zero_point, int64_t channels) {
  TORCH_CHECK_VALUE(scale.scalar_type() == at::kFloat && zero_point.scalar_type() == at::kInt, op, ": ", what,
                    " scale must be float32 and zero_point int32");
  TORCH_CHECK_VALUE(scale.numel() == channels && zero_point.numel() == channels, op, ": ", what, " needs ",
                    channels, " scale / zero_point entries, got ", scale.numel(), " / ", zero_point.numel());
}

// Channel c's scale: finite and > 0; its zero point inside [qmin, qmax].
inline void check_qparam_value(const char* op, const std::string& what, float scale, int32_t zero_point, int64_t c,
                               int64_t channels, int64_t qmin, int64_t qmax) {
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0.0f, op, ": ", what, " scale must be finite and > 0, got ",
                    scale, channels > 1 ? " at channel " + std::to_string(c) : std::string());
  TORCH_CHECK_VALUE(zero_point >= qmin && zero_point <= qmax, op, ": ", what, " zero_point must lie in [", qmin, ", ",
                    qmax, "], got ", zero_point, channels > 1 ? " at channel " + std::to_string(c) : std::string());
}

// Metadata and every value of contiguous CPU tensors, first bad channel first.
inline void check_qparams(const char* op, const std::string& what, const at::Tensor& scale,
                          const at::Tensor& zero_point, int64_t channels, int64_t qmin, int64_t qmax) {
  check_qparams_meta(op, what, scale, zero_point, channels);
  const float* s = scale.const_data_ptr<float>();
  const int32_t* z = zero_point.const_data_ptr<int32_t>();
  for (int64_t c = 0; c < channels; ++c) check_qparam_value(op, what, s[c], z[c], c, channels, qmin, qmax);
}

inline void check_observed(const char* op, int64_t bad) {
  TORCH_CHECK_VALUE(bad < 0, op, ": the input contains NaN or Inf, so its range cannot be observed");
}

inline void check_same_shape(const char* op, const at::Tensor& grad, const at::Tensor& x) {
  TORCH_CHECK_VALUE(grad.sizes() == x.sizes(), op, ": grad shape ", grad.sizes(), " differs from input shape ",
                    x.sizes());
}

// The `out` of an out= op: shaped like `like`, of `dtype`, on its device, contiguous
// (the kernels write it as one flat array) and sharing no memory with any input (the
// kernels read inputs and write out through restrict pointers; docs/kernels.md, "out= forms").
inline void check_out(const char* op, const at::Tensor& out, const at::Tensor& like, at::ScalarType dtype,
                      std::initializer_list<std::pair<const char*, const at::Tensor*>> inputs) {
  TORCH_CHECK_VALUE(out.sizes() == like.sizes(), op, ": out has shape ", out.sizes(), ", expected ", like.sizes());
  TORCH_CHECK_TYPE(out.scalar_type() == dtype, op, ": out is ", out.scalar_type(), ", expected ", dtype);
  TORCH_CHECK_VALUE(out.device() == like.device(), op, ": out is on ", out.device(), ", expected ", like.device());
  TORCH_CHECK_VALUE(out.is_contiguous(), op, ": out must be contiguous");
  for (const auto& [name, input] : inputs) {
    TORCH_CHECK_VALUE(!input->has_storage() || !out.storage().is_alias_of(input->storage()), op,
                      ": out shares memory with ", name);
  }
}

// Fresh scale / zero point outputs: 0-d per-tensor, [C] per-channel, on x's device.
inline std::tuple<at::Tensor, at::Tensor> empty_qparams(const at::Tensor& x, int64_t axis) {
  const auto options = x.options().dtype(at::kFloat);
  if (axis < 0) return {at::empty({}, options), at::empty({}, options.dtype(at::kInt))};
  return {at::empty({x.size(axis)}, options), at::empty({x.size(axis)}, options.dtype(at::kInt))};
}

// The frame of the observed ops (fake_quant_observed, quantize and their out= forms):
// checks, contiguous input, outputs (`out_type`: x's type, or int8 codes, from
// alloc(sizes, options): a fresh tensor, or the checked `out`); run(x, out, scale,
// zero_point) fills them and returns the first tensor holding a NaN / Inf, or -1.
template <class Alloc, class Run>
std::tuple<at::Tensor, at::Tensor, at::Tensor> observed_op(const char* op, const at::Tensor& x_in, int64_t qmin,
                                                           int64_t qmax, int64_t axis, at::ScalarType out_type,
                                                           Alloc&& alloc, Run&& run) {
  check_range(op, qmin, qmax);
  if (out_type == at::kChar) check_int8_codes(op, qmin, qmax);
  const at::Tensor x = x_in.contiguous();
  auto [scale, zero_point] = empty_qparams(x, axis);
  at::Tensor out = alloc(x.sizes(), x.options().dtype(out_type));
  check_observed(op, run(x, out, scale, zero_point));
  return {out, scale, zero_point};
}

// ---- aggregate ----

// aggregate's parameters as both bindings take them (its schema: optable.py).
#define FEDHQ_AGGREGATE_PARAMS                                                                                  \
  at::TensorList codes_in, at::TensorList scales_in, at::TensorList zero_points_in, const at::Tensor& weights_in, \
      at::IntArrayRef axes, at::IntArrayRef bits, int64_t qmin, int64_t qmax, bool symmetric,                    \
      std::vector<std::string> names, int64_t trim

struct AggregateCounts {
  int64_t tensors;
  int64_t clients;
};

// The output range and the counts of the client-major lists (one bit width per entry).
inline AggregateCounts check_aggregate_args(at::TensorList codes, at::TensorList scales, at::TensorList zero_points,
                                            const at::Tensor& weights, at::IntArrayRef axes, at::IntArrayRef bits,
                                            int64_t qmin, int64_t qmax, const std::vector<std::string>& names,
                                            int64_t trim) {
  check_range("aggregate", qmin, qmax);
  check_int8_codes("aggregate", qmin, qmax);
  const int64_t tensors = int64_t(axes.size()), clients = weights.numel();
  TORCH_CHECK_VALUE(clients > 0 && int64_t(codes.size()) == clients * tensors && scales.size() == codes.size() &&
                        zero_points.size() == codes.size() && int64_t(names.size()) == tensors,
                    "aggregate: expected ", clients, " clients x ", tensors, " tensors of codes, scales and zero points");
  TORCH_CHECK_VALUE(trim < 0 || 2 * trim < clients, "aggregate: trimming ", trim, " of ", clients,
                    " clients from each end leaves none");
  TORCH_CHECK_VALUE(bits.size() == codes.size(), "aggregate: expected ", codes.size(),
                    " bit widths (one per client x tensor), got ", bits.size());
  return {tensors, clients};
}

struct CodeRange {
  int64_t qmin;
  int64_t qmax;
};

// The signed code range of an entry's bit width (2..8): clients may send a tensor at
// different widths, each checked against its own. `owner` names the entry.
inline CodeRange input_range(const std::string& owner, int64_t bits) {
  TORCH_CHECK_VALUE(bits >= 2 && bits <= 8, "aggregate: ", owner, " bits must be an int in [2, 8], got ", bits);
  return {-(int64_t(1) << (bits - 1)), (int64_t(1) << (bits - 1)) - 1};
}

inline std::string aggregate_owner(int64_t client, const std::string& name) {
  return "client " + std::to_string(client) + "'s '" + name + "'";
}

// Entry e = k * tensors + t must hold int8 codes shaped like client 0's tensor t.
inline void check_aggregate_codes(const std::string& owner, const at::Tensor& codes, const at::Tensor& first) {
  TORCH_CHECK_VALUE(codes.scalar_type() == at::kChar && codes.sizes() == first.sizes(), "aggregate: ", owner,
                    " must be int8 codes of shape ", first.sizes());
}

// accumulate's parameters as both bindings take them (its schema: optable.py).
#define FEDHQ_ACCUMULATE_PARAMS                                                                          \
  const at::Tensor &acc, at::TensorList codes_in, at::TensorList scales_in, at::TensorList zero_points_in, \
      at::IntArrayRef axes, double fraction, std::vector<std::string> names

// The counts, acc (contiguous float32 holding every tensor's elements) and the
// fraction; returns the number of tensors.
inline int64_t check_accumulate_args(const at::Tensor& acc, at::TensorList codes, at::TensorList scales,
                                     at::TensorList zero_points, at::IntArrayRef axes, double fraction,
                                     const std::vector<std::string>& names) {
  const int64_t tensors = int64_t(axes.size());
  TORCH_CHECK_VALUE(int64_t(codes.size()) == tensors && scales.size() == codes.size() &&
                        zero_points.size() == codes.size() && int64_t(names.size()) == tensors,
                    "accumulate: expected ", tensors, " tensors of codes, scales, zero points and names");
  int64_t elements = 0;
  for (const at::Tensor& c : codes) elements += c.numel();
  TORCH_CHECK_VALUE(acc.scalar_type() == at::kFloat && acc.dim() == 1 && acc.numel() == elements && acc.is_contiguous(),
                    "accumulate: acc must be a contiguous 1-d float32 tensor of ", elements, " elements");
  TORCH_CHECK_VALUE(fraction >= 0.0 && fraction <= 1.0, "accumulate: fraction must lie in [0, 1], got ", fraction);
  return tensors;
}

inline std::string update_owner(const std::string& name) { return "the update's '" + name + "'"; }

inline void check_finite_average(int64_t bad, const std::vector<std::string>& names) {
  TORCH_CHECK_VALUE(bad < 0, "aggregate: the weighted average of '", bad < 0 ? "" : names[size_t(bad)],
                    "' is not finite (client scales too large for float32)");
}

}  // namespace fedhq::binding
