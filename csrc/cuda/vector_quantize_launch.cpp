// vector_quantize for CUDA tensors: the search of nearest_code_launch.cpp, then csrc/cuda/vector_quantize.cu.
#include "cuda/launch_utils.h"
#include "cuda/nearest_code_launch.h"
#include "cuda/vector_quantize.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace vqfast {
namespace cuda {
namespace {

using Quantized = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// (z_q, loss, indices, counts, sums); counts and sums only with `stats` (undefined otherwise).
Quantized quantize(const at::Tensor& z, const at::Tensor& codebook, double w_z, double w_q, int64_t dim, bool stats) {
  at::Tensor indices = nearest_code_cuda(z, codebook, dim).reshape(-1);  // checks devices, dtypes, sizes, dim
  const DeviceGuard guard(z.device());
  at::Tensor z_q = at::empty_like(z);
  at::Tensor loss = at::empty({}, z.options());
  VectorQuantizeParams p{};
  p.dtype = dtype_of(z, "vector_quantize");
  p.z = z.const_data_ptr();
  p.z_rows = rows_in_place(z, dim, "vector_quantize");
  p.cb = codebook_view(codebook);
  p.index = indices.const_data_ptr<int64_t>();
  p.z_q = z_q.mutable_data_ptr();
  p.z_q_rows = rows_in_place(z_q, dim, "vector_quantize");
  at::Tensor part = at::empty({vector_quantize_blocks(p.z_rows.count(), p.cb.D)}, z.options().dtype(at::kDouble));
  p.part = part.mutable_data_ptr<double>();
  p.w_z = static_cast<float>(w_z);
  p.w_q = static_cast<float>(w_q);
  p.loss = loss.mutable_data_ptr();
  at::Tensor code_rows, counts;
  std::optional<CodeSegments> sums;  // its out: zeroed for the atomic form, else with the sorted rows
  if (stats) {
    const int64_t K = codebook.size(0);
    code_rows = at::zeros({K}, z.options().dtype(at::kLong));
    counts = at::empty({K}, z.options().dtype(at::kFloat));
    sums.emplace(indices, K, codebook.size(1));
    p.code_rows = reinterpret_cast<unsigned long long*>(code_rows.mutable_data_ptr<int64_t>());
    p.counts = counts.mutable_data_ptr<float>();
    p.sums = sums->out.mutable_data_ptr<float>();
    p.order = sums->order_ptr();
    p.start = sums->start_ptr();
    p.scatter_part = sums->part_ptr();
  }
  check(vector_quantize(p, stream()), "vector_quantize");
  return {z_q, loss, indices, counts, stats ? sums->out : at::Tensor()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> vector_quantize_cuda(const at::Tensor& z, const at::Tensor& codebook,
                                                                    double w_z, double w_q, int64_t dim) {
  auto [z_q, loss, indices, counts, sums] = quantize(z, codebook, w_z, w_q, dim, false);
  return {z_q, loss, indices};
}

Quantized vector_quantize_stats_cuda(const at::Tensor& z, const at::Tensor& codebook, double w_z, double w_q,
                                     int64_t dim) {
  return quantize(z, codebook, w_z, w_q, dim, true);
}

std::tuple<at::Tensor, at::Tensor> vector_quantize_backward_cuda(const at::Tensor& grad_z_q,
                                                                 const at::Tensor& grad_loss, const at::Tensor& z,
                                                                 const at::Tensor& codebook, const at::Tensor& indices,
                                                                 double w_z, double w_q, int64_t dim) {
  TORCH_CHECK(on_device(z) && codebook.device() == z.device() && grad_z_q.device() == z.device() &&
                  grad_loss.device() == z.device() && indices.device() == z.device(),
              "vector_quantize_backward: tensors on one CUDA device expected");
  TORCH_CHECK(grad_z_q.sizes() == z.sizes() && grad_z_q.scalar_type() == z.scalar_type() &&
                  codebook.scalar_type() == z.scalar_type(),
              "vector_quantize_backward: grad_z_q, z and codebook must share shape / dtype");
  TORCH_CHECK(0 <= dim && dim < z.dim() && codebook.dim() == 2 && z.size(dim) == codebook.size(1),
              "vector_quantize_backward: bad dim or codebook");
  TORCH_CHECK(indices.scalar_type() == at::kLong && indices.is_contiguous() &&
                  indices.numel() * z.size(dim) == z.numel(),
              "vector_quantize_backward: indices must be int64, contiguous, one per row of z");
  TORCH_CHECK(grad_loss.numel() == 1, "vector_quantize_backward: grad_loss must hold one value");
  const DeviceGuard guard(z.device());
  at::Tensor grad_z = at::empty_like(z);
  const at::Tensor g_loss = grad_loss.to(z.scalar_type());  // one element, read on the device
  CodeSegments seg(indices, codebook.size(0), codebook.size(1));
  VectorQuantizeBwdParams p{};
  p.dtype = dtype_of(z, "vector_quantize_backward");
  p.grad_z_q = grad_z_q.const_data_ptr();
  p.grad_z_q_rows = rows_in_place(grad_z_q, dim, "vector_quantize_backward");
  p.grad_loss = g_loss.const_data_ptr();
  p.z = z.const_data_ptr();
  p.z_rows = rows_in_place(z, dim, "vector_quantize_backward");
  p.cb = codebook_view(codebook);
  p.index = indices.const_data_ptr<int64_t>();
  p.order = seg.order_ptr();
  p.start = seg.start_ptr();
  p.w_z = static_cast<float>(w_z);
  p.w_q = static_cast<float>(w_q);
  p.grad_z = grad_z.mutable_data_ptr();
  p.grad_z_rows = rows_in_place(grad_z, dim, "vector_quantize_backward");
  p.cb_grad = seg.out.mutable_data_ptr<float>();
  p.part = seg.part_ptr();
  check(vector_quantize_backward(p, stream()), "vector_quantize_backward");
  return {grad_z, seg.out.to(codebook.scalar_type())};
}

}  // namespace
}  // namespace cuda
}  // namespace vqfast

VQFAST_CUDA_LIBRARY_IMPL(m) {
  m.impl("vector_quantize", &vqfast::cuda::vector_quantize_cuda);
  m.impl("vector_quantize_stats", &vqfast::cuda::vector_quantize_stats_cuda);
  m.impl("vector_quantize_backward", &vqfast::cuda::vector_quantize_backward_cuda);
}
