// nearest_code for CUDA tensors: csrc/cuda/nearest_code.cu, rows read in place as on the CPU.
#include "cuda/launch_utils.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

namespace vqfast {
namespace cuda {

// Also used by vector_quantize_launch.cpp: int64 indices, z's shape without `dim`.
at::Tensor nearest_code_cuda(const at::Tensor& z_in, const at::Tensor& codebook, int64_t dim) {
  TORCH_CHECK(z_in.is_cuda() && codebook.device() == z_in.device(),
              "nearest_code: tensors on one CUDA device expected");
  TORCH_CHECK(codebook.dim() == 2 && codebook.size(0) > 0, "nearest_code: codebook must be (K, D) with K > 0");
  TORCH_CHECK(z_in.scalar_type() == codebook.scalar_type(), "nearest_code: z and codebook dtypes differ");
  dim = c10::maybe_wrap_dim(dim, z_in.dim());
  TORCH_CHECK(z_in.size(dim) == codebook.size(1), "nearest_code: z's size along dim differs from codebook's D");
  const c10::cuda::CUDAGuard guard(z_in.device());
  std::vector<int64_t> shape;
  for (int64_t i = 0; i < z_in.dim(); ++i)
    if (i != dim) shape.push_back(z_in.size(i));
  at::Tensor out = at::empty(shape, z_in.options().dtype(at::kLong));
  if (out.numel() == 0) return out;
  if (codebook.size(1) == 0) return out.zero_();
  Rows rows;
  const at::Tensor z = as_rows(z_in, dim, rows);
  const int64_t splits = nearest_code_splits(rows.count(), codebook.size(0));
  at::Tensor part_dist, part_index;
  if (splits > 1) {
    part_dist = at::empty({splits * rows.count()}, z.options().dtype(at::kFloat));
    part_index = at::empty({splits * rows.count()}, z.options().dtype(at::kLong));
  }
  check(nearest_code(dtype_of(z, "nearest_code"), z.const_data_ptr(), view_of(rows), codebook_view(codebook), splits,
                     splits > 1 ? part_dist.mutable_data_ptr<float>() : nullptr,
                     splits > 1 ? part_index.mutable_data_ptr<int64_t>() : nullptr, out.mutable_data_ptr<int64_t>(),
                     stream()),
        "nearest_code (codebook rows longer than 8191 are not supported on CUDA)");
  return out;
}

}  // namespace cuda
}  // namespace vqfast

TORCH_LIBRARY_IMPL(vqfast_C, CUDA, m) { m.impl("nearest_code", &vqfast::cuda::nearest_code_cuda); }
