// nearest_code on CUDA: one thread per row, codebook tiles (converted to float32, with their norms)
// in shared memory, the row's running (min, argmin) in registers. The arithmetic is the CPU kernel's
// (csrc/cpu/nearest_code.cpp): ||c||^2 and <z, c> as float32 FMAs in d order, d = ||c||^2 - 2 <z, c>,
// first index on ties, the first NaN distance winning (torch.argmin's rule). When rows alone would
// leave SMs idle, the codebook is split among blocks (grid.y) and the splits' partial results are
// combined in split order, which keeps both rules.
#include "cuda/nearest_code.h"

#include "cuda/common.cuh"

#include <algorithm>
#include <cmath>

namespace vqfast {
namespace cuda {
namespace {

constexpr int64_t kTileFloats = kNearestCodeMaxD + 1;  // 32 KiB of shared memory: codes and their norms

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
__global__ void search_kernel(const NearestCodeParams p, int64_t codes_per_split) {
  float* smem = dynamic_shared<float>();
  const T* __restrict__ z = static_cast<const T*>(p.z);
  const T* __restrict__ cb = static_cast<const T*>(p.cb.data);
  const Rows& zr = p.z_rows;
  const int64_t K = p.cb.K, D = p.cb.D, cs0 = p.cb.stride0, cs1 = p.cb.stride1;
  const int64_t tile = kTileFloats / (D + 1);
  float* codes = smem;
  float* norms = smem + tile * D;
  const int64_t N = zr.count();
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = row < N;
  const T* zrow = z + (active ? zr.offset(row) : 0);
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
    p.out[row] = best.index;
  } else {
    p.part_dist[blockIdx.y * N + row] = best.nan ? NAN : best.dist;
    p.part_index[blockIdx.y * N + row] = best.index;
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
void launch_search(const NearestCodeParams& p, cudaStream_t stream) {
  const int64_t N = p.z_rows.count();
  const int64_t tile = kTileFloats / (p.cb.D + 1);
  const size_t smem = static_cast<size_t>(tile * (p.cb.D + 1)) * sizeof(float);
  const dim3 grid(static_cast<unsigned>(ceil_div(N, kThreads)), static_cast<unsigned>(p.splits));
  launch(search_kernel<T, DC>, grid, kThreads, smem, stream, p, ceil_div(p.cb.K, p.splits));
  if (p.splits > 1) {
    launch(combine_kernel, static_cast<unsigned>(ceil_div(N, kThreads)), kThreads, 0, stream, p.part_dist,
           p.part_index, N, p.splits, p.out);
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

cudaError_t nearest_code(const NearestCodeParams& p, cudaStream_t stream) {
  if (p.z_rows.count() == 0) return cudaSuccess;
  if (p.cb.D > kNearestCodeMaxD) return cudaErrorInvalidValue;
  return dispatch(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (p.cb.D == 4) {  // VQ-GAN / MoVQ latents
      launch_search<T, 4>(p, stream);
    } else {
      launch_search<T, 0>(p, stream);
    }
  });
}

}  // namespace cuda
}  // namespace vqfast
