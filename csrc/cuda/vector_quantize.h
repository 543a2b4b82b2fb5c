// vector_quantize on CUDA (vector_quantize.cu), after the search of nearest_code.h: raw pointers and a
// stream, no torch headers.
#pragma once

#include "common/layout.h"
#include "cuda/types.h"

#include <cuda_runtime_api.h>

namespace vqfast {
namespace cuda {

// z_q = z + (q - z) in z's dtype and the loss from float32 row sums reduced in a fixed order; with
// code_rows, counts and sums, also each code's rows counted and summed in the same pass.
struct VectorQuantizeParams {
  DType dtype;           // of z, the codebook, z_q and the loss
  const void* z;         // read in place
  Rows z_rows;           // z as rows of D elements
  CodebookView cb;       // the codes
  const int64_t* index;  // the nearest code of each row (contiguous)
  void* z_q;             // written in place
  Rows z_q_rows;         // z_q as rows
  double* part;          // one sum per block: vector_quantize_blocks(rows, D) doubles
  float w_z, w_q;        // the loss weights (vqfast.ops.vector_quantize)
  void* loss;            // 0-d, z's dtype
  // vector_quantize_stats only (all null otherwise): each code's rows counted by integer atomics into
  // code_rows (K, zeroed by the caller; exact in any order) and written as float32 to counts, and summed
  // into sums (K x D float32): by float atomics into sums zeroed by the caller, or, when order and start
  // are given (torch.use_deterministic_algorithms), by the deterministic form of scatter_rows.cuh.
  unsigned long long* code_rows;
  float* counts;           // K
  float* sums;             // K x D
  const int64_t* order;    // rows sorted by code (stable), or null for the atomic form
  const int64_t* start;    // K + 1 segment bounds in order (deterministic form only)
  float* scatter_part;     // scatter_part_floats(rows, D) floats of scratch (deterministic form only)
};
int64_t vector_quantize_blocks(int64_t rows, int64_t D);
cudaError_t vector_quantize(const VectorQuantizeParams& p, cudaStream_t stream);

// grad_z in z's dtype; the codebook gradient as float32, by the deterministic form of scatter_rows.cuh
// when order/start are given, else by atomics into cb_grad zeroed by the caller.
struct VectorQuantizeBwdParams {
  DType dtype;              // of grad_z_q, grad_loss, z, the codebook and grad_z
  const void* grad_z_q;     // read in place
  Rows grad_z_q_rows;       // as rows
  const void* grad_loss;    // 0-d, read on the device (no host synchronisation)
  const void* z;            // read in place
  Rows z_rows;              // as rows
  CodebookView cb;          // the codes
  const int64_t* index;     // the nearest code of each row (contiguous)
  const int64_t* order;     // rows sorted by code (stable), or null for the atomic form
  const int64_t* start;     // K + 1 segment bounds in order (deterministic form only)
  float w_z, w_q;           // the loss weights
  void* grad_z;             // written in place
  Rows grad_z_rows;         // as rows
  float* cb_grad;           // (K, D) float32
  float* part;              // scatter_part_floats(rows, D) floats of scratch (deterministic form only)
};
cudaError_t vector_quantize_backward(const VectorQuantizeBwdParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace vqfast
