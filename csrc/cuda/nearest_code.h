// nearest_code on CUDA (nearest_code.cu): raw pointers and a stream, no torch headers.
#pragma once

#include "common/layout.h"
#include "cuda/types.h"

#include <cuda_runtime_api.h>

namespace vqfast {
namespace cuda {

// The longest code the search takes: a code and its norm fill at most the 8192-float shared tile.
constexpr int64_t kNearestCodeMaxD = 8191;

struct NearestCodeParams {
  DType dtype;          // of z and the codebook
  const void* z;        // the rows searched, read in place
  Rows z_rows;          // z as rows of D elements
  CodebookView cb;      // the codes
  int64_t splits;       // blocks sharing each row block's codes (nearest_code_splits)
  float* part_dist;     // splits x rows partial minima (splits > 1 only)
  int64_t* part_index;  // splits x rows partial argmins (splits > 1 only)
  int64_t* out;         // int64 index per row
};

// The codebook is split among `splits` blocks per row block when rows alone would leave the GPU idle;
// the partial results then take rows * splits floats and int64s.
int64_t nearest_code_splits(int64_t rows, int64_t K);
// cudaErrorInvalidValue when D > kNearestCodeMaxD.
cudaError_t nearest_code(const NearestCodeParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace vqfast
