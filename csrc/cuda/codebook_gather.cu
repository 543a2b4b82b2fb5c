// codebook_gather on CUDA: one thread per output element (writes coalesced whatever dim is), indices
// read in place and checked on the device; backward by scatter_rows.cuh, deterministic when given the
// rows sorted by code.
#include "cuda/codebook_gather.h"

#include "cuda/scatter_rows.cuh"

namespace vqfast {
namespace cuda {
namespace {

// out is contiguous: element e = (b * D + d) * inner + p is row b * inner + p, element d, where inner
// is the number of rows after the code dimension (out_rows.d_stride).
template <typename T>
__global__ void gather_kernel(const CodebookGatherParams p, int64_t total) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= total) return;
  const int64_t inner = p.out_rows.d_stride, D = p.cb.D;
  const int64_t q = e % inner, d = (e / inner) % D, b = e / (inner * D);
  const int64_t k = p.indices[p.index_layout.offset(b * inner + q)];
  VQFAST_KERNEL_ASSERT(k >= 0 && k < p.cb.K);
  static_cast<T*>(p.out)[e] = static_cast<const T*>(p.cb.data)[k * p.cb.stride0 + d * p.cb.stride1];
}

template <typename T>
struct GradRow {
  const T* grad;
  Rows rows;
  __device__ float operator()(int64_t r, int64_t, int64_t d) const {
    return to_float(grad[rows.offset(r) + d * rows.d_stride]);
  }
};

// Row r's code.
struct IndexAt {
  const int64_t* indices;
  Strided layout;
  __device__ int64_t operator()(int64_t r) const { return indices[layout.offset(r)]; }
};

}  // namespace

cudaError_t codebook_gather(const CodebookGatherParams& p, cudaStream_t stream) {
  const int64_t total = p.out_rows.count() * p.cb.D;
  if (total == 0) return cudaSuccess;
  return dispatch(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    launch(gather_kernel<T>, static_cast<unsigned>(ceil_div(total, kThreads)), kThreads, 0, stream, p, total);
  });
}

cudaError_t codebook_gather_backward(const CodebookGatherBwdParams& p, cudaStream_t stream) {
  return dispatch(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const ScatterParams s{p.grad_rows.count(), p.order, p.start, p.K, p.D, p.out};
    scatter_rows(s, IndexAt{p.indices, p.index_layout}, GradRow<T>{static_cast<const T*>(p.grad), p.grad_rows},
                 stream);
  });
}

}  // namespace cuda
}  // namespace vqfast
