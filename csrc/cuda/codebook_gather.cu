// codebook_gather on CUDA: one thread per output element (writes coalesced whatever dim is); backward
// by scatter_rows.cuh, deterministic when given the rows sorted by code.
#include "cuda/scatter_rows.cuh"

namespace vqfast {
namespace cuda {
namespace {

// out is contiguous: element e = (b * D + d) * inner + p is row b * inner + p, element d.
template <typename T>
__global__ void gather_kernel(const int64_t* __restrict__ index, const T* __restrict__ cb, int64_t K, int64_t D,
                              int64_t cs0, int64_t cs1, T* __restrict__ out, int64_t inner, int64_t total) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= total) return;
  const int64_t p = e % inner, d = (e / inner) % D, b = e / (inner * D);
  const int64_t k = index[b * inner + p];
  // vqfast.ops.codebook_gather checks the range before launching; stray indices read nothing.
  out[e] = (k >= 0 && k < K) ? cb[k * cs0 + d * cs1] : from_float<T>(0.f);
}

template <typename T>
struct GradRow {
  const T* grad;
  RowsView rows;
  __device__ float operator()(int64_t r, int64_t, int64_t d) const {
    return to_float(grad[row_offset(rows, r) + d * rows.d_stride]);
  }
};

}  // namespace

cudaError_t codebook_gather(DType dtype, const int64_t* index, CodebookView cb, void* out, RowsView rows,
                            cudaStream_t stream) {
  const int64_t total = rows.outer * rows.inner * cb.D;
  if (total == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    gather_kernel<T><<<static_cast<unsigned>(ceil_div(total, kThreads)), kThreads, 0, stream>>>(
        index, static_cast<const T*>(cb.data), cb.K, cb.D, cb.stride0, cb.stride1, static_cast<T*>(out), rows.inner,
        total);
  });
}

cudaError_t codebook_gather_backward(DType dtype, const void* grad, RowsView rows, int64_t D, const int64_t* index,
                                     const int64_t* order, const int64_t* start, int64_t K, float* out,
                                     cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    scatter_rows(index, rows.outer * rows.inner, order, start, K, D, out, stream,
                 GradRow<T>{static_cast<const T*>(grad), rows});
  });
}

}  // namespace cuda
}  // namespace vqfast
