// codebook_gather on CUDA: one thread per output element (writes coalesced whatever dim is), or per 16
// bytes of a code when codes are rows of out; indices read in place and checked on the device, 32-bit
// index arithmetic where it fits; backward by scatter_rows.cuh, deterministic when given the rows sorted
// by code.
#include "cuda/codebook_gather.h"

#include "cuda/scatter_rows.cuh"

namespace vqfast {
namespace cuda {
namespace {

// out is contiguous: element e = (b * D + d) * inner + q is row b * inner + q, element d, where inner
// is the number of rows after the code dimension (out_rows.d_stride). A thread takes VEC consecutive
// elements: VEC > 1 only with the code dimension last (inner 1) and codebook rows contiguous and aligned
// (codebook_gather_vector_width), so that they are VEC elements of one code, one 16-byte load and store.
template <typename T, int VEC, typename Index>
__global__ void __launch_bounds__(kThreads) gather_kernel(const CodebookGatherParams p, Index vectors) {
  const Index vec = static_cast<Index>(blockIdx.x) * kThreads + static_cast<Index>(threadIdx.x);
  if (vec >= vectors) return;
  const Index e = vec * VEC, inner = static_cast<Index>(p.out_rows.d_stride), D = static_cast<Index>(p.cb.D);
  const Index bd = e / inner, q = e - bd * inner, b = bd / D, d = bd - b * D;
  const int64_t k = p.indices[offset_of(p.index_layout, b * inner + q)];
  VQFAST_KERNEL_ASSERT(k >= 0 && k < p.cb.K);
  const T* code = static_cast<const T*>(p.cb.data) + code_offset(p.cb, static_cast<Index>(k), d);
  store_vec(static_cast<T*>(p.out) + e, load_vec<VEC>(code));
}

template <typename T>
struct GradRow {
  const T* grad;
  Rows rows;
  template <typename Index>
  __device__ float operator()(Index r, Index, Index d) const {
    return to_float(grad[offset_in(rows, RowElem<Index>{r, d})]);
  }
};

// Row r's code.
struct IndexAt {
  const int64_t* indices;
  Strided layout;
  template <typename Index>
  __device__ int64_t operator()(Index r) const {
    return indices[offset_of(layout, r)];
  }
};

}  // namespace

int codebook_gather_vector_width(const CodebookGatherParams& p) {
  const int vec = 16 / element_bytes(p.dtype);
  const bool fits = p.out_rows.d_stride == 1 && p.cb.stride1 == 1 && p.cb.D % vec == 0 && p.cb.stride0 % vec == 0 &&
                    aligned16(p.cb.data) && aligned16(p.out);
  return fits ? vec : 1;
}

cudaError_t codebook_gather(const CodebookGatherParams& p, cudaStream_t stream) {
  const int64_t total = p.out_rows.count() * p.cb.D;
  if (total == 0) return cudaSuccess;
  const int64_t largest = std::max({total + kThreads * 16, max_offset(p.cb), max_offset(p.index_layout)});
  const int width = codebook_gather_vector_width(p);
  return dispatch(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    with_index(largest, [&](auto index_tag) {
      using Index = decltype(index_tag);
      with_vec<T>(width == kVec<T>, [&](auto vec_tag) {
        constexpr int VEC = decltype(vec_tag)::value;
        launch(gather_kernel<T, VEC, Index>, static_cast<unsigned>(ceil_div(total / VEC, kThreads)), kThreads, 0,
               stream, p, static_cast<Index>(total / VEC));
      });
    });
  });
}

cudaError_t codebook_gather_backward(const CodebookGatherBwdParams& p, cudaStream_t stream) {
  const int64_t largest = std::max(max_offset(p.grad_rows, p.D), max_offset(p.index_layout));
  return dispatch(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const ScatterParams s{p.grad_rows.count(), p.order, p.start, p.K, p.D, p.out, p.part};
    scatter_rows(s, IndexAt{p.indices, p.index_layout}, GradRow<T>{static_cast<const T*>(p.grad), p.grad_rows},
                 largest, stream);
  });
}

}  // namespace cuda
}  // namespace vqfast
