// group_norm_act for CUDA tensors: csrc/cuda/group_norm_act.cu through the drivers of norm_launch.h.
#include "cuda/norm_launch.h"

#include <torch/library.h>

namespace vqfast {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_act_cuda(const at::Tensor& x, int64_t num_groups,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   const std::optional<at::Tensor>& bias, double eps,
                                                                   bool silu) {
  return norm_forward_cuda(x, num_groups, weight, bias, nullptr, eps, silu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_act_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                                            const std::optional<at::Tensor>& weight,
                                                                            const std::optional<at::Tensor>& bias,
                                                                            const at::Tensor& mean,
                                                                            const at::Tensor& rstd, bool silu) {
  return norm_backward_cuda(grad, x, weight, bias, nullptr, mean, rstd, silu);
}

}  // namespace
}  // namespace cuda
}  // namespace vqfast

TORCH_LIBRARY_IMPL(vqfast_C, CUDA, m) {
  m.impl("group_norm_act", &vqfast::cuda::group_norm_act_cuda);
  m.impl("group_norm_act_backward", &vqfast::cuda::group_norm_act_backward_cuda);
}
