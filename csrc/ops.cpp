// Torch binding of the CPU kernels: registers them as torch.ops.fedhq_cpu.*, which
// fedhq_kernels/cpu.py hands to the dispatcher. This layer unpacks tensors, checks
// what the kernels must be able to trust (sizes, dtypes, parameter values) and
// allocates outputs; the kernels in csrc/cpu/ see only pointers.
//
// Argument conventions (shared with fedhq_kernels/ops.py): `axis` < 0 means
// per-tensor; scale is float32 and zero_point int32, one entry per channel.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cpu/kernels.h"

namespace fedhq::binding {
namespace {

using cpu::TensorLayout;

template <class F>
void dispatch_float_type(at::ScalarType type, const char* op, F&& f) {
  switch (type) {
    case at::kFloat: return f(float{});
    case at::kHalf: return f(half_t{});
    case at::kBFloat16: return f(bf16_t{});
    default: TORCH_CHECK_TYPE(false, op, ": expected a float32, float16 or bfloat16 tensor, got ", type);
  }
}

template <class T>
T* ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

template <class T>
const T* cptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}

// A fresh output buffer is first touched by the kernel, and on Linux the 4 KiB page
// faults of that first touch cost more than the kernel itself: 16M float32 outputs
// took ~35 ms to fault in vs ~7 ms to copy into an existing buffer on the 2-core CI
// machine. Asking for transparent huge pages on the (still untouched) buffer cuts
// the faults 512-fold. Only the 2 MiB-aligned interior is advised; no-op elsewhere.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(out.data_ptr()) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(out.data_ptr()) + out.nbytes()) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // advice only: ignore errors
#endif
  return out;
}

TensorLayout layout_of(const at::Tensor& x, int64_t axis, int64_t segment_base = 0) {
  return cpu::make_layout(std::vector<int64_t>(x.sizes().begin(), x.sizes().end()), axis, segment_base);
}

void check_range(const char* op, int64_t qmin, int64_t qmax) {
  TORCH_CHECK_VALUE(qmin < qmax && qmin >= -(1 << 15) && qmax < (1 << 15), op,
                    ": need -32768 <= quant_min < quant_max < 32768, got quant_min=", qmin, ", quant_max=", qmax);
}

// scale: finite and > 0; zero point inside [qmin, qmax]. `what` names whose they are.
void check_qparams(const char* op, const std::string& what, const at::Tensor& scale, const at::Tensor& zero_point,
                   int64_t channels, int64_t qmin, int64_t qmax) {
  TORCH_CHECK_VALUE(scale.scalar_type() == at::kFloat && zero_point.scalar_type() == at::kInt, op, ": ", what,
                    " scale must be float32 and zero_point int32");
  TORCH_CHECK_VALUE(scale.numel() == channels && zero_point.numel() == channels, op, ": ", what, " needs ",
                    channels, " scale / zero_point entries, got ", scale.numel(), " / ", zero_point.numel());
  const float* s = cptr<float>(scale);
  const int32_t* z = cptr<int32_t>(zero_point);
  for (int64_t c = 0; c < channels; ++c) {
    TORCH_CHECK_VALUE(std::isfinite(s[c]) && s[c] > 0.0f, op, ": ", what, " scale must be finite and > 0, got ",
                      s[c], channels > 1 ? " at channel " + std::to_string(c) : std::string());
    TORCH_CHECK_VALUE(z[c] >= qmin && z[c] <= qmax, op, ": ", what, " zero_point must lie in [", qmin, ", ", qmax,
                      "], got ", z[c], channels > 1 ? " at channel " + std::to_string(c) : std::string());
  }
}

void check_observed(const char* op, int64_t bad) {
  TORCH_CHECK_VALUE(bad < 0, op, ": the input contains NaN or Inf, so its range cannot be observed");
}

at::Tensor fake_quant(const at::Tensor& x_in, const at::Tensor& scale_in, const at::Tensor& zero_point_in,
                      int64_t qmin, int64_t qmax, int64_t axis) {
  check_range("fake_quant", qmin, qmax);
  const at::Tensor x = x_in.contiguous(), scale = scale_in.contiguous(), zero_point = zero_point_in.contiguous();
  const TensorLayout layout = layout_of(x, axis);
  check_qparams("fake_quant", "the", scale, zero_point, layout.channels, qmin, qmax);
  at::Tensor y = empty_output(x.sizes(), x.options());
  dispatch_float_type(x.scalar_type(), "fake_quant", [&](auto tag) {
    using T = decltype(tag);
    cpu::fake_quant<T>(cptr<T>(x), ptr<T>(y), layout, cptr<float>(scale), cptr<int32_t>(zero_point), int32_t(qmin),
                       int32_t(qmax), at::get_num_threads());
  });
  return y;
}

