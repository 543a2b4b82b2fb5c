// Tensor-side helpers of csrc/cuda/*_launch.cpp: dtypes, row views (csrc/cpu/rows.h), the current
// stream and launch errors.
#pragma once

#include "cpu/rows.h"
#include "cuda/launchers.h"

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace vqfast {
namespace cuda {

// csrc/cuda/nearest_code_launch.cpp, also the search of vector_quantize_launch.cpp.
at::Tensor nearest_code_cuda(const at::Tensor& z, const at::Tensor& codebook, int64_t dim);

inline DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::Float;
    case at::kHalf:
      return DType::Half;
    case at::kBFloat16:
      return DType::BFloat16;
    default:
      TORCH_CHECK(false, name, ": expected float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

inline RowsView view_of(const Rows& r) { return {r.outer, r.inner, r.outer_stride, r.inner_stride, r.d_stride}; }

inline CodebookView codebook_view(const at::Tensor& cb) {
  return {cb.const_data_ptr(), cb.size(0), cb.size(1), cb.stride(0), cb.stride(1)};
}

inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline void check(cudaError_t err, const char* name) {
  TORCH_CHECK(err == cudaSuccess, name, ": CUDA launch failed: ", cudaGetErrorString(err));
}

// A float32 (K, D) buffer for scatter_rows.cuh and, under torch.use_deterministic_algorithms, the rows
// sorted by code: order (a stable sort of `index`) and start (K + 1 segment bounds); undefined otherwise
// (the atomic form, which needs the buffer zeroed).
struct CodeSegments {
  at::Tensor out, order, start;
  CodeSegments(const at::Tensor& index, int64_t K, int64_t D) {
    if (at::globalContext().deterministicAlgorithms()) {
      auto sorted = at::sort(index, /*stable=*/true, /*dim=*/0, /*descending=*/false);
      order = std::get<1>(sorted);
      start = at::searchsorted(std::get<0>(sorted), at::arange(K + 1, index.options()));
      out = at::empty({K, D}, index.options().dtype(at::kFloat));
    } else {
      out = at::zeros({K, D}, index.options().dtype(at::kFloat));
    }
  }
  const int64_t* order_ptr() const { return order.defined() ? order.const_data_ptr<int64_t>() : nullptr; }
  const int64_t* start_ptr() const { return start.defined() ? start.const_data_ptr<int64_t>() : nullptr; }
};

}  // namespace cuda
}  // namespace vqfast
