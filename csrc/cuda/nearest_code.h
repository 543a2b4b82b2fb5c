// nearest_code on CUDA (nearest_code.cu): raw pointers and a stream, no torch headers.
#pragma once

#include "common/layout.h"
#include "cuda/types.h"

#include <cuda_runtime_api.h>

namespace vqfast {
namespace cuda {

// The longest code the search takes (the CUDA backend's stated limit; the kernel stages d in chunks).
constexpr int64_t kNearestCodeMaxD = 8191;

// The search's launch: row_blocks x splits blocks, each split taking `span` codes (the last fewer).
struct NearestCodeGrid {
  int64_t row_blocks;  // blocks of rows (grid.x)
  int64_t splits;      // blocks sharing each row block's codes (grid.y)
  int64_t span;        // codes per split
};
// About two waves of blocks on this device's SMs where rows and codes allow.
NearestCodeGrid nearest_code_grid(int64_t rows, int64_t K);

struct NearestCodeParams {
  DType dtype;        // of z and the codebook
  const void* z;      // the rows searched, read in place
  Rows z_rows;        // z as rows of D elements
  CodebookView cb;    // the codes
  float* part_dist;   // splits x rows partial minima (splits > 1 only)
  int* part_index;    // splits x rows partial argmins (splits > 1 only)
  int64_t* out;       // int64 index per row
};

// cudaErrorInvalidValue when D > kNearestCodeMaxD or K > 2**30 (32-bit code indices).
cudaError_t nearest_code(const NearestCodeParams& p, const NearestCodeGrid& grid, cudaStream_t stream);

}  // namespace cuda
}  // namespace vqfast
