// Torch binding of the CUDA kernels (torch.ops.fedhq_cuda.*, fedhq_kernels._C_cuda):
// unpacks tensors, allocates with torch's caching allocator and launches on the
// input's current stream through csrc/cuda/launchers.h. Checks and messages are
// binding.h's; host synchronization: docs/kernels.md.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "binding.h"
#include "cuda/launchers.h"

namespace fedhq::binding {
namespace {

namespace fc = fedhq::cuda;

fc::FloatType float_type(at::ScalarType type, const char* op) {
  check_float_type(type, op);
  return type == at::kHalf ? fc::FloatType::kFloat16
                           : type == at::kBFloat16 ? fc::FloatType::kBFloat16 : fc::FloatType::kFloat32;
}

fc::Layout layout_of(const at::Tensor& x, int64_t axis) {
  const Dims d = dims_of(x, axis);
  return fc::Layout{d.numel, d.channels, d.inner};
}

cudaStream_t stream_of(const at::Tensor& x) { return c10::cuda::getCurrentCUDAStream(x.device().index()).stream(); }

void check_launch(cudaError_t error, const char* op) {
  TORCH_CHECK(error == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(error));
}

void check_device(const char* op, const char* what, const at::Tensor& t, const at::Device& device) {
  TORCH_CHECK_VALUE(t.device() == device, op, ": ", what, " is on ", t.device(), ", expected ", device);
}

// Scale / zero point on x's device, contiguous. CUDA tensors must be on x's device
// and are not read (no synchronization); CPU tensors (e.g. 0-d parameters) are
// checked on the host, where that costs nothing, and copied over.
std::tuple<at::Tensor, at::Tensor> device_qparams(const char* op, const at::Tensor& x, const at::Tensor& scale_in,
                                                  const at::Tensor& zero_point_in, int64_t channels, int64_t qmin,
                                                  int64_t qmax) {
  check_qparams_meta(op, "the", scale_in, zero_point_in, channels);
  at::Tensor scale = scale_in.contiguous(), zero_point = zero_point_in.contiguous();
  if (scale.is_cpu() && zero_point.is_cpu()) check_qparams(op, "the", scale, zero_point, channels, qmin, qmax);
  for (at::Tensor* t : {&scale, &zero_point}) {
    if (t->is_cpu()) *t = t->to(x.device(), /*non_blocking=*/true);
  }
  check_device(op, "scale", scale, x.device());
  check_device(op, "zero_point", zero_point, x.device());
  return {scale, zero_point};
}

// The one device -> host read of an op that can fail on its data.
fc::Status read_status(const at::Tensor& workspace) {
  const at::Tensor host = workspace.narrow(0, 0, sizeof(fc::Status)).to(at::kCPU);
  fc::Status status;
  std::memcpy(&status, host.const_data_ptr(), sizeof status);
  return status;
}

at::Tensor empty_workspace(const at::Tensor& like, size_t bytes) {
  return at::empty({int64_t(bytes)}, like.options().dtype(at::kByte));
}

// fake_quant into `y` (a fresh output, or a checked out=).
void fake_quant_into(const at::Tensor& x_in, const at::Tensor& scale_in, const at::Tensor& zero_point_in, int64_t qmin,
                     int64_t qmax, int64_t axis, at::Tensor& y) {
  check_range("fake_quant", qmin, qmax);
  const fc::FloatType type = float_type(x_in.scalar_type(), "fake_quant");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const fc::Layout layout = layout_of(x, axis);
  const auto [scale, zero_point] =
      device_qparams("fake_quant", x, scale_in, zero_point_in, layout.channels, qmin, qmax);
  check_launch(fc::fake_quant(type, x.const_data_ptr(), y.data_ptr(), layout, scale.const_data_ptr<float>(),
                              zero_point.const_data_ptr<int32_t>(), int32_t(qmin), int32_t(qmax), stream_of(x)),
               "fake_quant");
}

at::Tensor fake_quant(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point, int64_t qmin,
                      int64_t qmax, int64_t axis) {
  at::Tensor y = at::empty(x.sizes(), x.options());
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
  const fc::FloatType type = float_type(x_in.scalar_type(), "fake_quant_backward");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  check_device("fake_quant_backward", "grad", grad_in, x.device());
  const at::Tensor grad = grad_in.to(x.scalar_type()).contiguous();
  check_same_shape("fake_quant_backward", grad, x);
  const fc::Layout layout = layout_of(x, axis);
  const auto [scale, zero_point] =
      device_qparams("fake_quant_backward", x, scale_in, zero_point_in, layout.channels, qmin, qmax);
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  check_launch(fc::fake_quant_backward(type, grad.const_data_ptr(), x.const_data_ptr(), grad_x.data_ptr(), layout,
                                       scale.const_data_ptr<float>(), zero_point.const_data_ptr<int32_t>(),
                                       int32_t(qmin), int32_t(qmax), stream_of(x)),
               "fake_quant_backward");
  return grad_x;
}

// binding.h's observed_op on the GPU: launch(type, x, out, layout, scale, zero_point,
// workspace, stream) queues the launcher; the one read-back follows.
template <class Alloc, class Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> cuda_observed_op(const char* op, const at::Tensor& x_in, int64_t qmin,
                                                                int64_t qmax, int64_t axis, at::ScalarType out_type,
                                                                Alloc&& alloc, Launch&& launch) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  return observed_op(op, x_in, qmin, qmax, axis, out_type, alloc,
                     [&](const at::Tensor& x, at::Tensor& out, at::Tensor& scale, at::Tensor& zero_point) {
                       const fc::FloatType type = float_type(x.scalar_type(), op);
                       const fc::Layout layout = layout_of(x, axis);
                       const at::Tensor workspace = empty_workspace(x, fc::observe_workspace_bytes(layout.channels));
                       check_launch(launch(type, x.const_data_ptr(), out.data_ptr(), layout, scale.data_ptr<float>(),
                                           zero_point.data_ptr<int32_t>(), workspace.data_ptr(), stream_of(x)),
                                    op);
                       return fc::first_nonfinite_tensor(read_status(workspace));
                     });
}

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) { return at::empty(sizes, options); }

