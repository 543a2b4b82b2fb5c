// nearest_code on CUDA, tiled as a GEMM: a block takes kBlockRows rows and a span of codes (grid.y
// splits the codebook when rows alone would leave SMs idle). Per code tile it stages chunks of d of its
// rows and codes in shared memory as float32; each warp owns kRowsPerThread rows (read as broadcasts)
// and each lane kCodesPerLane codes, so a thread keeps a 4 x 4 tile of dot products in registers, and
// the block's threads also sum the tile's code norms. The arithmetic is the CPU kernel's
// (csrc/cpu/nearest_code.cpp): ||c||^2 and <z, c> as float32 FMAs in d order, d = ||c||^2 - 2 <z, c>.
// Each thread keeps its rows' (min, argmin), the warp's lanes are merged by shuffles and the splits by
// combine_kernel in split order, all through `better`, a total order (the first NaN distance wins, then
// the least distance, then the lowest index), so ties go to the first index whatever the merge tree
// and the result is deterministic. Indices inside a block and into shared memory are 32-bit; global
// offsets stay 64-bit.
#include "cuda/nearest_code.h"

#include "cuda/common.cuh"

#include <algorithm>
#include <climits>
#include <cmath>

namespace vqfast {
namespace cuda {
namespace {

constexpr int kRowsPerThread = 4;                          // rows of a warp: each lane computes them all
constexpr int kCodesPerLane = 4;                           // codes of a lane: lane + 32 j
constexpr int kSearchWarps = 4;                            // one per kRowsPerThread rows of the block
constexpr int kSearchThreads = kSearchWarps * kWarpSize;   // 128
constexpr int kBlockRows = kSearchWarps * kRowsPerThread;  // 16
constexpr int kBlockCodes = kWarpSize * kCodesPerLane;     // 128: a code tile, one norm per thread
constexpr int kChunk = 16;                                 // d values per staged chunk (run-time D)
constexpr int kMinSpan = kWarpSize;                        // codes per split at least: a code per lane
static_assert(kBlockCodes == kSearchThreads, "each thread sums one code norm of the tile");
static_assert(kRowsPerThread == 4, "the warp merge halves 4 rows over lanes 16 and 8 apart");

// Whether candidate (d1, k1) beats (d2, k2): a NaN distance first (the lower index among NaNs), then the
// lesser distance, then the lower index.
__device__ __forceinline__ bool better(float d1, int k1, float d2, int k2) {
  const bool n1 = isnan(d1), n2 = isnan(d2);
  if (n1 || n2) return n1 && (!n2 || k1 < k2);
  return d1 < d2 || (d1 == d2 && k1 < k2);
}

// Splits' partial results as plain (distance, index) pairs (shfl_xor moves them between lanes); a thread
// that saw no code holds (inf, INT_MAX), which every real candidate beats.
struct Best {
  float dist;
  int index;
  __device__ __forceinline__ void update(float d, int k) {
    if (better(d, k, dist, index)) dist = d, index = k;
  }
  __device__ __forceinline__ void update(const Best& o) { update(o.dist, o.index); }
};

// DC > 0: D known at compile time (one chunk of DC when DC <= kChunk); DC == 0: D at run time.
template <typename T, int DC>
__global__ void __launch_bounds__(kSearchThreads) search_kernel(const NearestCodeParams p, int span) {
  constexpr int CH = DC > 0 && DC < kChunk ? DC : kChunk;
  // +1 column: the loaders' stores with d fastest spread over banks; the reads stay conflict-free.
  __shared__ float zs[CH][kBlockRows + 1];   // rows' chunk, zs[d][row]
  __shared__ float cs[CH][kBlockCodes + 1];  // codes' chunk, cs[d][code]
  __shared__ float norms[kBlockCodes];
  __shared__ int64_t row_offset[kBlockRows];

  const T* __restrict__ z = static_cast<const T*>(p.z);
  const T* __restrict__ cb = static_cast<const T*>(p.cb.data);
  const int tid = threadIdx.x, lane = tid % kWarpSize, warp = tid / kWarpSize;
  const int64_t N = p.z_rows.count();
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBlockRows;
  const int rows = static_cast<int>(min(N - row0, static_cast<int64_t>(kBlockRows)));
  const int D = DC > 0 ? DC : static_cast<int>(p.cb.D);
  const int K = static_cast<int>(p.cb.K);
  const int k_begin = static_cast<int>(blockIdx.y) * span;
  const int k_end = min(K, k_begin + span);
  const int64_t zd = p.z_rows.d_stride, cs0 = p.cb.stride0, cs1 = p.cb.stride1;
  const bool z_d_fast = zd == 1, c_d_fast = cs1 == 1;  // loaders walk d (else rows / codes) across threads

  if (tid < rows) row_offset[tid] = p.z_rows.offset(row0 + tid);  // the block's only 64-bit div / mod
  Best best[kRowsPerThread];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) best[i] = Best{INFINITY, INT_MAX};

