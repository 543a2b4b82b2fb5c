// vector_quantize on CUDA, after the search (nearest_code.cu): one thread per element gathers q, writes
// the straight-through value z + (q - z) rounded to z's dtype after each operation as torch does (so it
// equals diffusers' value bit for bit) and squares q - z in float32; the squares are summed in a fixed
// tree per block (warp shuffles), then the blocks' sums in double in a fixed order, so the loss is
// deterministic. With statistics (vector_quantize_stats) the same threads count each code's rows
// (64-bit integer atomics: exact, order-free) and add z into its code's sum (float32 atomics), or, under
// torch.use_deterministic_algorithms, scatter_rows.cuh's deterministic form sums them after the pass.
// Backward: grad_z by one thread per element, as the forward; the codebook gradient by scatter_rows.cuh.
// Indices and offsets are 32-bit where they fit (with_index).
#include "cuda/vector_quantize.h"

#include "cuda/scatter_rows.cuh"

namespace vqfast {
namespace cuda {
namespace {

constexpr int kQuantizeThreads = 128;  // small blocks: (256, 64) latents already make 128 of them

// One thread per element (row_elem's order, so loads coalesce either way); kStats: also the statistics.
template <typename T, typename Index, bool kStats>
__global__ void __launch_bounds__(kQuantizeThreads) forward_kernel(const VectorQuantizeParams p) {
  __shared__ float shared[kQuantizeThreads];
  const Index e = static_cast<Index>(blockIdx.x) * kQuantizeThreads + static_cast<Index>(threadIdx.x);
  const Index N = static_cast<Index>(p.z_rows.count()), D = static_cast<Index>(p.cb.D);
  float sq = 0.f;
  if (e < N * D) {
    const RowElem<Index> el = row_elem(e, N, D, p.z_rows.d_stride == 1);
    const float zv = to_float(static_cast<const T*>(p.z)[offset_in(p.z_rows, el)]);
    const T* code = static_cast<const T*>(p.cb.data);
    const Index k = static_cast<Index>(p.index[el.row]);
    const float cv = to_float(code[code_offset(p.cb, k, el.d)]);
    const float diff = cv - zv;
    static_cast<T*>(p.z_q)[offset_in(p.z_q_rows, el)] = from_float<T>(zv + to_float(from_float<T>(diff)));
    sq = diff * diff;
    if constexpr (kStats) {
      if (el.d == 0) atomicAdd(p.code_rows + k, 1ull);
      if (p.order == nullptr) atomicAdd(p.sums + k * D + el.d, zv);
    }
  }
  sq = block_reduce(sq, shared, Plus{});
  if (threadIdx.x == 0) p.part[blockIdx.x] = sq;
}

// One block: loss = w_z * mse + w_q * mse in z's dtype, NaN for no elements (as torch.mean); with
// statistics, the counts as float32.
template <typename T>
__global__ void __launch_bounds__(kQuantizeThreads) loss_kernel(const VectorQuantizeParams p, int64_t blocks) {
  __shared__ double shared[kQuantizeThreads];
  if (p.counts != nullptr) {
    for (int64_t k = threadIdx.x; k < p.cb.K; k += kQuantizeThreads) p.counts[k] = static_cast<float>(p.code_rows[k]);
  }
  double s = 0;
  for (int64_t i = threadIdx.x; i < blocks; i += kQuantizeThreads) s += p.part[i];
  s = block_reduce(s, shared, Plus{});
  if (threadIdx.x == 0) {
    const float mse = static_cast<float>(s / static_cast<double>(p.z_rows.count() * p.cb.D));
    *static_cast<T*>(p.loss) = from_float<T>(p.w_z * mse + p.w_q * mse);
  }
}

// 2 * grad_loss / numel in float32, as the reference.
template <typename T>
__device__ __forceinline__ float loss_scale(const VectorQuantizeBwdParams& p) {
  return __fdiv_rn(2.f * to_float(*static_cast<const T*>(p.grad_loss)),
                   static_cast<float>(p.z_rows.count() * p.cb.D));
}

// grad_z = grad_z_q + w_z * (z - q) * scale, rounded as the reference; one thread per element, as the
// forward.
template <typename T, typename Index>
__global__ void __launch_bounds__(kQuantizeThreads) backward_kernel(const VectorQuantizeBwdParams p) {
  const Index e = static_cast<Index>(blockIdx.x) * kQuantizeThreads + static_cast<Index>(threadIdx.x);
  const Index N = static_cast<Index>(p.z_rows.count()), D = static_cast<Index>(p.cb.D);
  if (e >= N * D) return;
  const RowElem<Index> el = row_elem(e, N, D, p.z_rows.d_stride == 1);
  const int64_t k = p.index[el.row];
  VQFAST_KERNEL_ASSERT(k >= 0 && k < p.cb.K);
  const float zv = to_float(static_cast<const T*>(p.z)[offset_in(p.z_rows, el)]);
  const float cv = to_float(static_cast<const T*>(p.cb.data)[code_offset(p.cb, static_cast<Index>(k), el.d)]);
  const float g = to_float(static_cast<const T*>(p.grad_z_q)[offset_in(p.grad_z_q_rows, el)]);
  const float diff = __fmul_rn(zv - cv, loss_scale<T>(p));
  static_cast<T*>(p.grad_z)[offset_in(p.grad_z_rows, el)] = from_float<T>(__fadd_rn(g, __fmul_rn(p.w_z, diff)));
}

// Row r's contribution to the codebook gradient: -w_q * (z - c) * scale.
template <typename T>
struct CodeGradRow {
  VectorQuantizeBwdParams p;
  template <typename Index>
  __device__ float operator()(Index r, Index k, Index d) const {
    const float zv = to_float(static_cast<const T*>(p.z)[offset_in(p.z_rows, RowElem<Index>{r, d})]);
    const float cv = to_float(static_cast<const T*>(p.cb.data)[code_offset(p.cb, k, d)]);
    return -p.w_q * __fmul_rn(zv - cv, loss_scale<T>(p));
  }
};

struct CodeOf {
  const int64_t* index;
  template <typename Index>
  __device__ int64_t operator()(Index r) const {
    return index[r];
  }
};

// Row r's contribution to its code's sum: z's row itself.
template <typename T>
struct RowOfZ {
  const void* z;
  Rows z_rows;
  template <typename Index>
  __device__ float operator()(Index r, Index, Index d) const {
    return to_float(static_cast<const T*>(z)[offset_in(z_rows, RowElem<Index>{r, d})]);
  }
};

}  // namespace

int64_t vector_quantize_blocks(int64_t rows, int64_t D) { return ceil_div(rows * D, kQuantizeThreads); }

// The largest index or offset the kernels compute on rows of z and its likes, the codebook, and the last
// block's overhang.
int64_t largest_index(const Rows& rows, const CodebookView& cb) {
  const int64_t D = cb.D;
  return std::max({rows.count() * D + kQuantizeThreads, max_offset(rows, D), max_offset(cb)});
}

cudaError_t vector_quantize(const VectorQuantizeParams& p, cudaStream_t stream) {
  const int64_t N = p.z_rows.count(), blocks = vector_quantize_blocks(N, p.cb.D);
  const bool stats = p.sums != nullptr;
  const int64_t largest = std::max({largest_index(p.z_rows, p.cb), max_offset(p.z_q_rows, p.cb.D),
                                    stats ? p.cb.K * p.cb.D : int64_t{0}});
  return dispatch(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (blocks > 0) {
      with_index(largest, [&](auto index_tag) {
        using Index = decltype(index_tag);
        const unsigned grid = static_cast<unsigned>(blocks);
        if (stats) {
          launch(forward_kernel<T, Index, true>, grid, kQuantizeThreads, 0, stream, p);
        } else {
          launch(forward_kernel<T, Index, false>, grid, kQuantizeThreads, 0, stream, p);
        }
      });
    }
    launch(loss_kernel<T>, 1, kQuantizeThreads, 0, stream, p, blocks);
    if (stats && p.order != nullptr) {
      const ScatterParams s{N, p.order, p.start, p.cb.K, p.cb.D, p.sums, p.scatter_part};
      scatter_rows(s, CodeOf{p.index}, RowOfZ<T>{p.z, p.z_rows}, largest, stream);
    }
  });
}

cudaError_t vector_quantize_backward(const VectorQuantizeBwdParams& p, cudaStream_t stream) {
  const int64_t N = p.z_rows.count(), blocks = vector_quantize_blocks(N, p.cb.D);
  const int64_t largest = std::max({largest_index(p.z_rows, p.cb), max_offset(p.grad_z_q_rows, p.cb.D),
                                    max_offset(p.grad_z_rows, p.cb.D)});
  return dispatch(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (blocks > 0) {
      with_index(largest, [&](auto index_tag) {
        launch(backward_kernel<T, decltype(index_tag)>, static_cast<unsigned>(blocks), kQuantizeThreads, 0, stream, p);
      });
    }
    const ScatterParams s{N, p.order, p.start, p.cb.K, p.cb.D, p.cb_grad, p.part};
    scatter_rows(s, CodeOf{p.index}, CodeGradRow<T>{p}, largest, stream);
  });
}

}  // namespace cuda
}  // namespace vqfast
