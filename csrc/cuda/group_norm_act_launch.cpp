// group_norm_act for CUDA tensors: csrc/cuda/group_norm_act.cu, every operand read or written in place;
// scale/shift (the spatial variant) read at the latent's resolution through `source`, as on the CPU.
#include "common/group_norm_args.h"
#include "cuda/group_norm_act.h"
#include "cuda/launch_utils.h"

#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

namespace vqfast {
namespace cuda {
namespace {

NormShape shape_of(const at::Tensor& x, int64_t G, bool channels_last) {
  return {x.size(0), x.size(1), spatial_numel(x), G, channels_last};
}

// The kernels' view of scale, shift and source (scale null without them).
SpatialArgs spatial_args(const at::Tensor& x, const OptTensor& scale, const OptTensor& shift,
                         const OptTensor& source) {
  SpatialArgs sp{};
  sp.s = spatial_positions(x, scale, shift, source);
  if (!given(scale)) return sp;
  sp.scale = scale->const_data_ptr<float>();
  sp.shift = shift->const_data_ptr<float>();
  sp.source = source->const_data_ptr<int64_t>();
  return sp;
}

at::Tensor work_for(const NormShape& sh, const at::Tensor& x, bool backward) {
  return at::empty({group_norm_work_floats(sh, backward)}, x.options().dtype(at::kFloat));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_act_cuda(const at::Tensor& x, int64_t num_groups,
                                                                   const OptTensor& weight, const OptTensor& bias,
                                                                   const OptTensor& scale, const OptTensor& shift,
                                                                   const OptTensor& source, double eps, bool silu) {
  TORCH_CHECK(on_device(x), "group_norm_act: CUDA tensor expected");
  TORCH_CHECK(x.dim() >= 2 && num_groups > 0 && x.size(1) % num_groups == 0,
              "group_norm_act: x must be (N, C, *spatial) with C divisible by num_groups");
  const DeviceGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({x.size(0), num_groups}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({x.size(0), num_groups}, x.options().dtype(at::kFloat));
  GroupNormFwdParams p{};
  p.spatial = spatial_args(x, scale, shift, source);
  if (x.size(0) == 0 || x.size(1) == 0) return {y, mean, rstd};
  if (spatial_numel(x) == 0) {  // as torch.native_group_norm: mean 0, rstd NaN
    mean.zero_();
    rstd.fill_(std::numeric_limits<float>::quiet_NaN());
    return {y, mean, rstd};
  }
  NormStrides st[2];
  p.shape = shape_of(x, num_groups, channels_last({&x, &y}, st));
  p.dtype = dtype_of(x, "group_norm_act");
  p.x = x.const_data_ptr();
  p.x_strides = st[0];
  p.y = y.mutable_data_ptr();
  p.y_strides = st[1];
  const at::Tensor w = float_param(weight, x), b = float_param(bias, x);
  p.weight = ptr_or_null(w);
  p.bias = ptr_or_null(b);
  p.eps = static_cast<float>(eps);
  p.silu = silu;
  p.mean = mean.mutable_data_ptr<float>();
  p.rstd = rstd.mutable_data_ptr<float>();
  at::Tensor work = work_for(p.shape, x, /*backward=*/false);
  p.work = work.mutable_data_ptr<float>();
  check(group_norm_act(p, stream()), "group_norm_act");
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_act_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& scale, const OptTensor& shift, const OptTensor& source, const at::Tensor& mean_in,
    const at::Tensor& rstd_in, bool silu) {
  TORCH_CHECK(on_device(x) && grad.device() == x.device(), "group_norm_act_backward: CUDA tensors expected");
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(),
              "group_norm_act_backward: grad must have x's shape and dtype");
  const DeviceGuard guard(x.device());
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor gx = at::empty_like(x);
  at::Tensor gw = at::zeros({x.size(1)}, f32), gb = at::zeros({x.size(1)}, f32);
  GroupNormBwdParams p{};
  p.spatial = spatial_args(x, scale, shift, source);
  const bool spatial = given(scale);
  at::Tensor g_scale = spatial ? at::empty(scale->sizes(), f32) : at::empty({0}, f32);
  at::Tensor g_shift = spatial ? at::empty(scale->sizes(), f32) : at::empty({0}, f32);
  if (x.size(0) == 0 || x.size(1) == 0 || spatial_numel(x) == 0) {
    return {gx, gw, gb, g_scale.zero_(), g_shift.zero_()};
  }
  // Each small position's segment of x's positions, in order, for a deterministic grad_scale/grad_shift.
  at::Tensor order, start;
  if (spatial) {
    auto sorted = at::sort(*source, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    order = std::get<1>(sorted);
    start = at::searchsorted(std::get<0>(sorted), at::arange(p.spatial.s + 1, source->options()));
    p.spatial.order = order.const_data_ptr<int64_t>();
    p.spatial.start = start.const_data_ptr<int64_t>();
    p.spatial.grad_scale = g_scale.mutable_data_ptr<float>();
    p.spatial.grad_shift = g_shift.mutable_data_ptr<float>();
  }
  NormStrides st[3];
  p.shape = shape_of(x, mean_in.size(1), channels_last({&grad, &x, &gx}, st));
  p.dtype = dtype_of(x, "group_norm_act_backward");
  p.grad = grad.const_data_ptr();
  p.grad_strides = st[0];
  p.x = x.const_data_ptr();
  p.x_strides = st[1];
  p.grad_x = gx.mutable_data_ptr();
  p.grad_x_strides = st[2];
  const at::Tensor w = float_param(weight, x), b = float_param(bias, x);
  p.weight = ptr_or_null(w);
  p.bias = ptr_or_null(b);
  const at::Tensor mean = mean_in.to(at::kFloat).contiguous(), rstd = rstd_in.to(at::kFloat).contiguous();
  p.mean = mean.const_data_ptr<float>();
  p.rstd = rstd.const_data_ptr<float>();
  p.silu = silu;
  p.grad_weight = gw.mutable_data_ptr<float>();
  p.grad_bias = gb.mutable_data_ptr<float>();
  at::Tensor work = work_for(p.shape, x, /*backward=*/true);
  p.work = work.mutable_data_ptr<float>();
  check(group_norm_act_backward(p, stream()), "group_norm_act_backward");
  return {gx, gw, gb, g_scale, g_shift};
}

}  // namespace
}  // namespace cuda
}  // namespace vqfast

VQFAST_CUDA_LIBRARY_IMPL(m) {
  m.impl("group_norm_act", &vqfast::cuda::group_norm_act_cuda);
  m.impl("group_norm_act_backward", &vqfast::cuda::group_norm_act_backward_cuda);
}