  for (int k0 = k_begin; k0 < k_end; k0 += kBlockCodes) {
    const int n = min(kBlockCodes, k_end - k0);
    float acc[kRowsPerThread][kCodesPerLane] = {};
    float norm = 0.f;  // of code k0 + tid
    for (int d0 = 0; d0 < D; d0 += CH) {
      const int len = min(CH, D - d0);
      __syncthreads();  // the previous chunk is read (and row_offset written)
      for (int i = tid; i < CH * kBlockRows; i += kSearchThreads) {
        const int r = z_d_fast ? i / CH : i % kBlockRows, dd = z_d_fast ? i % CH : i / kBlockRows;
        zs[dd][r] = r < rows && dd < len ? to_float(z[row_offset[r] + (d0 + dd) * zd]) : 0.f;
      }
      for (int i = tid; i < CH * kBlockCodes; i += kSearchThreads) {
        const int c = c_d_fast ? i / CH : i % kBlockCodes, dd = c_d_fast ? i % CH : i / kBlockCodes;
        cs[dd][c] = c < n && dd < len ? to_float(cb[(k0 + c) * cs0 + (d0 + dd) * cs1]) : 0.f;
      }
      __syncthreads();
      auto step = [&](int dd) {
        float zv[kRowsPerThread], cv[kCodesPerLane];
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i) zv[i] = zs[dd][warp * kRowsPerThread + i];
#pragma unroll
        for (int j = 0; j < kCodesPerLane; ++j) cv[j] = cs[dd][lane + kWarpSize * j];
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
          for (int j = 0; j < kCodesPerLane; ++j) acc[i][j] = fmaf(zv[i], cv[j], acc[i][j]);
        norm = fmaf(cs[dd][tid], cs[dd][tid], norm);
      };
      if (len == CH) {
#pragma unroll
        for (int dd = 0; dd < CH; ++dd) step(dd);
      } else {
        for (int dd = 0; dd < len; ++dd) step(dd);
      }
    }
    norms[tid] = norm;  // the last reads of the previous tile's norms preceded this tile's first barrier
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kCodesPerLane; ++j) {
      const int c = lane + kWarpSize * j;
      if (c >= n) continue;
      const float cn = norms[c];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) best[i].update(fmaf(acc[i][j], -2.f, cn), k0 + c);
    }
  }

  // The warp's lanes hold the same rows: merge them (better is a total order, so any tree gives the same
  // result). Halving steps that also halve the rows a lane keeps: lane l ends with row l / 8's best.
  const bool upper = lane & 16, odd = lane & 8;
  Best pair[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    pair[i] = upper ? best[i + 2] : best[i];
    pair[i].update(shfl_xor(upper ? best[i] : best[i + 2], 16));
  }
  Best mine = odd ? pair[1] : pair[0];
  mine.update(shfl_xor(odd ? pair[0] : pair[1], 8));
#pragma unroll
  for (int offset = 4; offset > 0; offset /= 2) mine.update(shfl_xor(mine, offset));
  const int r = warp * kRowsPerThread + lane / 8;
  if (lane % 8 != 0 || r >= rows) return;
  if (gridDim.y == 1) {
    p.out[row0 + r] = mine.index;
  } else {
    p.part_dist[blockIdx.y * N + row0 + r] = mine.dist;
    p.part_index[blockIdx.y * N + row0 + r] = mine.index;
  }
}

// One thread per row: the splits' results in split order.
__global__ void combine_kernel(const float* __restrict__ part_dist, const int* __restrict__ part_index, int64_t N,
                               int splits, int64_t* __restrict__ out) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= N) return;
  Best best{part_dist[row], part_index[row]};
  for (int s = 1; s < splits; ++s) best.update(part_dist[s * N + row], part_index[s * N + row]);
  out[row] = best.index;
}

template <typename T, int DC>
void launch_search(const NearestCodeParams& p, const NearestCodeGrid& g, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(g.row_blocks), static_cast<unsigned>(g.splits));
  launch(search_kernel<T, DC>, grid, kSearchThreads, 0, stream, p, static_cast<int>(g.span));
  if (g.splits > 1) {
    const int64_t N = p.z_rows.count();
    launch(combine_kernel, static_cast<unsigned>(ceil_div(N, kThreads)), kThreads, 0, stream, p.part_dist,
           p.part_index, N, static_cast<int>(g.splits), p.out);
  }
}

}  // namespace

NearestCodeGrid nearest_code_grid(int64_t rows, int64_t K) {
  int device = 0, sms = 1;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  NearestCodeGrid g{};
  g.row_blocks = ceil_div(rows, kBlockRows);
  // Two waves of blocks, each split keeping a code per lane at least; then equal spans, none empty.
  const int64_t want = ceil_div(2 * static_cast<int64_t>(sms), std::max<int64_t>(1, g.row_blocks));
  const int64_t splits = std::max<int64_t>(1, std::min({want, K / kMinSpan, int64_t{65535}}));
  g.span = ceil_div(K, splits);
  g.splits = ceil_div(K, g.span);
  return g;
}

cudaError_t nearest_code(const NearestCodeParams& p, const NearestCodeGrid& g, cudaStream_t stream) {
  if (p.z_rows.count() == 0) return cudaSuccess;
  if (p.cb.D > kNearestCodeMaxD || p.cb.K > (int64_t{1} << 30)) return cudaErrorInvalidValue;
  return dispatch(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (p.cb.D == 4) {  // VQ-GAN / MoVQ latents
      launch_search<T, 4>(p, g, stream);
    } else if (p.cb.D == 3) {  // LDM's VQ-f4
      launch_search<T, 3>(p, g, stream);
    } else {
      launch_search<T, 0>(p, g, stream);
    }
  });
}

}  // namespace cuda
}  // namespace vqfast
