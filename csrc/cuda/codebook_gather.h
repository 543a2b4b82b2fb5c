// codebook_gather on CUDA (codebook_gather.cu): raw pointers and a stream, no torch headers.
#pragma once

#include "common/layout.h"
#include "cuda/types.h"

#include <cuda_runtime_api.h>

namespace vqfast {
namespace cuda {

struct CodebookGatherParams {
  DType dtype;             // of the codebook and out
  const int64_t* indices;  // one code per row of out, read in place
  Strided index_layout;    // where row r's index is: indices[index_layout.offset(r)]
  CodebookView cb;         // the codes
  void* out;               // contiguous, the code dimension at the position out_rows describes
  Rows out_rows;           // out as rows of D elements
};

// Indices outside [0, K) stop the kernel with a device-side assertion.
cudaError_t codebook_gather(const CodebookGatherParams& p, cudaStream_t stream);
// Elements a thread copies at once: 16 bytes' worth of a code when the code dimension is out's last and
// the codebook's rows are contiguous, 16-byte aligned and a multiple of 16 bytes long, else 1.
int codebook_gather_vector_width(const CodebookGatherParams& p);

// Scatter-add of grad's rows into a (K, D) float32 gradient (scatter_rows.cuh). Deterministic form (order
// given): rows ordered by code (order, a stable sort of the codes; start, K + 1 segment bounds), each
// segment summed in row order. Atomic form: atomicAdd in any order, into out zeroed by the caller.
struct CodebookGatherBwdParams {
  DType dtype;             // of grad
  const void* grad;        // the gradient of codebook_gather's output, read in place
  Rows grad_rows;          // grad as rows of D elements
  const int64_t* indices;  // one code per row, read in place
  Strided index_layout;    // as CodebookGatherParams::index_layout
  const int64_t* order;    // rows sorted by code (stable), or null for the atomic form
  const int64_t* start;    // K + 1 segment bounds in order (deterministic form only)
  int64_t K, D;            // codes, elements per code
  float* out;              // (K, D) float32
  float* part;             // scatter_part_floats(rows, D) floats of scratch (deterministic form only)
};
cudaError_t codebook_gather_backward(const CodebookGatherBwdParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace vqfast