at::Tensor fake_quant_backward(const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& scale_in,
                               const at::Tensor& zero_point_in, int64_t qmin, int64_t qmax, int64_t axis) {
  check_range("fake_quant_backward", qmin, qmax);
  const at::Tensor x = x_in.contiguous(), scale = scale_in.contiguous(), zero_point = zero_point_in.contiguous();
  const at::Tensor grad = grad_in.to(x.scalar_type()).contiguous();
  TORCH_CHECK_VALUE(grad.sizes() == x.sizes(), "fake_quant_backward: grad shape ", grad.sizes(),
                    " differs from input shape ", x.sizes());
  const TensorLayout layout = layout_of(x, axis);
  check_qparams("fake_quant_backward", "the", scale, zero_point, layout.channels, qmin, qmax);
  at::Tensor grad_x = empty_output(x.sizes(), x.options());
  dispatch_float_type(x.scalar_type(), "fake_quant_backward", [&](auto tag) {
    using T = decltype(tag);
    cpu::fake_quant_backward<T>(cptr<T>(grad), cptr<T>(x), ptr<T>(grad_x), layout, cptr<float>(scale),
                                cptr<int32_t>(zero_point), int32_t(qmin), int32_t(qmax), at::get_num_threads());
  });
  return grad_x;
}

