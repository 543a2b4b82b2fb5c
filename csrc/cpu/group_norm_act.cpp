// group_norm_act on the CPU: act(group_norm(x) * weight + bias), forward and backward
// (kernels in group_norm_kernel.h, drivers in group_norm_op.h).
#include "cpu/group_norm_op.h"

#include <torch/library.h>

namespace vqfast {
namespace cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_act(const at::Tensor& x, int64_t num_groups,
                                                              const std::optional<at::Tensor>& weight,
                                                              const std::optional<at::Tensor>& bias, double eps,
                                                              bool silu) {
  return norm_forward<false>(x, num_groups, weight, bias, eps, silu, gn::Spatial{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_act_backward(const at::Tensor& grad, const at::Tensor& x,
                                                                       const std::optional<at::Tensor>& weight,
                                                                       const std::optional<at::Tensor>& bias,
                                                                       const at::Tensor& mean, const at::Tensor& rstd,
                                                                       bool silu) {
  return norm_backward<false>(grad, x, weight, bias, mean, rstd, silu, gn::Spatial{});
}

}  // namespace
}  // namespace cpu
}  // namespace vqfast

TORCH_LIBRARY_IMPL(vqfast_C, CPU, m) {
  m.impl("group_norm_act", &vqfast::cpu::group_norm_act);
  m.impl("group_norm_act_backward", &vqfast::cpu::group_norm_act_backward);
}
