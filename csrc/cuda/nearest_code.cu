// nearest_code on CUDA: one thread per row, codebook tiles (converted to float32, with their norms)
// in shared memory, the row's running (min, argmin) in registers. The arithmetic is the CPU kernel's
// (csrc/cpu/nearest_code.cpp): ||c||^2 and <z, c> as float32 FMAs in d order, d = ||c||^2 - 2 <z, c>,
// first index on ties, the first NaN distance winning (torch.argmin's rule). When rows alone would
// leave SMs idle, the codebook is split among blocks (grid.y) and the splits' partial results are
// combined in split order, which keeps both rules.
#include "cuda/common.cuh"

#include <algorithm>
#include <cmath>

namespace vqfast {
namespace cuda {
namespace {

constexpr int64_t kTileFloats = 8192;  // 32 KiB of shared memory: codes and their norms

struct Best {
  float dist = INFINITY;
  int64_t index = 0;
  bool nan = false;
  __device__ void update(float d, int64_t k) {
    if (nan) return;
    if (isnan(d)) {
      dist = d, index = k, nan = true;
    } else if (d < dist) {
      dist = d, index = k;
    }
  }
};

// DC > 0: D known at compile time (the row stays in registers); DC == 0: D at run time.
template <typename T, int DC>
__global__ void search_kernel(const T* __restrict__ z, RowsView zr, const T* __restrict__ cb, int64_t K, int64_t D,
                              int64_t cs0, int64_t cs1, int64_t codes_per_split, float* __restrict__ part_dist,
                              int64_t* __restrict__ part_index, int64_t* __restrict__ out) {
  extern __shared__ float smem[];
  const int64_t tile = kTileFloats / (D + 1);
  float* codes = smem;
  float* norms = smem + tile * D;
  const int64_t N = zr.outer * zr.inner;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = row < N;
  const T* zrow = z + (active ? row_offset(zr, row) : 0);
  float zreg[DC > 0 ? DC : 1];
  if constexpr (DC > 0) {
#pragma unroll
    for (int d = 0; d < DC; ++d) zreg[d] = active ? to_float(zrow[d * zr.d_stride]) : 0.f;
  }
  const int64_t k_begin = static_cast<int64_t>(blockIdx.y) * codes_per_split;
  const int64_t k_end = min(K, k_begin + codes_per_split);
  Best best;
  best.index = k_begin;
  for (int64_t k0 = k_begin; k0 < k_end; k0 += tile) {
    const int64_t n = min(tile, k_end - k0);
    __syncthreads();
    for (int64_t i = threadIdx.x; i < n * D; i += blockDim.x) {
      codes[i] = to_float(cb[(k0 + i / D) * cs0 + (i % D) * cs1]);
    }
    __syncthreads();
    for (int64_t k = threadIdx.x; k < n; k += blockDim.x) {
      float s = 0.f;
      for (int64_t d = 0; d < D; ++d) s = fmaf(codes[k * D + d], codes[k * D + d], s);
      norms[k] = s;
    }
    __syncthreads();
    if (!active) continue;
    for (int64_t k = 0; k < n; ++k) {
      const float* c = codes + k * D;
      float acc;
      if constexpr (DC > 0) {
        acc = zreg[0] * c[0];
#pragma unroll
        for (int d = 1; d < DC; ++d) acc = fmaf(zreg[d], c[d], acc);
      } else {
        acc = to_float(zrow[0]) * c[0];
        for (int64_t d = 1; d < D; ++d) acc = fmaf(to_float(zrow[d * zr.d_stride]), c[d], acc);
      }
      best.update(fmaf(acc, -2.f, norms[k]), k0 + k);
    }
  }
  if (!active) return;
  if (gridDim.y == 1) {
    out[row] = best.index;
  } else {
    part_dist[blockIdx.y * N + row] = best.nan ? NAN : best.dist;
    part_index[blockIdx.y * N + row] = best.index;
  }
}

__global__ void combine_kernel(const float* __restrict__ part_dist, const int64_t* __restrict__ part_index,
                               int64_t N, int64_t splits, int64_t* __restrict__ out) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= N) return;
  Best best;
  for (int64_t s = 0; s < splits; ++s) best.update(part_dist[s * N + row], part_index[s * N + row]);
  out[row] = best.index;
}

template <typename T, int DC>
void launch_search(const T* z, const RowsView& zr, const CodebookView& cb, int64_t splits, float* part_dist,
                   int64_t* part_index, int64_t* out, cudaStream_t stream) {
  const int64_t N = zr.outer * zr.inner;
  const int64_t tile = kTileFloats / (cb.D + 1);
  const size_t smem = static_cast<size_t>(tile * (cb.D + 1)) * sizeof(float);
  const dim3 grid(static_cast<unsigned>(ceil_div(N, kThreads)), static_cast<unsigned>(splits));
  search_kernel<T, DC><<<grid, kThreads, smem, stream>>>(z, zr, static_cast<const T*>(cb.data), cb.K, cb.D,
                                                          cb.stride0, cb.stride1, ceil_div(cb.K, splits), part_dist,
                                                          part_index, out);
  if (splits > 1) {
    combine_kernel<<<static_cast<unsigned>(ceil_div(N, kThreads)), kThreads, 0, stream>>>(part_dist, part_index, N,
                                                                                           splits, out);
  }
}

}  // namespace

int64_t nearest_code_splits(int64_t rows, int64_t K) {
  int device = 0, sms = 1;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  // About two blocks per SM, each split keeping at least 512 codes.
  const int64_t want = ceil_div(2 * static_cast<int64_t>(sms), std::max<int64_t>(1, ceil_div(rows, kThreads)));
  return std::max<int64_t>(1, std::min({want, ceil_div(K, 512), int64_t{65535}}));
}

cudaError_t nearest_code(DType dtype, const void* z, RowsView zr, CodebookView cb, int64_t splits,
                         float* part_dist, int64_t* part_index, int64_t* out, cudaStream_t stream) {
  if (zr.outer * zr.inner == 0) return cudaSuccess;
  if (cb.D > kTileFloats - 1) return cudaErrorInvalidValue;  // a codebook row must fit the shared tile
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* zp = static_cast<const T*>(z);
    if (cb.D == 4) {  // VQ-GAN / MoVQ latents
      launch_search<T, 4>(zp, zr, cb, splits, part_dist, part_index, out, stream);
    } else {
      launch_search<T, 0>(zp, zr, cb, splits, part_dist, part_index, out, stream);
    }
  });
}

}  // namespace cuda
}  // namespace vqfast