std::tuple<at::Tensor, at::Tensor> empty_qparams(const at::Tensor& x, int64_t axis) {
  const auto options = x.options().dtype(at::kFloat);
  if (axis < 0) return {at::empty({}, options), at::empty({}, options.dtype(at::kInt))};
  return {at::empty({x.size(axis)}, options), at::empty({x.size(axis)}, options.dtype(at::kInt))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quant_observed(const at::Tensor& x_in, int64_t qmin, int64_t qmax,
                                                                   bool symmetric, int64_t axis) {
  check_range("fake_quant", qmin, qmax);
  const at::Tensor x = x_in.contiguous();
  auto [scale, zero_point] = empty_qparams(x, axis);
  at::Tensor y = empty_output(x.sizes(), x.options());
  dispatch_float_type(x.scalar_type(), "fake_quant", [&](auto tag) {
    using T = decltype(tag);
    check_observed("fake_quant", cpu::fake_quant_observed<T>(cptr<T>(x), ptr<T>(y), layout_of(x, axis), symmetric,
                                                             int32_t(qmin), int32_t(qmax), ptr<float>(scale),
                                                             ptr<int32_t>(zero_point), at::get_num_threads()));
  });
  return {y, scale, zero_point};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize(const at::Tensor& x_in, int64_t qmin, int64_t qmax,
                                                        bool symmetric, int64_t axis) {
  check_range("quantize", qmin, qmax);
  TORCH_CHECK_VALUE(qmin >= -128 && qmax <= 127, "quantize: codes are stored as int8, got quant_min=", qmin,
                    ", quant_max=", qmax);
  const at::Tensor x = x_in.contiguous();
  auto [scale, zero_point] = empty_qparams(x, axis);
  at::Tensor codes = empty_output(x.sizes(), x.options().dtype(at::kChar));
  dispatch_float_type(x.scalar_type(), "quantize", [&](auto tag) {
    using T = decltype(tag);
    check_observed("quantize", cpu::quantize<T>(cptr<T>(x), ptr<int8_t>(codes), layout_of(x, axis), symmetric,
                                                int32_t(qmin), int32_t(qmax), ptr<float>(scale),
                                                ptr<int32_t>(zero_point), at::get_num_threads()));
  });
  return {codes, scale, zero_point};
}

at::Tensor dequantize(const at::Tensor& codes_in, const at::Tensor& scale_in, const at::Tensor& zero_point_in,
                      int64_t axis, at::ScalarType dtype) {
  TORCH_CHECK_TYPE(codes_in.scalar_type() == at::kChar, "dequantize: codes must be int8, got ",
                   codes_in.scalar_type());
  const at::Tensor codes = codes_in.contiguous(), scale = scale_in.contiguous(),
                   zero_point = zero_point_in.contiguous();
  const TensorLayout layout = layout_of(codes, axis);
  check_qparams("dequantize", "the", scale, zero_point, layout.channels, -128, 127);
  at::Tensor y = empty_output(codes.sizes(), codes.options().dtype(dtype));
  dispatch_float_type(dtype, "dequantize", [&](auto tag) {
    using T = decltype(tag);
    cpu::dequantize<T>(cptr<int8_t>(codes), ptr<T>(y), layout, cptr<float>(scale), cptr<int32_t>(zero_point),
                       at::get_num_threads());
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> aggregate(at::TensorList codes_in, at::TensorList scales_in,
                                                         at::TensorList zero_points_in, const at::Tensor& weights_in,
                                                         at::IntArrayRef axes, int64_t qmin, int64_t qmax,
                                                         bool symmetric, std::vector<std::string> names) {
  check_range("aggregate", qmin, qmax);
  TORCH_CHECK_VALUE(qmin >= -128 && qmax <= 127, "aggregate: codes are stored as int8");
  const int64_t tensors = int64_t(axes.size());
  const at::Tensor weights = weights_in.to(at::kFloat).contiguous();
  const int64_t clients = weights.numel();
  TORCH_CHECK_VALUE(clients > 0 && int64_t(codes_in.size()) == clients * tensors &&
                        scales_in.size() == codes_in.size() && zero_points_in.size() == codes_in.size() &&
                        int64_t(names.size()) == tensors,
                    "aggregate: expected ", clients, " clients x ", tensors, " tensors of codes, scales and zero points");

  std::vector<TensorLayout> layouts;
  std::vector<int64_t> element_base;
  int64_t elements = 0, segments = 0;
  for (int64_t t = 0; t < tensors; ++t) {
    layouts.push_back(layout_of(codes_in[size_t(t)], axes[size_t(t)], segments));
    element_base.push_back(elements);
    elements += layouts.back().numel;
    segments += layouts.back().channels;
  }

  std::vector<at::Tensor> keep;  // contiguous copies stay alive while the kernel runs
  std::vector<const int8_t*> codes;
  std::vector<const float*> scales;
  std::vector<const int32_t*> zero_points;
  for (int64_t k = 0; k < clients; ++k) {
    for (int64_t t = 0; t < tensors; ++t) {
      const size_t e = size_t(k * tensors + t);
      const std::string who = "client " + std::to_string(k) + "'s '" + names[size_t(t)] + "'";
      TORCH_CHECK_VALUE(codes_in[e].scalar_type() == at::kChar && codes_in[e].sizes() == codes_in[size_t(t)].sizes(),
                        "aggregate: ", who, " must be int8 codes of shape ", codes_in[size_t(t)].sizes());
      keep.push_back(codes_in[e].contiguous());
      codes.push_back(cptr<int8_t>(keep.back()));
      keep.push_back(scales_in[e].contiguous());
      keep.push_back(zero_points_in[e].contiguous());
      check_qparams("aggregate", who, keep[keep.size() - 2], keep.back(), layouts[size_t(t)].channels, qmin, qmax);
      scales.push_back(cptr<float>(keep[keep.size() - 2]));
      zero_points.push_back(cptr<int32_t>(keep.back()));
    }
  }

  const auto options = weights.options();
  at::Tensor workspace = empty_output({elements}, options.dtype(at::kFloat));
  at::Tensor out_codes = empty_output({elements}, options.dtype(at::kChar));
  at::Tensor out_scale = at::empty({segments}, options.dtype(at::kFloat));
  at::Tensor out_zero_point = at::empty({segments}, options.dtype(at::kInt));
  const cpu::ClientUpdates updates{codes.data(), scales.data(), zero_points.data(), cptr<float>(weights), clients};
  const int64_t bad = cpu::aggregate(updates, layouts, element_base, symmetric, int32_t(qmin), int32_t(qmax),
                                     ptr<float>(workspace), ptr<int8_t>(out_codes), ptr<float>(out_scale), ptr<int32_t>(out_zero_point),
                                     at::get_num_threads());
  TORCH_CHECK_VALUE(bad < 0, "aggregate: the weighted average of '", bad < 0 ? "" : names[size_t(bad)],
                    "' is not finite (client scales too large for float32)");
  return {out_codes, out_scale, out_zero_point};
}

}  // namespace

TORCH_LIBRARY(fedhq_cpu, m) {
  m.def("fake_quant(Tensor x, Tensor scale, Tensor zero_point, int quant_min, int quant_max, int axis) -> Tensor");
  m.def(
      "fake_quant_backward(Tensor grad, Tensor x, Tensor scale, Tensor zero_point, int quant_min, int quant_max, "
      "int axis) -> Tensor");
  m.def(
      "fake_quant_observed(Tensor x, int quant_min, int quant_max, bool symmetric, int axis) -> (Tensor, Tensor, "
      "Tensor)");
  m.def("quantize(Tensor x, int quant_min, int quant_max, bool symmetric, int axis) -> (Tensor, Tensor, Tensor)");
  m.def("dequantize(Tensor codes, Tensor scale, Tensor zero_point, int axis, ScalarType dtype) -> Tensor");
  m.def(
      "aggregate(Tensor[] codes, Tensor[] scales, Tensor[] zero_points, Tensor weights, int[] axes, int quant_min, "
      "int quant_max, bool symmetric, str[] names) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fedhq_cpu, CPU, m) {
  m.impl("fake_quant", &fake_quant);
  m.impl("fake_quant_backward", &fake_quant_backward);
  m.impl("fake_quant_observed", &fake_quant_observed);
  m.impl("quantize", &quantize);
  m.impl("dequantize", &dequantize);
  m.impl("aggregate", &aggregate);
}

}  // namespace fedhq::binding

// Importing fedhq_kernels._C loads this library, which runs the registrations above.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "FedHQ CPU kernels (torch.ops.fedhq_cpu)", -1, nullptr};
  return PyModule_Create(&module);
}
