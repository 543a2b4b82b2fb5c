// Scatter-add of rows into a (K, D) float32 codebook gradient, shared by codebook_gather and
// vector_quantize backward. Deterministic form: the rows sorted by code (order: a stable sort; start:
// each code's segment) and one thread per (code, d) summing its segment in row order. Atomic form:
// one thread per (row, d), atomicAdd. row_value(r, k, d) is row r's element d for code k.
#pragma once

#include "cuda/common.cuh"

namespace vqfast {
namespace cuda {

template <typename RowValue>
__global__ void scatter_sorted_kernel(const int64_t* __restrict__ order, const int64_t* __restrict__ start, int64_t K,
                                      int64_t D, float* __restrict__ out, RowValue row_value) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= K * D) return;
  const int64_t k = i / D, d = i % D;
  float acc = 0.f;
  for (int64_t j = start[k]; j < start[k + 1]; ++j) acc += row_value(order[j], k, d);
  out[i] = acc;
}

template <typename RowValue>
__global__ void scatter_atomic_kernel(const int64_t* __restrict__ index, int64_t N, int64_t D, float* __restrict__ out,
                                      RowValue row_value) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= N * D) return;
  // d fastest across threads for the atomics (neighbouring addresses); rows are read d-strided.
  const int64_t r = i / D, d = i % D, k = index[r];
  atomicAdd(out + k * D + d, row_value(r, k, d));
}

template <typename RowValue>
void scatter_rows(const int64_t* index, int64_t N, const int64_t* order, const int64_t* start, int64_t K, int64_t D,
                  float* out, cudaStream_t stream, RowValue row_value) {
  if (order != nullptr) {
    if (K * D == 0) return;
    scatter_sorted_kernel<<<static_cast<unsigned>(ceil_div(K * D, kThreads)), kThreads, 0, stream>>>(order, start, K, D,
                                                                                                      out, row_value);
  } else if (N * D > 0) {
    scatter_atomic_kernel<<<static_cast<unsigned>(ceil_div(N * D, kThreads)), kThreads, 0, stream>>>(index, N, D, out,
                                                                                                      row_value);
  }
}

}  // namespace cuda
}  // namespace vqfast
