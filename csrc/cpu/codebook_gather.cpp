// codebook_gather on the CPU: out = codebook[indices] with the code dimension at `dim` of the
// contiguous result, written as rows along dim; indices are read in place whatever their strides
// (expanded, 0-d) and checked here (IndexError). Backward scatters the gradient's rows, read in place,
// into the codebook's by scatter_rows, deterministically.
#include "cpu/row_blocks.h"
#include "cpu/scatter_rows.h"
#include "cpu/vec_utils.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

namespace vqfast {
namespace cpu {
namespace {

Strided indices_in_place(const at::Tensor& indices, const char* name) {
  TORCH_CHECK(indices.device().is_cpu() && indices.scalar_type() == at::kLong, name, ": indices must be int64 on the CPU");
  Strided idx;
  TORCH_CHECK(merge_dims(indices, -1, idx), name, ": more than ", kMaxDims, " index dimensions remain once merged");
  return idx;
}

at::Tensor codebook_gather(const at::Tensor& indices, const at::Tensor& codebook, int64_t dim) {
  TORCH_CHECK(codebook.device().is_cpu() && codebook.dim() == 2, "codebook_gather: codebook must be (K, D) on the CPU");
  TORCH_CHECK(0 <= dim && dim <= indices.dim(), "codebook_gather: dim must be in [0, indices.dim()]");
  const Strided idx = indices_in_place(indices, "codebook_gather");
  std::vector<int64_t> shape(indices.sizes().begin(), indices.sizes().end());
  shape.insert(shape.begin() + dim, codebook.size(1));
  at::Tensor out = at::empty(shape, codebook.options());
  const Rows rows = rows_in_place(out, dim, "codebook_gather");  // contiguous: one or two dimensions
  const int64_t K = codebook.size(0), D = codebook.size(1), cs0 = codebook.stride(0), cs1 = codebook.stride(1);
  const int64_t* ip = indices.const_data_ptr<int64_t>();
  dispatch_float(codebook.scalar_type(), "codebook_gather", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* cb = codebook.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    for_row_blocks(rows.count(), [&](int64_t, int64_t r0, int64_t n) {
      int64_t oo[kRowBlock], co[kRowBlock];
      offsets(rows, r0, n, oo);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t k = ip[idx.offset(r0 + i)];
        TORCH_CHECK_INDEX(k >= 0 && k < K, "codebook_gather: index ", k, " is out of bounds for ", K, " codes");
        co[i] = k * cs0;
      }
      for (int64_t d = 0; d < D; ++d) {
        for (int64_t i = 0; i < n; ++i) o[oo[i] + d * rows.d_stride] = cb[co[i] + d * cs1];
      }
    });
  });
  return out;
}

at::Tensor codebook_gather_backward(const at::Tensor& grad, const at::Tensor& indices, int64_t num_codes,
                                    int64_t dim) {
  TORCH_CHECK(grad.device().is_cpu(), "codebook_gather_backward: CPU tensors expected");
  TORCH_CHECK(0 <= dim && dim < grad.dim() && grad.dim() == indices.dim() + 1,
              "codebook_gather_backward: grad must have indices' shape with D inserted at dim");
  const Strided idx = indices_in_place(indices, "codebook_gather_backward");
  const Rows rows = rows_in_place(grad, dim, "codebook_gather_backward");
  TORCH_CHECK(rows.count() == idx.numel, "codebook_gather_backward: one index per row of grad");
  const int64_t D = grad.size(dim);
  at::Tensor out = at::empty({num_codes, D}, grad.options());
  const int64_t* ip = indices.const_data_ptr<int64_t>();
  dispatch_float(grad.scalar_type(), "codebook_gather_backward", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scatter_rows([&](int64_t r) { return ip[idx.offset(r)]; }, rows.count(), num_codes, D,
                 out.mutable_data_ptr<scalar_t>(), [&](int64_t r, int64_t, float* acc) {
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
