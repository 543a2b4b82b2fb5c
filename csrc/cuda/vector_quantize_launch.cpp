// vector_quantize for CUDA tensors: the search of nearest_code_launch.cpp, then csrc/cuda/vector_quantize.cu.
#include "cuda/launch_utils.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>

namespace vqfast {
namespace cuda {
namespace {

// (w_z, w_q): weights of the loss term whose gradient goes to z and of the one going to the codebook.
std::pair<float, float> loss_weights(double beta, bool legacy) {
  return legacy ? std::pair<float, float>{1.f, static_cast<float>(beta)}
                : std::pair<float, float>{static_cast<float>(beta), 1.f};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> vector_quantize_cuda(const at::Tensor& z_in, const at::Tensor& codebook,
                                                                    double beta, bool legacy, int64_t dim) {
  dim = c10::maybe_wrap_dim(dim, z_in.dim());
  at::Tensor indices = nearest_code_cuda(z_in, codebook, dim).reshape(-1);  // checks devices, dtypes, sizes
  const c10::cuda::CUDAGuard guard(z_in.device());
  RowsOutput z_q(z_in, dim);
  Rows zr;
  const at::Tensor z = as_rows(z_in, dim, zr);
  at::Tensor part = at::empty({vector_quantize_blocks(zr.count())}, z.options().dtype(at::kDouble));
  at::Tensor loss = at::empty({}, z.options());
  const auto [w_z, w_q] = loss_weights(beta, legacy);
  check(vector_quantize(dtype_of(z, "vector_quantize"), z.const_data_ptr(), view_of(zr), codebook_view(codebook),
                        indices.const_data_ptr<int64_t>(), z_q.buffer.mutable_data_ptr(), view_of(z_q.rows),
                        part.mutable_data_ptr<double>(), w_z, w_q, loss.mutable_data_ptr(), stream()),
        "vector_quantize");
  return {z_q.finish(), loss, indices};
}

std::tuple<at::Tensor, at::Tensor> vector_quantize_backward_cuda(const at::Tensor& grad_z_q,
                                                                 const at::Tensor& grad_loss, const at::Tensor& z_in,
                                                                 const at::Tensor& codebook,
                                                                 const at::Tensor& indices_in, double beta, bool legacy,
                                                                 int64_t dim) {
  TORCH_CHECK(z_in.is_cuda() && codebook.device() == z_in.device() && grad_z_q.device() == z_in.device(),
              "vector_quantize_backward: tensors on one CUDA device expected");
  TORCH_CHECK(grad_z_q.sizes() == z_in.sizes() && grad_z_q.scalar_type() == z_in.scalar_type() &&
                  codebook.scalar_type() == z_in.scalar_type(),
              "vector_quantize_backward: grad_z_q, z and codebook must share shape / dtype");
  dim = c10::maybe_wrap_dim(dim, z_in.dim());
  TORCH_CHECK(codebook.dim() == 2 && z_in.size(dim) == codebook.size(1), "vector_quantize_backward: bad codebook");
  const c10::cuda::CUDAGuard guard(z_in.device());
  const at::Tensor indices = indices_in.to(at::kLong).contiguous();
  TORCH_CHECK(indices.numel() * z_in.size(dim) == z_in.numel(), "vector_quantize_backward: one index per row of z");
  RowsOutput grad_z(z_in, dim);
  Rows zr, gr;
  const at::Tensor z = as_rows(z_in, dim, zr);
  const at::Tensor grad = as_rows(grad_z_q, dim, gr);
  // 2 * grad_loss / numel in float32, as the reference (one scalar read back from the device).
  const float scale = 2.f * grad_loss.item<float>() / static_cast<float>(z.numel());
  const auto [w_z, w_q] = loss_weights(beta, legacy);
  CodeSegments seg(indices, codebook.size(0), codebook.size(1));
  check(vector_quantize_backward(dtype_of(z, "vector_quantize_backward"), grad.const_data_ptr(), view_of(gr),
                                 z.const_data_ptr(), view_of(zr), codebook_view(codebook),
                                 indices.const_data_ptr<int64_t>(), seg.order_ptr(), seg.start_ptr(), scale, w_z, w_q,
                                 grad_z.buffer.mutable_data_ptr(), view_of(grad_z.rows),
                                 seg.out.mutable_data_ptr<float>(), stream()),
        "vector_quantize_backward");
  return {grad_z.finish(), seg.out.to(codebook.scalar_type())};
}

}  // namespace
}  // namespace cuda
}  // namespace vqfast

TORCH_LIBRARY_IMPL(vqfast_C, CUDA, m) {
  m.impl("vector_quantize", &vqfast::cuda::vector_quantize_cuda);
  m.impl("vector_quantize_backward", &vqfast::cuda::vector_quantize_backward_cuda);
}
