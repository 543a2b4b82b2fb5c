// Scatter-add of rows into a (K, D) float32 codebook gradient, shared by codebook_gather and
// vector_quantize backward. Deterministic form: the rows sorted by code (order: a stable sort; start:
// each code's segment) and one thread per (code, d) summing its segment in row order. Atomic form:
// one thread per (row, d), atomicAdd. code(r) is row r's code, row_value(r, k, d) its element d.
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
};

template <typename RowValue>
__global__ void scatter_sorted_kernel(const ScatterParams p, RowValue row_value) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.K * p.D) return;
  const int64_t k = i / p.D, d = i % p.D;
  float acc = 0.f;
  for (int64_t j = p.start[k]; j < p.start[k + 1]; ++j) acc += row_value(p.order[j], k, d);
  p.out[i] = acc;
}

template <typename Code, typename RowValue>
__global__ void scatter_atomic_kernel(const ScatterParams p, Code code, RowValue row_value) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.N * p.D) return;
  // d fastest across threads for the atomics (neighbouring addresses); rows are read d-strided.
  const int64_t r = i / p.D, d = i % p.D, k = code(r);
  VQFAST_KERNEL_ASSERT(k >= 0 && k < p.K);
  atomicAdd(p.out + k * p.D + d, row_value(r, k, d));
}

template <typename Code, typename RowValue>
void scatter_rows(const ScatterParams& p, Code code, RowValue row_value, cudaStream_t stream) {
  if (p.order != nullptr) {
    if (p.K * p.D == 0) return;
    launch(scatter_sorted_kernel<RowValue>, static_cast<unsigned>(ceil_div(p.K * p.D, kThreads)), kThreads, 0, stream,
           p, row_value);
  } else if (p.N * p.D > 0) {
    launch(scatter_atomic_kernel<Code, RowValue>, static_cast<unsigned>(ceil_div(p.N * p.D, kThreads)), kThreads, 0,
           stream, p, code, row_value);
  }
}

}  // namespace cuda
}  // namespace vqfast
