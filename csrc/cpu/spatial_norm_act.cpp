// spatial_norm_act on the CPU: MoVQ's SpatialNorm plus activation,
// act((group_norm(f) * weight + bias) * up(scale) + up(shift)), with the nearest upsampling of the
// latent-resolution scale/shift done inside the kernel (`source` maps each position of f to its
// source position). Kernels in group_norm_kernel.h, drivers in group_norm_op.h.
#include "cpu/group_norm_op.h"

#include <torch/library.h>

namespace vqfast {
namespace cpu {
namespace {

at::Tensor small_map(const at::Tensor& t, const at::Tensor& f) {
  TORCH_CHECK(t.dim() == f.dim() && t.size(0) == f.size(0) && t.size(1) == f.size(1),
              "spatial_norm_act: scale/shift must have f's batch and channels");
  return t.to(at::kFloat).contiguous();
}

gn::Spatial spatial_args(const at::Tensor& f, const at::Tensor& scale, const at::Tensor& shift,
                         const at::Tensor& source) {
  TORCH_CHECK(scale.sizes() == shift.sizes(), "spatial_norm_act: scale and shift shapes differ");
  TORCH_CHECK(source.scalar_type() == at::kLong && source.is_contiguous() &&
                  source.numel() == (f.size(0) * f.size(1) ? f.numel() / (f.size(0) * f.size(1)) : 0),
              "spatial_norm_act: source must be int64 with one entry per spatial position of f");
  gn::Spatial sp;
  sp.scale = scale.const_data_ptr<float>();
  sp.shift = shift.const_data_ptr<float>();
  sp.src = source.const_data_ptr<int64_t>();
  sp.s = scale.size(0) * scale.size(1) ? scale.numel() / (scale.size(0) * scale.size(1)) : 0;
  return sp;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> spatial_norm_act(const at::Tensor& f, const at::Tensor& scale_in,
                                                                const at::Tensor& shift_in, const at::Tensor& source,
                                                                int64_t num_groups,
                                                                const std::optional<at::Tensor>& weight,
                                                                const std::optional<at::Tensor>& bias, double eps,
                                                                bool silu) {
  const at::Tensor scale = small_map(scale_in, f), shift = small_map(shift_in, f);
  return norm_forward<true>(f, num_groups, weight, bias, eps, silu, spatial_args(f, scale, shift, source));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> spatial_norm_act_backward(
    const at::Tensor& grad, const at::Tensor& f, const at::Tensor& scale_in, const at::Tensor& shift_in,
    const at::Tensor& source, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& mean, const at::Tensor& rstd, bool silu) {
  const at::Tensor scale = small_map(scale_in, f), shift = small_map(shift_in, f);
  gn::Spatial sp = spatial_args(f, scale, shift, source);
  at::Tensor grad_scale = at::zeros(scale.sizes(), scale.options());
  at::Tensor grad_shift = at::zeros(shift.sizes(), shift.options());
  sp.grad_scale = grad_scale.data_ptr<float>();
  sp.grad_shift = grad_shift.data_ptr<float>();
  auto [grad_f, grad_weight, grad_bias] = norm_backward<true>(grad, f, weight, bias, mean, rstd, silu, sp);
  return {grad_f, grad_scale.to(scale_in.scalar_type()), grad_shift.to(shift_in.scalar_type()), grad_weight,
          grad_bias};
}

}  // namespace
}  // namespace cpu
}  // namespace vqfast

TORCH_LIBRARY_IMPL(vqfast_C, CPU, m) {
  m.impl("spatial_norm_act", &vqfast::cpu::spatial_norm_act);
  m.impl("spatial_norm_act_backward", &vqfast::cpu::spatial_norm_act_backward);
}
