// Scatter-add of rows into a (K, D) float32 codebook gradient, shared by codebook_gather and
// vector_quantize backward; code(r) is row r's code, row_value(r, k, d) its element d.
// Deterministic form: the rows sorted by code (order, a stable sort, so a code's rows keep their order;
// start, each code's segment), cut into chunks of 32 sorted rows (2**kScatterChunkShift, types.h) whatever
// their codes, so that a code holding most rows (common early in training) is summed by many threads, not
// by D threads walking all N rows. scatter_chunk_kernel: one thread per (chunk, d) sums each run of one
// code's rows in the chunk, in order; a code whose segment lies in one chunk is written to out, a segment
// that crosses chunk boundaries leaves the sums of its runs in part (a chunk's first run as its head, its
// last as its tail). scatter_combine_kernel: one thread per (code, d) writes the other codes: zero without
// rows, else, for a segment over chunks j0 < j1, the tail of j0 plus the heads of j0 + 1 .. j1 in order.
// Every code's sum thus runs in row order with a fixed association: deterministic.
// Atomic form: one thread per (row, d), atomicAdd into out zeroed by the caller.
#pragma once

#include "cuda/common.cuh"

namespace vqfast {
namespace cuda {

struct ScatterParams {
  int64_t N;             // rows
  const int64_t* order;  // rows sorted by code (stable), or null for the atomic form
  const int64_t* start;  // K + 1 segment bounds in order (deterministic form only)
  int64_t K, D;          // codes, elements per code
  float* out;            // (K, D); zeroed by the caller for the atomic form
  float* part;           // scatter_part_floats(N, D) floats of scratch (deterministic form only)
};

// The chunk of sorted position q.
template <typename Index>
__device__ __forceinline__ Index chunk_of(Index q) {
  return q >> kScatterChunkShift;
}

// Stores the sum of code k's run in chunk j, [begin, end): to out when k's whole segment lies in the
// chunk, else as the chunk's head (the segment began before it) and / or tail (it goes on after it).
template <typename Index>
__device__ __forceinline__ void store_run(const ScatterParams& p, int64_t k, Index d, Index j, Index begin, Index end,
                                          float sum) {
  const Index D = static_cast<Index>(p.D);
  const Index seg_begin = static_cast<Index>(p.start[k]), seg_end = static_cast<Index>(p.start[k + 1]);
  if (chunk_of(seg_begin) == chunk_of(seg_end - 1)) {
    p.out[static_cast<Index>(k) * D + d] = sum;
    return;
  }
  if (seg_begin < begin) p.part[2 * j * D + d] = sum;
  if (seg_end > end) p.part[(2 * j + 1) * D + d] = sum;
}

// One thread per (chunk, d), d fastest so that a warp's threads read one row's elements. The loop has
// a fixed trip count (the code of each row is read, rather than the run's end from start) so that its
// loads unroll and overlap.
template <typename Index, typename Code, typename RowValue>
__global__ void __launch_bounds__(kThreads)
    scatter_chunk_kernel(const ScatterParams p, Code code, RowValue row_value) {
  const Index i = static_cast<Index>(blockIdx.x) * kThreads + static_cast<Index>(threadIdx.x);
  const Index D = static_cast<Index>(p.D), N = static_cast<Index>(p.N);
  if (i >= static_cast<Index>(scatter_chunks(p.N)) * D) return;
  const Index j = i / D, d = i - j * D;
  const Index begin = j << kScatterChunkShift, end = min(N, begin + (Index{1} << kScatterChunkShift));
  int64_t run = code(static_cast<Index>(p.order[begin]));  // the code of the run being summed
  float sum = 0.f;
#pragma unroll 4
  for (Index q = begin; q < end; ++q) {
    const Index r = static_cast<Index>(p.order[q]);
    const int64_t k = code(r);
    VQFAST_KERNEL_ASSERT(k >= 0 && k < p.K);
    if (k != run) {
      store_run(p, run, d, j, begin, end, sum);
      run = k, sum = 0.f;
    }
    sum += row_value(r, static_cast<Index>(k), d);
  }
  store_run(p, run, d, j, begin, end, sum);
}

template <typename Index>
__global__ void __launch_bounds__(kThreads) scatter_combine_kernel(const ScatterParams p) {
  const Index i = static_cast<Index>(blockIdx.x) * kThreads + static_cast<Index>(threadIdx.x);
  const Index D = static_cast<Index>(p.D);
  if (i >= static_cast<Index>(p.K) * D) return;
  const Index k = i / D, d = i - k * D;
  const Index seg_begin = static_cast<Index>(p.start[k]), seg_end = static_cast<Index>(p.start[k + 1]);
  if (seg_begin == seg_end) {
    p.out[i] = 0.f;
    return;
  }
  const Index j0 = chunk_of(seg_begin), j1 = chunk_of(seg_end - 1);
  if (j0 == j1) return;  // scatter_chunk_kernel wrote it
  float acc = p.part[(2 * j0 + 1) * D + d];
  for (Index j = j0 + 1; j <= j1; ++j) acc += p.part[2 * j * D + d];
  p.out[i] = acc;
}

template <typename Index, typename Code, typename RowValue>
__global__ void __launch_bounds__(kThreads)
    scatter_atomic_kernel(const ScatterParams p, Code code, RowValue row_value) {
  const Index i = static_cast<Index>(blockIdx.x) * kThreads + static_cast<Index>(threadIdx.x);
  const Index D = static_cast<Index>(p.D);
  if (i >= static_cast<Index>(p.N) * D) return;
  // d fastest across threads for the atomics (neighbouring addresses); rows are read d-strided.
  const Index r = i / D, d = i - r * D;
  const int64_t k = code(r);
  VQFAST_KERNEL_ASSERT(k >= 0 && k < p.K);
  atomicAdd(p.out + static_cast<Index>(k) * D + d, row_value(r, static_cast<Index>(k), d));
}

// The scatter's grid: blocks of its chunk and combine kernels (deterministic form) or of its atomic one.
struct ScatterGrid {
  int64_t chunk_blocks;    // one thread per (chunk of sorted rows, d)
  int64_t combine_blocks;  // one thread per (code, d)
  int64_t atomic_blocks;   // one thread per (row, d)
};
inline ScatterGrid scatter_grid(int64_t N, int64_t K, int64_t D) {
  return {ceil_div(scatter_chunks(N) * D, kThreads), ceil_div(K * D, kThreads), ceil_div(N * D, kThreads)};
}

// `largest`: the largest offset code and row_value compute.
template <typename Code, typename RowValue>
void scatter_rows(const ScatterParams& p, Code code, RowValue row_value, int64_t largest, cudaStream_t stream) {
  const ScatterGrid grid = scatter_grid(p.N, p.K, p.D);
  largest = std::max({largest, p.N * p.D, p.K * p.D, 2 * scatter_chunks(p.N) * p.D}) + kThreads;
  with_index(largest, [&](auto index_tag) {
    using Index = decltype(index_tag);
    if (p.order != nullptr) {
      if (p.K * p.D == 0) return;
      if (p.N > 0) {
        launch(scatter_chunk_kernel<Index, Code, RowValue>, static_cast<unsigned>(grid.chunk_blocks), kThreads, 0,
               stream, p, code, row_value);
      }
      launch(scatter_combine_kernel<Index>, static_cast<unsigned>(grid.combine_blocks), kThreads, 0, stream, p);
    } else if (p.N * p.D > 0) {
      launch(scatter_atomic_kernel<Index, Code, RowValue>, static_cast<unsigned>(grid.atomic_blocks), kThreads, 0,
             stream, p, code, row_value);
    }
  });
}

}  // namespace cuda
}  // namespace vqfast
