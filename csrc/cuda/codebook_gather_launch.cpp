// codebook_gather for CUDA tensors: csrc/cuda/codebook_gather.cu, indices and gradients read in place.
#include "cuda/codebook_gather.h"
#include "cuda/launch_utils.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

namespace vqfast {
namespace cuda {
namespace {

at::Tensor codebook_gather_cuda(const at::Tensor& indices, const at::Tensor& codebook, int64_t dim) {
  TORCH_CHECK(on_device(indices) && codebook.device() == indices.device(),
              "codebook_gather: tensors on one CUDA device expected");
  TORCH_CHECK(codebook.dim() == 2, "codebook_gather: codebook must be (K, D)");
  TORCH_CHECK(0 <= dim && dim <= indices.dim(), "codebook_gather: dim must be in [0, indices.dim()]");
  const DeviceGuard guard(codebook.device());
  std::vector<int64_t> shape(indices.sizes().begin(), indices.sizes().end());
  shape.insert(shape.begin() + dim, codebook.size(1));
  at::Tensor out = at::empty(shape, codebook.options());
  CodebookGatherParams p{};
  p.dtype = dtype_of(codebook, "codebook_gather");
  p.indices = indices.const_data_ptr<int64_t>();
  p.index_layout = indices_in_place(indices, "codebook_gather");
  p.cb = codebook_view(codebook);
  p.out = out.mutable_data_ptr();
  p.out_rows = rows_in_place(out, dim, "codebook_gather");  // contiguous: one or two dimensions
  check(codebook_gather(p, stream()), "codebook_gather");
  return out;
}

at::Tensor codebook_gather_backward_cuda(const at::Tensor& grad, const at::Tensor& indices, int64_t num_codes,
                                         int64_t dim) {
  TORCH_CHECK(on_device(grad) && indices.device() == grad.device(),
              "codebook_gather_backward: tensors on one CUDA device expected");
  TORCH_CHECK(0 <= dim && dim < grad.dim() && grad.dim() == indices.dim() + 1,
              "codebook_gather_backward: grad must have indices' shape with D inserted at dim");
  const DeviceGuard guard(grad.device());
  CodebookGatherBwdParams p{};
  p.dtype = dtype_of(grad, "codebook_gather_backward");
  p.grad = grad.const_data_ptr();
  p.grad_rows = rows_in_place(grad, dim, "codebook_gather_backward");
  p.indices = indices.const_data_ptr<int64_t>();
  p.index_layout = indices_in_place(indices, "codebook_gather_backward");
  TORCH_CHECK(p.grad_rows.count() == p.index_layout.numel, "codebook_gather_backward: one index per row of grad");
  p.K = num_codes;
  p.D = grad.size(dim);
  CodeSegments seg(indices, p.K, p.D);
  p.order = seg.order_ptr();
  p.start = seg.start_ptr();
  p.out = seg.out.mutable_data_ptr<float>();
  p.part = seg.part_ptr();
  check(codebook_gather_backward(p, stream()), "codebook_gather_backward");
  return seg.out.to(grad.scalar_type());
}

}  // namespace
}  // namespace cuda
}  // namespace vqfast

VQFAST_CUDA_LIBRARY_IMPL(m) {
  m.impl("codebook_gather", &vqfast::cuda::codebook_gather_cuda);
  m.impl("codebook_gather_backward", &vqfast::cuda::codebook_gather_backward_cuda);
}
