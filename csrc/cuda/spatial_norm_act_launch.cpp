// spatial_norm_act for CUDA tensors: the SPATIAL path of csrc/cuda/group_norm_act.cu through the drivers
// of norm_launch.h; scale / shift read at latent resolution through `source` (nearest upsampling), as on
// the CPU (csrc/cpu/spatial_norm_act.cpp).
#include "cuda/norm_launch.h"

#include <torch/library.h>

namespace vqfast {
namespace cuda {
namespace {

// scale / shift as float32 (N, C, s) contiguous, and the kernels' view of them.
struct Spatial {
  at::Tensor scale, shift, order, start;
  SpatialArgs args{};
  Spatial(const at::Tensor& f, const at::Tensor& scale_in, const at::Tensor& shift_in, const at::Tensor& source) {
    TORCH_CHECK(scale_in.sizes() == shift_in.sizes(), "spatial_norm_act: scale and shift shapes differ");
    TORCH_CHECK(scale_in.dim() == f.dim() && scale_in.size(0) == f.size(0) && scale_in.size(1) == f.size(1),
                "spatial_norm_act: scale/shift must have f's batch and channels");
    TORCH_CHECK(scale_in.device() == f.device() && shift_in.device() == f.device() && source.device() == f.device(),
                "spatial_norm_act: tensors on one CUDA device expected");
    TORCH_CHECK(source.scalar_type() == at::kLong && source.is_contiguous() &&
                    source.numel() == (f.size(0) * f.size(1) ? f.numel() / (f.size(0) * f.size(1)) : 0),
                "spatial_norm_act: source must be int64 with one entry per spatial position of f");
    scale = scale_in.to(at::kFloat).contiguous();
    shift = shift_in.to(at::kFloat).contiguous();
    args.scale = scale.const_data_ptr<float>();
    args.shift = shift.const_data_ptr<float>();
    args.source = source.const_data_ptr<int64_t>();
    args.s = scale.size(0) * scale.size(1) ? scale.numel() / (scale.size(0) * scale.size(1)) : 0;
  }
  // For the backward: each small position's segment of f's positions, in order.
  void segments(const at::Tensor& source) {
    auto sorted = at::sort(source, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    order = std::get<1>(sorted);
    start = at::searchsorted(std::get<0>(sorted), at::arange(args.s + 1, source.options()));
    args.order = order.const_data_ptr<int64_t>();
    args.start = start.const_data_ptr<int64_t>();
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> spatial_norm_act_cuda(const at::Tensor& f, const at::Tensor& scale,
                                                                     const at::Tensor& shift, const at::Tensor& source,
                                                                     int64_t num_groups,
                                                                     const std::optional<at::Tensor>& weight,
                                                                     const std::optional<at::Tensor>& bias, double eps,
                                                                     bool silu) {
  TORCH_CHECK(f.is_cuda(), "spatial_norm_act: CUDA tensor expected");
  const c10::cuda::CUDAGuard guard(f.device());
  const Spatial sp(f, scale, shift, source);
  return norm_forward_cuda(f, num_groups, weight, bias, &sp.args, eps, silu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> spatial_norm_act_backward_cuda(
    const at::Tensor& grad, const at::Tensor& f, const at::Tensor& scale, const at::Tensor& shift,
    const at::Tensor& source, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& mean, const at::Tensor& rstd, bool silu) {
  TORCH_CHECK(f.is_cuda(), "spatial_norm_act_backward: CUDA tensor expected");
  const c10::cuda::CUDAGuard guard(f.device());
  Spatial sp(f, scale, shift, source);
  sp.segments(source);
  at::Tensor grad_scale = at::zeros(sp.scale.sizes(), sp.scale.options());
  at::Tensor grad_shift = at::zeros(sp.shift.sizes(), sp.shift.options());
  sp.args.grad_scale = grad_scale.mutable_data_ptr<float>();
  sp.args.grad_shift = grad_shift.mutable_data_ptr<float>();
  auto [grad_f, grad_weight, grad_bias] = norm_backward_cuda(grad, f, weight, bias, &sp.args, mean, rstd, silu);
  return {grad_f, grad_scale.to(scale.scalar_type()), grad_shift.to(shift.scalar_type()), grad_weight, grad_bias};
}

}  // namespace
}  // namespace cuda
}  // namespace vqfast

TORCH_LIBRARY_IMPL(vqfast_C, CUDA, m) {
  m.impl("spatial_norm_act", &vqfast::cuda::spatial_norm_act_cuda);
  m.impl("spatial_norm_act_backward", &vqfast::cuda::spatial_norm_act_backward_cuda);
}