template <class Alloc>
std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quant_observed_into(const at::Tensor& x, int64_t qmin,
                                                                        int64_t qmax, bool symmetric, int64_t axis,
                                                                        Alloc&& alloc) {
  return cuda_observed_op("fake_quant", x, qmin, qmax, axis, x.scalar_type(), alloc,
                          [&](fc::FloatType type, const void* in, void* y, fc::Layout layout, float* scale, int32_t* zp,
                              void* workspace, cudaStream_t stream) {
                            return fc::fake_quant_observed(type, in, y, layout, symmetric, int32_t(qmin), int32_t(qmax),
                                                           scale, zp, workspace, stream);
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
  return cuda_observed_op("quantize", x, qmin, qmax, axis, at::kChar, empty_output,
                          [&](fc::FloatType type, const void* in, void* codes, fc::Layout layout, float* scale, int32_t* zp,
                              void* workspace, cudaStream_t stream) {
                            return fc::quantize(type, in, static_cast<int8_t*>(codes), layout, symmetric, int32_t(qmin),
                                                int32_t(qmax), scale, zp, workspace, stream);
                          });
}

// dequantize into `y` (a fresh output, or a checked out=), of y's float type.
void dequantize_into(const at::Tensor& codes_in, const at::Tensor& scale_in, const at::Tensor& zero_point_in,
                     int64_t axis, at::Tensor& y) {
  TORCH_CHECK_TYPE(codes_in.scalar_type() == at::kChar, "dequantize: codes must be int8, got ",
                   codes_in.scalar_type());
  const fc::FloatType type = float_type(y.scalar_type(), "dequantize");
  const c10::cuda::CUDAGuard guard(codes_in.device());
  const at::Tensor codes = codes_in.contiguous();
  const fc::Layout layout = layout_of(codes, axis);
  const auto [scale, zero_point] =
      device_qparams("dequantize", codes, scale_in, zero_point_in, layout.channels, -128, 127);
  const at::Tensor workspace = empty_workspace(codes, sizeof(fc::Status));
  check_launch(fc::dequantize(type, codes.const_data_ptr<int8_t>(), y.data_ptr(), layout,
                              scale.const_data_ptr<float>(), zero_point.const_data_ptr<int32_t>(),
                              workspace.data_ptr(), stream_of(codes)),
               "dequantize");
  const int64_t bad = fc::first_bad_qparam(read_status(workspace));
  if (bad >= 0) {  // the error path may read more: the offending entry's values
    check_qparam_value("dequantize", "the", scale.reshape(-1)[bad].item<float>(),
                       zero_point.reshape(-1)[bad].item<int32_t>(), bad, layout.channels, -128, 127);
  }
}

at::Tensor dequantize(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero_point, int64_t axis,
                      at::ScalarType dtype) {
  check_float_type(dtype, "dequantize");
  at::Tensor y = at::empty(codes.sizes(), codes.options().dtype(dtype));
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
  const at::Device device = tensors > 0 ? codes_in[0].device() : weights_in.device();
  TORCH_CHECK_VALUE(device.is_cuda(), "aggregate: expected CUDA tensors, got codes on ", device);
  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor weights = weights_in.to(device, at::kFloat).contiguous();

  std::vector<fc::Layout> layouts;
  std::vector<int64_t> segment_base;
  for (int64_t t = 0; t < tensors; ++t) {
    segment_base.push_back(segment_base.empty() ? 0 : segment_base.back() + layouts.back().channels);
    layouts.push_back(layout_of(codes_in[size_t(t)], axes[size_t(t)]));
  }

  std::vector<at::Tensor> keep;  // contiguous copies stay alive until the kernels have run
  std::vector<fc::AggregateEntry> entries;
  std::vector<fc::EntryRange> ranges;  // each entry's own code range
  for (int64_t k = 0; k < clients; ++k) {
    for (int64_t t = 0; t < tensors; ++t) {
      const size_t e = size_t(k * tensors + t);
      const std::string who = aggregate_owner(k, names[size_t(t)]);
      const CodeRange range = input_range(who, bits[e]);
      check_aggregate_codes(who, codes_in[e], codes_in[size_t(t)]);
      check_qparams_meta("aggregate", who, scales_in[e], zero_points_in[e], layouts[size_t(t)].channels);
      for (const at::Tensor* in : {&codes_in[e], &scales_in[e], &zero_points_in[e]}) {
        check_device("aggregate", who.c_str(), *in, device);
        keep.push_back(in->contiguous());
      }
      const size_t n = keep.size();
      entries.push_back(fc::AggregateEntry{keep[n - 3].const_data_ptr<int8_t>(), keep[n - 2].const_data_ptr<float>(),
                                           keep[n - 1].const_data_ptr<int32_t>()});
      ranges.push_back(fc::EntryRange{int32_t(range.qmin), int32_t(range.qmax)});
    }
  }

  // The model's table goes to the device through pinned memory, without a sync; the
  // caching host allocator keeps the pinned block until the copy has run.
  at::Tensor host_table =
      at::empty({int64_t(fc::aggregate_table_bytes(tensors, clients))}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  const fc::AggregatePlan plan =
      fc::aggregate_write_table(host_table.data_ptr(), layouts.data(), tensors, entries.data(), ranges.data(), clients);
  const at::Tensor table = host_table.to(device, /*non_blocking=*/true);

  const auto options = weights.options();
  at::Tensor out_codes = at::empty({plan.elements}, options.dtype(at::kChar));
  at::Tensor out_scale = at::empty({plan.segments}, options.dtype(at::kFloat));
  at::Tensor out_zero_point = at::empty({plan.segments}, options.dtype(at::kInt));
  if (tensors == 0) return {out_codes, out_scale, out_zero_point};
  at::Tensor average;
  if (fc::aggregate_keeps_average(clients, trim)) average = at::empty({plan.elements}, options.dtype(at::kFloat));
  const at::Tensor workspace = empty_workspace(weights, fc::observe_workspace_bytes(plan.segments));
  check_launch(fc::aggregate(table.const_data_ptr(), plan, weights.const_data_ptr<float>(), trim, symmetric, int32_t(qmin),
                             int32_t(qmax), average.defined() ? average.data_ptr<float>() : nullptr,
                             out_codes.data_ptr<int8_t>(), out_scale.data_ptr<float>(),
                             out_zero_point.data_ptr<int32_t>(), workspace.data_ptr(), stream_of(out_codes)),
               "aggregate");

  const fc::Status status = read_status(workspace);
  const int64_t bad = fc::first_bad_qparam(status);
  if (bad >= 0) {  // client k's parameter of packed segment s: name it as the CPU binding does
    const int64_t k = bad / plan.segments, s = bad % plan.segments;
    const int64_t t = int64_t(std::upper_bound(segment_base.begin(), segment_base.end(), s) - segment_base.begin()) - 1;
    const int64_t c = s - segment_base[size_t(t)], e = k * tensors + t;
    check_qparam_value("aggregate", aggregate_owner(k, names[size_t(t)]),
                       scales_in[size_t(e)].reshape(-1)[c].item<float>(),
                       zero_points_in[size_t(e)].reshape(-1)[c].item<int32_t>(), c, layouts[size_t(t)].channels,
                       ranges[size_t(e)].qmin, ranges[size_t(e)].qmax);
  }
  check_finite_average(fc::first_nonfinite_tensor(status), names);
  return {out_codes, out_scale, out_zero_point};
}

void accumulate(FEDHQ_ACCUMULATE_PARAMS) {
  const int64_t tensors = check_accumulate_args(acc, codes_in, scales_in, zero_points_in, axes, fraction, names);
  const c10::cuda::CUDAGuard guard(acc.device());
  std::vector<fc::Layout> layouts;
  std::vector<at::Tensor> keep;  // contiguous copies stay alive until the kernels have run
  std::vector<at::Tensor> bad;
  for (int64_t t = 0; t < tensors; ++t) {  // every tensor checked before acc is touched
    const std::string who = update_owner(names[size_t(t)]);
    TORCH_CHECK_VALUE(codes_in[size_t(t)].scalar_type() == at::kChar, "accumulate: ", who, " must be int8 codes");
    layouts.push_back(layout_of(codes_in[size_t(t)], axes[size_t(t)]));
    check_qparams_meta("accumulate", who, scales_in[size_t(t)], zero_points_in[size_t(t)], layouts.back().channels);
    for (const at::Tensor* in : {&codes_in[size_t(t)], &scales_in[size_t(t)], &zero_points_in[size_t(t)]}) {
      check_device("accumulate", who.c_str(), *in, acc.device());
      keep.push_back(in->contiguous());
    }
    const at::Tensor& s = keep[keep.size() - 2];
    const at::Tensor& z = keep.back();
    bad.push_back((s.isfinite().logical_not() | (s <= 0) | (z < -128) | (z > 127)).any().reshape({1}));
  }
  if (tensors > 0 && at::cat(bad).any().item<bool>()) {  // one read-back; the error path names the value
    for (int64_t t = 0; t < tensors; ++t) {
      check_qparams("accumulate", update_owner(names[size_t(t)]), keep[size_t(3 * t + 1)].cpu(),
                    keep[size_t(3 * t + 2)].cpu(), layouts[size_t(t)].channels, -128, 127);
    }
  }
  int64_t start = 0;
  for (int64_t t = 0; t < tensors; ++t) {
    check_launch(fc::accumulate(acc.data_ptr<float>() + start, keep[size_t(3 * t)].const_data_ptr<int8_t>(),
                                keep[size_t(3 * t + 1)].const_data_ptr<float>(),
                                keep[size_t(3 * t + 2)].const_data_ptr<int32_t>(), layouts[size_t(t)], float(fraction),
                                stream_of(acc)),
                 "accumulate");
    start += layouts[size_t(t)].numel;
  }
}

}  // namespace

FEDHQ_IMPLEMENT_OPS(fedhq_cuda, CUDA)

}  // namespace fedhq::binding

FEDHQ_PYTHON_MODULE(_C_cuda, "FedHQ CUDA kernels (torch.ops.fedhq_cuda)")
