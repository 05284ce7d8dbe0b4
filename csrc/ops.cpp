// Torch binding of the CPU kernels (torch.ops.fedhq_cpu.*, fedhq_kernels._C): unpacks
// tensors, checks what the kernels must trust (binding.h) and allocates outputs; the
// kernels in csrc/cpu/ see only pointers. Conventions: docs/kernels.md.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include <ATen/EmptyTensor.h>

#include "binding.h"
#include "cpu/kernels.h"
#include "output_pool.h"

namespace fedhq::binding {
namespace {

using cpu::TensorLayout;

template <class F>
void dispatch_float_type(at::ScalarType type, const char* op, F&& f) {
  check_float_type(type, op);
  switch (type) {
    case at::kHalf: return f(half_t{});
    case at::kBFloat16: return f(bf16_t{});
    default: return f(float{});
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

// Outputs of a megabyte or more come from OutputPool (output_pool.h): a freed buffer of
// the same size when one is kept, else a fresh one advised for transparent huge pages.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t nbytes = size_t(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (nbytes < OutputPool::kMinBytes) return at::empty(sizes, options);
  return at::detail::empty_generic(sizes, &OutputPool::instance(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   options.dtype().toScalarType(), std::nullopt);
}

TensorLayout layout_of(const at::Tensor& x, int64_t axis, int64_t segment_base = 0) {
  return cpu::make_layout(std::vector<int64_t>(x.sizes().begin(), x.sizes().end()), axis, segment_base);
}

// fake_quant into `y` (a fresh output, or a checked out=).
void fake_quant_into(const at::Tensor& x_in, const at::Tensor& scale_in, const at::Tensor& zero_point_in, int64_t qmin,
                     int64_t qmax, int64_t axis, at::Tensor& y) {
  check_range("fake_quant", qmin, qmax);
  const at::Tensor x = x_in.contiguous(), scale = scale_in.contiguous(), zero_point = zero_point_in.contiguous();
  const TensorLayout layout = layout_of(x, axis);
  check_qparams("fake_quant", "the", scale, zero_point, layout.channels, qmin, qmax);
  dispatch_float_type(x.scalar_type(), "fake_quant", [&](auto tag) {
    using T = decltype(tag);
    cpu::fake_quant<T>(cptr<T>(x), ptr<T>(y), layout, cptr<float>(scale), cptr<int32_t>(zero_point), int32_t(qmin),
                       int32_t(qmax), at::get_num_threads());
  });
}

at::Tensor fake_quant(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point, int64_t qmin,
                      int64_t qmax, int64_t axis) {
  at::Tensor y = empty_output(x.sizes(), x.options());
  fake_quant_into(x, scale, zero_point, qmin, qmax, axis, y);
  return y;
}

void fake_quant_out(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point, int64_t qmin,
                    int64_t qmax, int64_t axis, at::Tensor out) {
  check_out("fake_quant", out, x, x.scalar_type(), {{"x", &x}, {"scale", &scale}, {"zero_point", &zero_point}});
  fake_quant_into(x, scale, zero_point, qmin, qmax, axis, out);
}

at::Tensor fake_quant_backward(const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& scale_in,
                               const at::Tensor& zero_point_in, int64_t qmin, int64_t qmax, int64_t axis) {
  check_range("fake_quant_backward", qmin, qmax);
  const at::Tensor x = x_in.contiguous(), scale = scale_in.contiguous(), zero_point = zero_point_in.contiguous();
  const at::Tensor grad = grad_in.to(x.scalar_type()).contiguous();
  check_same_shape("fake_quant_backward", grad, x);
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

// binding.h's observed_op on the CPU: kernel(tag, x, out, layout, scale, zero_point)
// runs the kernel for element type decltype(tag) and returns its non-finite report.
template <class Alloc, class Kernel>
std::tuple<at::Tensor, at::Tensor, at::Tensor> cpu_observed_op(const char* op, const at::Tensor& x_in, int64_t qmin,
                                                               int64_t qmax, int64_t axis, at::ScalarType out_type,
                                                               Alloc&& alloc, Kernel&& kernel) {
  return observed_op(op, x_in, qmin, qmax, axis, out_type, alloc,
                     [&](const at::Tensor& x, at::Tensor& out, at::Tensor& scale, at::Tensor& zero_point) {
                       int64_t bad = -1;
                       dispatch_float_type(x.scalar_type(), op, [&](auto tag) {
                         using T = decltype(tag);
                         bad = kernel(tag, cptr<T>(x), out, layout_of(x, axis), ptr<float>(scale),
                                      ptr<int32_t>(zero_point));
                       });
                       return bad;
                     });
}

template <class Alloc>
std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quant_observed_into(const at::Tensor& x, int64_t qmin,
                                                                        int64_t qmax, bool symmetric, int64_t axis,
                                                                        Alloc&& alloc) {
  return cpu_observed_op("fake_quant", x, qmin, qmax, axis, x.scalar_type(), alloc,
                         [&](auto tag, auto in, at::Tensor& y, const TensorLayout& layout, float* scale, int32_t* zp) {
                           using T = decltype(tag);
                           return cpu::fake_quant_observed<T>(in, ptr<T>(y), layout, symmetric, int32_t(qmin),
                                                              int32_t(qmax), scale, zp, at::get_num_threads());
                         });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quant_observed(const at::Tensor& x, int64_t qmin, int64_t qmax,
                                                                   bool symmetric, int64_t axis) {
  return fake_quant_observed_into(x, qmin, qmax, symmetric, axis, empty_output);
}

std::tuple<at::Tensor, at::Tensor> fake_quant_observed_out(const at::Tensor& x, int64_t qmin, int64_t qmax,
                                                           bool symmetric, int64_t axis, at::Tensor out) {
  check_out("fake_quant", out, x, x.scalar_type(), {{"x", &x}});
  const auto [y, scale, zero_point] =
      fake_quant_observed_into(x, qmin, qmax, symmetric, axis, [&](at::IntArrayRef, const at::TensorOptions&) { return out; });
  return {scale, zero_point};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize(const at::Tensor& x, int64_t qmin, int64_t qmax,
                                                        bool symmetric, int64_t axis) {
  return cpu_observed_op("quantize", x, qmin, qmax, axis, at::kChar, empty_output,
                         [&](auto tag, auto in, at::Tensor& codes, const TensorLayout& layout, float* scale, int32_t* zp) {
                           using T = decltype(tag);
                           return cpu::quantize<T>(in, ptr<int8_t>(codes), layout, symmetric, int32_t(qmin), int32_t(qmax),
                                                   scale, zp, at::get_num_threads());
                         });
}

// dequantize into `y` (a fresh output, or a checked out=), of y's float type.
void dequantize_into(const at::Tensor& codes_in, const at::Tensor& scale_in, const at::Tensor& zero_point_in,
                     int64_t axis, at::Tensor& y) {
  TORCH_CHECK_TYPE(codes_in.scalar_type() == at::kChar, "dequantize: codes must be int8, got ",
                   codes_in.scalar_type());
  const at::Tensor codes = codes_in.contiguous(), scale = scale_in.contiguous(),
                   zero_point = zero_point_in.contiguous();
  const TensorLayout layout = layout_of(codes, axis);
  check_qparams("dequantize", "the", scale, zero_point, layout.channels, -128, 127);
  dispatch_float_type(y.scalar_type(), "dequantize", [&](auto tag) {
    using T = decltype(tag);
    cpu::dequantize<T>(cptr<int8_t>(codes), ptr<T>(y), layout, cptr<float>(scale), cptr<int32_t>(zero_point),
                       at::get_num_threads());
  });
}

at::Tensor dequantize(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero_point, int64_t axis,
                      at::ScalarType dtype) {
  check_float_type(dtype, "dequantize");
  at::Tensor y = empty_output(codes.sizes(), codes.options().dtype(dtype));
  dequantize_into(codes, scale, zero_point, axis, y);
  return y;
}

void dequantize_out(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero_point, int64_t axis,
                    at::Tensor out) {
  check_float_type(out.scalar_type(), "dequantize");
  check_out("dequantize", out, codes, out.scalar_type(),
            {{"codes", &codes}, {"scale", &scale}, {"zero_point", &zero_point}});
  dequantize_into(codes, scale, zero_point, axis, out);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> aggregate(FEDHQ_AGGREGATE_PARAMS) {
  const auto [tensors, clients] =
      check_aggregate_args(codes_in, scales_in, zero_points_in, weights_in, axes, bits, qmin, qmax, names, trim);
  const at::Tensor weights = weights_in.to(at::kFloat).contiguous();

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
      const std::string who = aggregate_owner(k, names[size_t(t)]);
      const CodeRange range = input_range(who, bits[e]);
      check_aggregate_codes(who, codes_in[e], codes_in[size_t(t)]);
      keep.push_back(codes_in[e].contiguous());
      codes.push_back(cptr<int8_t>(keep.back()));
      keep.push_back(scales_in[e].contiguous());
      keep.push_back(zero_points_in[e].contiguous());
      check_qparams("aggregate", who, keep[keep.size() - 2], keep.back(), layouts[size_t(t)].channels, range.qmin,
                    range.qmax);
      scales.push_back(cptr<float>(keep[keep.size() - 2]));
      zero_points.push_back(cptr<int32_t>(keep.back()));
    }
  }

  const auto options = weights.options();
  at::Tensor workspace = empty_output({elements}, options.dtype(at::kFloat));
  at::Tensor out_codes = empty_output({elements}, options.dtype(at::kChar));
  at::Tensor out_scale = at::empty({segments}, options.dtype(at::kFloat));
  at::Tensor out_zero_point = at::empty({segments}, options.dtype(at::kInt));
  const cpu::ClientUpdates updates{codes.data(), scales.data(), zero_points.data(), cptr<float>(weights), clients, trim};
  const int64_t bad = cpu::aggregate(updates, layouts, element_base, symmetric, int32_t(qmin), int32_t(qmax),
                                     ptr<float>(workspace), ptr<int8_t>(out_codes), ptr<float>(out_scale), ptr<int32_t>(out_zero_point),
                                     at::get_num_threads());
  check_finite_average(bad, names);
  return {out_codes, out_scale, out_zero_point};
}

void accumulate(FEDHQ_ACCUMULATE_PARAMS) {
  const int64_t tensors = check_accumulate_args(acc, codes_in, scales_in, zero_points_in, axes, fraction, names);
  std::vector<TensorLayout> layouts;
  std::vector<int64_t> element_base;
  std::vector<at::Tensor> keep;  // contiguous copies stay alive while the kernel runs
  std::vector<const int8_t*> codes;
  std::vector<const float*> scales;
  std::vector<const int32_t*> zero_points;
  int64_t elements = 0;
  for (int64_t t = 0; t < tensors; ++t) {  // every tensor checked before acc is touched
    const std::string who = update_owner(names[size_t(t)]);
    TORCH_CHECK_VALUE(codes_in[size_t(t)].scalar_type() == at::kChar, "accumulate: ", who, " must be int8 codes");
    keep.push_back(codes_in[size_t(t)].contiguous());
    codes.push_back(cptr<int8_t>(keep.back()));
    layouts.push_back(layout_of(keep.back(), axes[size_t(t)]));
    element_base.push_back(elements);
    elements += layouts.back().numel;
    keep.push_back(scales_in[size_t(t)].contiguous());
    keep.push_back(zero_points_in[size_t(t)].contiguous());
    check_qparams("accumulate", who, keep[keep.size() - 2], keep.back(), layouts.back().channels, -128, 127);
    scales.push_back(cptr<float>(keep[keep.size() - 2]));
    zero_points.push_back(cptr<int32_t>(keep.back()));
  }
  const float b = float(fraction);
  const cpu::ClientUpdates update{codes.data(), scales.data(), zero_points.data(), &b, 1};
  cpu::accumulate(update, layouts, element_base, ptr<float>(acc), at::get_num_threads());
}

}  // namespace

FEDHQ_IMPLEMENT_OPS(fedhq_cpu, CPU)

// The output cache's controls (fedhq_kernels.output_cache_bytes, release_output_cache,
// set_output_cache_limit).
TORCH_LIBRARY(fedhq_output_cache, m) {
  m.def("held_bytes() -> int", [] { return OutputPool::instance().held_bytes(); });
  m.def("release() -> int", [] { return OutputPool::instance().release(); });
  m.def("set_limit(int limit_bytes) -> int", [](int64_t limit) { return OutputPool::instance().set_limit(limit); });
}

}  // namespace fedhq::binding

FEDHQ_PYTHON_MODULE(_C, "FedHQ CPU kernels (torch.ops.fedhq_cpu)")
