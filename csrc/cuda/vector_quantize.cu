// vector_quantize on CUDA, after the search (nearest_code.cu): one thread per element gathers q, writes
// the straight-through value z + (q - z) rounded to z's dtype after each operation as torch does (so it
// equals diffusers' value bit for bit) and squares q - z in float32; the squares are summed in a fixed
// tree per block (warp shuffles), then the blocks' sums in double in a fixed order, so the loss is
// deterministic.
// Backward: grad_z by one thread per row; the codebook gradient by scatter_rows.cuh.
#include "cuda/vector_quantize.h"

#include "cuda/scatter_rows.cuh"

namespace vqfast {
namespace cuda {
namespace {

constexpr int kQuantizeThreads = 128;  // small blocks: (256, 64) latents already make 128 of them

// The sum of v over the block's threads, in a fixed tree (shuffles within warps, then warps in order);
// thread 0's result is the block's. `warps` holds a value per warp.
template <typename V>
__device__ __forceinline__ V block_sum(V v, V* warps) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if (threadIdx.x % 32 == 0) warps[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x == 0)
    for (unsigned w = 1; w < blockDim.x / 32; ++w) v += warps[w];
  return v;
}

// One thread per element (row, d): d fastest when a row's elements are adjacent in z, else rows
// fastest (NCHW: neighbouring pixels), so loads coalesce either way. Index is 32-bit when N * D fits.
template <typename T, typename Index>
__global__ void __launch_bounds__(kQuantizeThreads) forward_kernel(const VectorQuantizeParams p) {
  __shared__ float warps[kQuantizeThreads / 32];
  const Index e = static_cast<Index>(blockIdx.x) * kQuantizeThreads + static_cast<Index>(threadIdx.x);
  const Index N = static_cast<Index>(p.z_rows.count()), D = static_cast<Index>(p.cb.D);
  float sq = 0.f;
  if (e < N * D) {
    const bool d_fast = p.z_rows.d_stride == 1;
    const Index row = d_fast ? e / D : e % N, d = d_fast ? e % D : e / N;
    const float zv = to_float(static_cast<const T*>(p.z)[p.z_rows.offset(row) + d * p.z_rows.d_stride]);
    const float cv = to_float(static_cast<const T*>(p.cb.data)[p.index[row] * p.cb.stride0 + d * p.cb.stride1]);
    const float diff = cv - zv;
    static_cast<T*>(p.z_q)[p.z_q_rows.offset(row) + d * p.z_q_rows.d_stride] =
        from_float<T>(zv + to_float(from_float<T>(diff)));
    sq = diff * diff;
  }
  sq = block_sum(sq, warps);
  if (threadIdx.x == 0) p.part[blockIdx.x] = sq;
}

// One block: loss = w_z * mse + w_q * mse in z's dtype, NaN for no elements (as torch.mean).
template <typename T>
__global__ void __launch_bounds__(kQuantizeThreads) loss_kernel(const VectorQuantizeParams p, int64_t blocks) {
  __shared__ double warps[kQuantizeThreads / 32];
  double s = 0;
  for (int64_t i = threadIdx.x; i < blocks; i += kQuantizeThreads) s += p.part[i];
  s = block_sum(s, warps);
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

// grad_z = grad_z_q + w_z * (z - q) * scale, rounded as the reference.
template <typename T>
__global__ void backward_kernel(const VectorQuantizeBwdParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= p.z_rows.count()) return;
  const float scale = loss_scale<T>(p);
  const T* grow = static_cast<const T*>(p.grad_z_q) + p.grad_z_q_rows.offset(row);
  const T* zrow = static_cast<const T*>(p.z) + p.z_rows.offset(row);
  const T* crow = static_cast<const T*>(p.cb.data) + p.index[row] * p.cb.stride0;
  T* out = static_cast<T*>(p.grad_z) + p.grad_z_rows.offset(row);
  for (int64_t d = 0; d < p.cb.D; ++d) {
    const float diff = __fmul_rn(to_float(zrow[d * p.z_rows.d_stride]) - to_float(crow[d * p.cb.stride1]), scale);
    out[d * p.grad_z_rows.d_stride] =
        from_float<T>(__fadd_rn(to_float(grow[d * p.grad_z_q_rows.d_stride]), __fmul_rn(p.w_z, diff)));
  }
}

// Row r's contribution to the codebook gradient: -w_q * (z - c) * scale.
template <typename T>
struct CodeGradRow {
  VectorQuantizeBwdParams p;
  __device__ float operator()(int64_t r, int64_t k, int64_t d) const {
    const float zv = to_float(static_cast<const T*>(p.z)[p.z_rows.offset(r) + d * p.z_rows.d_stride]);
    const float cv = to_float(static_cast<const T*>(p.cb.data)[k * p.cb.stride0 + d * p.cb.stride1]);
    return -p.w_q * __fmul_rn(zv - cv, loss_scale<T>(p));
  }
};

struct CodeOf {
  const int64_t* index;
  __device__ int64_t operator()(int64_t r) const { return index[r]; }
};

}  // namespace

int64_t vector_quantize_blocks(int64_t rows, int64_t D) { return ceil_div(rows * D, kQuantizeThreads); }

cudaError_t vector_quantize(const VectorQuantizeParams& p, cudaStream_t stream) {
  const int64_t elements = p.z_rows.count() * p.cb.D, blocks = vector_quantize_blocks(p.z_rows.count(), p.cb.D);
  return dispatch(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (blocks > 0) {
      const bool narrow = elements + kQuantizeThreads <= INT32_MAX;  // e and e's row fit 32 bits
      launch(narrow ? forward_kernel<T, int32_t> : forward_kernel<T, int64_t>, static_cast<unsigned>(blocks),
             kQuantizeThreads, 0, stream, p);
    }
    launch(loss_kernel<T>, 1, kQuantizeThreads, 0, stream, p, blocks);
  });
}

cudaError_t vector_quantize_backward(const VectorQuantizeBwdParams& p, cudaStream_t stream) {
  const int64_t N = p.z_rows.count();
  return dispatch(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (N > 0) launch(backward_kernel<T>, static_cast<unsigned>(ceil_div(N, kThreads)), kThreads, 0, stream, p);
    const ScatterParams s{N, p.order, p.start, p.cb.K, p.cb.D, p.cb_grad};
    scatter_rows(s, CodeOf{p.index}, CodeGradRow<T>{p}, stream);
  });
}

}  // namespace cuda
}  // namespace vqfast
