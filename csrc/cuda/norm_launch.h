// Tensor-level drivers of csrc/cuda/group_norm_act.cu, shared by group_norm_act and spatial_norm_act,
// with the CPU drivers' layout and parameter handling (csrc/cpu/group_norm_op.h).
#pragma once

#include "cpu/group_norm_op.h"
#include "cuda/launch_utils.h"

#include <limits>
#include <optional>
#include <tuple>

namespace vqfast {
namespace cuda {

inline NormShape norm_shape(const at::Tensor& x, int64_t G, cpu::Layout layout) {
  const cpu::gn::Shape sh = cpu::shape_of(x, G);
  return {sh.N, sh.C, sh.S, G, layout == cpu::Layout::ChannelsLast};
}

// weight / bias as float32 on x's device (the kernels read them through raw pointers).
inline at::Tensor params_on(const std::optional<at::Tensor>& p, const at::Tensor& x) {
  const at::Tensor t = cpu::float_param(p);
  TORCH_CHECK(!t.defined() || (t.device() == x.device() && t.numel() == x.size(1)),
              "group_norm_act: weight and bias must have C elements on x's device");
  return t;
}

inline at::Tensor work_for(const NormShape& sh, const at::Tensor& x) {
  return at::empty({group_norm_work_floats(sh)}, x.options().dtype(at::kFloat));
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_forward_cuda(const at::Tensor& x_in, int64_t G,
                                                                       const std::optional<at::Tensor>& weight,
                                                                       const std::optional<at::Tensor>& bias,
                                                                       const SpatialArgs* spatial, double eps,
                                                                       bool silu) {
  TORCH_CHECK(x_in.is_cuda(), "group_norm_act: CUDA tensor expected");
  TORCH_CHECK(x_in.dim() >= 2 && G > 0 && x_in.size(1) % G == 0, "group_norm_act: bad shape or num_groups");
  const c10::cuda::CUDAGuard guard(x_in.device());
  auto [x, layout] = cpu::kernel_layout(x_in);
  auto [y, y_kernel] = cpu::output_like(x_in, x);
  const NormShape sh = norm_shape(x, G, layout);
  at::Tensor mean = at::empty({sh.N, G}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({sh.N, G}, x.options().dtype(at::kFloat));
  if (sh.N == 0) return {y, mean, rstd};
  if (sh.S == 0) {  // as torch.native_group_norm: mean 0, rstd NaN
    mean.zero_();
    rstd.fill_(std::numeric_limits<float>::quiet_NaN());
    return {y, mean, rstd};
  }
  const at::Tensor w = params_on(weight, x), b = params_on(bias, x);
  at::Tensor work = work_for(sh, x);
  check(group_norm_act(dtype_of(x, "group_norm_act"), x.const_data_ptr(), sh, cpu::ptr_or_null(w),
                       cpu::ptr_or_null(b), spatial, static_cast<float>(eps), silu, y_kernel.mutable_data_ptr(),
                       mean.mutable_data_ptr<float>(), rstd.mutable_data_ptr<float>(), work.mutable_data_ptr<float>(),
                       stream()),
        "group_norm_act");
  if (!y.is_same(y_kernel)) y.copy_(y_kernel);
  return {y, mean, rstd};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_backward_cuda(const at::Tensor& grad, const at::Tensor& x_in,
                                                                        const std::optional<at::Tensor>& weight,
                                                                        const std::optional<at::Tensor>& bias,
                                                                        const SpatialArgs* spatial,
                                                                        const at::Tensor& mean_in,
                                                                        const at::Tensor& rstd_in, bool silu) {
  TORCH_CHECK(x_in.is_cuda() && grad.device() == x_in.device(), "group_norm_act_backward: CUDA tensors expected");
  const c10::cuda::CUDAGuard guard(x_in.device());
  auto [x, layout] = cpu::kernel_layout(x_in);
  const at::Tensor g = cpu::as_layout(grad.to(x.scalar_type()), layout);
  auto [gx, gx_kernel] = cpu::output_like(x_in, x);
  const int64_t G = mean_in.size(1);
  const NormShape sh = norm_shape(x, G, layout);
  at::Tensor gw = at::zeros({sh.C}, x.options().dtype(at::kFloat));
  at::Tensor gb = at::zeros({sh.C}, x.options().dtype(at::kFloat));
  if (sh.N == 0 || sh.S == 0) return {gx, gw, gb};
  const at::Tensor w = params_on(weight, x), b = params_on(bias, x);
  const at::Tensor mean = mean_in.to(at::kFloat).contiguous(), rstd = rstd_in.to(at::kFloat).contiguous();
  at::Tensor work = work_for(sh, x);
  check(group_norm_act_backward(dtype_of(x, "group_norm_act_backward"), g.const_data_ptr(), x.const_data_ptr(), sh,
                                cpu::ptr_or_null(w), cpu::ptr_or_null(b), spatial, mean.const_data_ptr<float>(),
                                rstd.const_data_ptr<float>(), silu, gx_kernel.mutable_data_ptr(),
                                gw.mutable_data_ptr<float>(), gb.mutable_data_ptr<float>(),
                                work.mutable_data_ptr<float>(), stream()),
        "group_norm_act_backward");
  if (!gx.is_same(gx_kernel)) gx.copy_(gx_kernel);
  return {gx, gw, gb};
}

}  // namespace cuda
}  // namespace vqfast
