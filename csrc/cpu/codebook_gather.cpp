// codebook_gather on the CPU: out = codebook[indices] with the code dimension at `dim` of the
// contiguous result, written as rows along dim (rows.h); backward scatters the gradient's rows into
// the codebook's by scatter_rows, deterministically.
#include "cpu/rows.h"
#include "cpu/scatter_rows.h"
#include "cpu/vec_utils.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

namespace vqfast {
namespace cpu {
namespace {

std::vector<int64_t> with_dim(c10::IntArrayRef shape, int64_t dim, int64_t size) {
  std::vector<int64_t> out(shape.begin(), shape.end());
  out.insert(out.begin() + dim, size);
  return out;
}

at::Tensor codebook_gather(const at::Tensor& indices_in, const at::Tensor& codebook, int64_t dim) {
  TORCH_CHECK(indices_in.device().is_cpu() && codebook.device().is_cpu(), "codebook_gather: CPU tensors expected");
  TORCH_CHECK(codebook.dim() == 2, "codebook_gather: codebook must be (K, D)");
  dim = c10::maybe_wrap_dim(dim, indices_in.dim() + 1);
  const at::Tensor indices = indices_in.to(at::kLong).contiguous();
  at::Tensor out = at::empty(with_dim(indices.sizes(), dim, codebook.size(1)), codebook.options());
  Rows rows;
  collapse_rows(out, dim, rows);  // contiguous: always collapses
  const int64_t K = codebook.size(0), D = codebook.size(1), cs0 = codebook.stride(0), cs1 = codebook.stride(1);
  const int64_t* idx = indices.const_data_ptr<int64_t>();
  dispatch_float(codebook.scalar_type(), "codebook_gather", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* cb = codebook.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    for_row_blocks(rows.count(), [&](int64_t, int64_t r0, int64_t n) {
      int64_t oo[kRowBlock], co[kRowBlock];
      row_offsets(rows, r0, n, oo);
      for (int64_t i = 0; i < n; ++i) {
        TORCH_CHECK_INDEX(idx[r0 + i] >= 0 && idx[r0 + i] < K, "codebook_gather: index ", idx[r0 + i],
                          " is out of bounds for ", K, " codes");
        co[i] = idx[r0 + i] * cs0;
      }
      for (int64_t d = 0; d < D; ++d) {
        for (int64_t i = 0; i < n; ++i) o[oo[i] + d * rows.d_stride] = cb[co[i] + d * cs1];
      }
    });
  });
  return out;
}

at::Tensor codebook_gather_backward(const at::Tensor& grad_in, const at::Tensor& indices_in, int64_t num_codes,
                                    int64_t dim) {
  TORCH_CHECK(grad_in.device().is_cpu() && indices_in.device().is_cpu(),
              "codebook_gather_backward: CPU tensors expected");
  dim = c10::maybe_wrap_dim(dim, grad_in.dim());
  const at::Tensor indices = indices_in.to(at::kLong).contiguous();
  TORCH_CHECK(indices.numel() * grad_in.size(dim) == grad_in.numel() || grad_in.size(dim) == 0,
              "codebook_gather_backward: one index per row of grad");
  const int64_t D = grad_in.size(dim);
  at::Tensor out = at::empty({num_codes, D}, grad_in.options());
  Rows rows;
  const at::Tensor grad = as_rows(grad_in, dim, rows);
  dispatch_float(grad.scalar_type(), "codebook_gather_backward", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scatter_rows(indices.const_data_ptr<int64_t>(), indices.numel(), num_codes, D, out.mutable_data_ptr<scalar_t>(),
                 [&](int64_t r, int64_t, float* acc) {
                   const scalar_t* row = g + rows.offset(r);
                   for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<float>(row[d * rows.d_stride]);
                 });
  });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace vqfast

TORCH_LIBRARY_IMPL(vqfast_C, CPU, m) {
  m.impl("codebook_gather", &vqfast::cpu::codebook_gather);
  m.impl("codebook_gather_backward", &vqfast::cpu::codebook_gather_backward);
}
