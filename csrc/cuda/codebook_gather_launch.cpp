// codebook_gather for CUDA tensors: csrc/cuda/codebook_gather.cu.
#include "cuda/launch_utils.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

namespace vqfast {
namespace cuda {
namespace {

at::Tensor codebook_gather_cuda(const at::Tensor& indices_in, const at::Tensor& codebook, int64_t dim) {
  TORCH_CHECK(indices_in.is_cuda() && codebook.device() == indices_in.device(),
              "codebook_gather: tensors on one CUDA device expected");
  TORCH_CHECK(codebook.dim() == 2, "codebook_gather: codebook must be (K, D)");
  const c10::cuda::CUDAGuard guard(codebook.device());
  dim = c10::maybe_wrap_dim(dim, indices_in.dim() + 1);
  const at::Tensor indices = indices_in.to(at::kLong).contiguous();
  std::vector<int64_t> shape(indices.sizes().begin(), indices.sizes().end());
  shape.insert(shape.begin() + dim, codebook.size(1));
  at::Tensor out = at::empty(shape, codebook.options());
  Rows rows;
  collapse_rows(out, dim, rows);  // contiguous: always collapses
  check(codebook_gather(dtype_of(codebook, "codebook_gather"), indices.const_data_ptr<int64_t>(),
                        codebook_view(codebook), out.mutable_data_ptr(), view_of(rows), stream()),
        "codebook_gather");
  return out;
}

at::Tensor codebook_gather_backward_cuda(const at::Tensor& grad_in, const at::Tensor& indices_in, int64_t num_codes,
                                         int64_t dim) {
  TORCH_CHECK(grad_in.is_cuda() && indices_in.device() == grad_in.device(),
              "codebook_gather_backward: tensors on one CUDA device expected");
  const c10::cuda::CUDAGuard guard(grad_in.device());
  dim = c10::maybe_wrap_dim(dim, grad_in.dim());
  const at::Tensor indices = indices_in.to(at::kLong).reshape(-1).contiguous();
  TORCH_CHECK(indices.numel() * grad_in.size(dim) == grad_in.numel() || grad_in.size(dim) == 0,
              "codebook_gather_backward: one index per row of grad");
  const int64_t D = grad_in.size(dim);
  Rows rows;
  const at::Tensor grad = as_rows(grad_in, dim, rows);
  CodeSegments seg(indices, num_codes, D);
  check(codebook_gather_backward(dtype_of(grad, "codebook_gather_backward"), grad.const_data_ptr(), view_of(rows), D,
                                 indices.const_data_ptr<int64_t>(), seg.order_ptr(), seg.start_ptr(), num_codes,
                                 seg.out.mutable_data_ptr<float>(), stream()),
        "codebook_gather_backward");
  return seg.out.to(grad.scalar_type());
}

}  // namespace
}  // namespace cuda
}  // namespace vqfast

TORCH_LIBRARY_IMPL(vqfast_C, CUDA, m) {
  m.impl("codebook_gather", &vqfast::cuda::codebook_gather_cuda);
  m.impl("codebook_gather_backward", &vqfast::cuda::codebook_gather_backward_cuda);
}
