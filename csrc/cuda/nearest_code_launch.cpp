// nearest_code for CUDA tensors: csrc/cuda/nearest_code.cu, rows read in place as on the CPU.
#include "cuda/nearest_code_launch.h"

#include "cuda/launch_utils.h"
#include "cuda/nearest_code.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

namespace vqfast {
namespace cuda {

at::Tensor nearest_code_cuda(const at::Tensor& z, const at::Tensor& codebook, int64_t dim) {
  TORCH_CHECK(on_device(z) && codebook.device() == z.device(), "nearest_code: tensors on one CUDA device expected");
  TORCH_CHECK(codebook.dim() == 2 && codebook.size(0) > 0, "nearest_code: codebook must be (K, D) with K > 0");
  TORCH_CHECK(z.scalar_type() == codebook.scalar_type(), "nearest_code: z and codebook dtypes differ");
  TORCH_CHECK(0 <= dim && dim < z.dim(), "nearest_code: dim must be in [0, z.dim())");
  TORCH_CHECK(z.size(dim) == codebook.size(1), "nearest_code: z's size along dim differs from codebook's D");
  TORCH_CHECK(codebook.size(1) <= kNearestCodeMaxD, "nearest_code: CUDA takes D <= ", kNearestCodeMaxD);
  TORCH_CHECK(codebook.size(0) <= (int64_t{1} << 30), "nearest_code: CUDA takes K <= 2**30 codes");
  const DeviceGuard guard(z.device());
  std::vector<int64_t> shape;
  for (int64_t i = 0; i < z.dim(); ++i)
    if (i != dim) shape.push_back(z.size(i));
  at::Tensor out = at::empty(shape, z.options().dtype(at::kLong));
  if (out.numel() == 0) return out;
  if (codebook.size(1) == 0) return out.zero_();
  NearestCodeParams p{};
  p.dtype = dtype_of(z, "nearest_code");
  p.z = z.const_data_ptr();
  p.z_rows = rows_in_place(z, dim, "nearest_code");
  p.cb = codebook_view(codebook);
  const NearestCodeGrid grid = nearest_code_grid(p.z_rows.count(), codebook.size(0));
  at::Tensor part_dist, part_index;
  if (grid.splits > 1) {
    part_dist = at::empty({grid.splits * p.z_rows.count()}, z.options().dtype(at::kFloat));
    part_index = at::empty({grid.splits * p.z_rows.count()}, z.options().dtype(at::kInt));
    p.part_dist = part_dist.mutable_data_ptr<float>();
    p.part_index = part_index.mutable_data_ptr<int>();
  }
  p.out = out.mutable_data_ptr<int64_t>();
  check(nearest_code(p, grid, stream()), "nearest_code");
  return out;
}

}  // namespace cuda
}  // namespace vqfast

VQFAST_CUDA_LIBRARY_IMPL(m) { m.impl("nearest_code", &vqfast::cuda::nearest_code_cuda); }
