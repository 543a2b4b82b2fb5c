// vector_quantize on CUDA, after the search (nearest_code.cu): one thread per row gathers q, writes the
// straight-through value z + (q - z) rounded to z's dtype after each operation as torch does (so it
// equals diffusers' value bit for bit) and sums (q - z)^2 in float32; rows' sums are reduced in a fixed
// tree per block, then the blocks' sums in double in a fixed order, so the loss is deterministic.
// Backward: grad_z by one thread per row; the codebook gradient by scatter_rows.cuh.
#include "cuda/scatter_rows.cuh"

namespace vqfast {
namespace cuda {
namespace {

template <typename T>
__global__ void forward_kernel(const T* __restrict__ z, RowsView zr, const T* __restrict__ cb, int64_t D, int64_t cs0,
                               int64_t cs1, const int64_t* __restrict__ index, T* __restrict__ z_q, RowsView qr,
                               double* __restrict__ part) {
  __shared__ float sums[kThreads];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  float sum = 0.f;
  if (row < zr.outer * zr.inner) {
    const T* zrow = z + row_offset(zr, row);
    const T* crow = cb + index[row] * cs0;
    T* qrow = z_q + row_offset(qr, row);
    for (int64_t d = 0; d < D; ++d) {
      const float zv = to_float(zrow[d * zr.d_stride]);
      const float diff = to_float(crow[d * cs1]) - zv;
      qrow[d * qr.d_stride] = from_float<T>(zv + to_float(from_float<T>(diff)));
      sum = fmaf(diff, diff, sum);
    }
  }
  sums[threadIdx.x] = sum;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s /= 2) {
    if (threadIdx.x < s) sums[threadIdx.x] += sums[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) part[blockIdx.x] = sums[0];
}

// One block: loss = (w_z + w_q) * mean in z's dtype, NaN for no elements (as torch.mean).
template <typename T>
__global__ void loss_kernel(const double* __restrict__ part, int64_t blocks, int64_t numel, float w_z, float w_q,
                            T* __restrict__ loss) {
  __shared__ double sums[kThreads];
  double s = 0;
  for (int64_t i = threadIdx.x; i < blocks; i += kThreads) s += part[i];
  sums[threadIdx.x] = s;
  __syncthreads();
  for (int t = kThreads / 2; t > 0; t /= 2) {
    if (threadIdx.x < t) sums[threadIdx.x] += sums[threadIdx.x + t];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const float mse = static_cast<float>(sums[0] / static_cast<double>(numel));
    *loss = from_float<T>(w_z * mse + w_q * mse);
  }
}

// grad_z = grad_z_q + w_z * (z - q) * scale, scale = 2 grad_loss / numel, rounded as the reference.
template <typename T>
__global__ void backward_kernel(const T* __restrict__ grad, RowsView gr, const T* __restrict__ z, RowsView zr,
                                const T* __restrict__ cb, int64_t D, int64_t cs0, int64_t cs1,
                                const int64_t* __restrict__ index, float scale, float w_z, T* __restrict__ grad_z,
                                RowsView gzr) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= zr.outer * zr.inner) return;
  const T* grow = grad + row_offset(gr, row);
  const T* zrow = z + row_offset(zr, row);
  const T* crow = cb + index[row] * cs0;
  T* out = grad_z + row_offset(gzr, row);
  for (int64_t d = 0; d < D; ++d) {
    const float diff = __fmul_rn(to_float(zrow[d * zr.d_stride]) - to_float(crow[d * cs1]), scale);
    out[d * gzr.d_stride] = from_float<T>(__fadd_rn(to_float(grow[d * gr.d_stride]), __fmul_rn(w_z, diff)));
  }
}

// Row r's contribution to the codebook gradient: -w_q * (z - c) * scale.
template <typename T>
struct CodeGradRow {
  const T* z;
  RowsView zr;
  const T* cb;
  int64_t cs0, cs1;
  float scale, w_q;
  __device__ float operator()(int64_t r, int64_t k, int64_t d) const {
    const float zv = to_float(z[row_offset(zr, r) + d * zr.d_stride]);
    const float diff = __fmul_rn(zv - to_float(cb[k * cs0 + d * cs1]), scale);
    return -w_q * diff;
  }
};

}  // namespace

int64_t vector_quantize_blocks(int64_t rows) { return ceil_div(rows, kThreads); }

cudaError_t vector_quantize(DType dtype, const void* z, RowsView zr, CodebookView cb, const int64_t* index,
                            void* z_q, RowsView qr, double* part, float w_z, float w_q, void* loss,
                            cudaStream_t stream) {
  const int64_t N = zr.outer * zr.inner, blocks = vector_quantize_blocks(N);
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (blocks > 0) {
      forward_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          static_cast<const T*>(z), zr, static_cast<const T*>(cb.data), cb.D, cb.stride0, cb.stride1, index,
          static_cast<T*>(z_q), qr, part);
    }
    loss_kernel<T><<<1, kThreads, 0, stream>>>(part, blocks, N * cb.D, w_z, w_q, static_cast<T*>(loss));
  });
}

cudaError_t vector_quantize_backward(DType dtype, const void* grad_z_q, RowsView gr, const void* z, RowsView zr,
                                     CodebookView cb, const int64_t* index, const int64_t* order,
                                     const int64_t* start, float scale, float w_z, float w_q, void* grad_z,
                                     RowsView gzr, float* cb_grad, cudaStream_t stream) {
  const int64_t N = zr.outer * zr.inner;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* zp = static_cast<const T*>(z);
    const T* cp = static_cast<const T*>(cb.data);
    if (N > 0) {
      backward_kernel<T><<<static_cast<unsigned>(ceil_div(N, kThreads)), kThreads, 0, stream>>>(
          static_cast<const T*>(grad_z_q), gr, zp, zr, cp, cb.D, cb.stride0, cb.stride1, index, scale, w_z,
          static_cast<T*>(grad_z), gzr);
    }
    scatter_rows(index, N, order, start, cb.K, cb.D, cb_grad, stream,
                 CodeGradRow<T>{zp, zr, cp, cb.stride0, cb.stride1, scale, w_q});
  });
}

}  // namespace cuda
}  // namespace vqfast
