// Torch-free types the CUDA launchers take (csrc/cuda/<op>.h): storage dtypes, codebook views and the
// deterministic scatter's chunking.
#pragma once

#include "common/layout.h"

#include <cstdint>

namespace vqfast {
namespace cuda {

enum class DType { Float, Half, BFloat16 };
inline int element_bytes(DType dtype) { return dtype == DType::Float ? 4 : 2; }

// A (K, D) codebook read in place.
struct CodebookView {
  const void* data;  // K x D elements of the op's dtype
  int64_t K, D;      // codes, elements per code
  int64_t stride0;   // between codes
  int64_t stride1;   // between a code's elements
};

// The deterministic scatter (scatter_rows.cuh) sums chunks of 2**kScatterChunkShift sorted rows, and keeps
// a head and a tail sum of D floats per chunk as scratch.
constexpr int kScatterChunkShift = 5;
VQFAST_HOST_DEVICE int64_t scatter_chunks(int64_t N) { return ceil_div(N, int64_t{1} << kScatterChunkShift); }
inline int64_t scatter_part_floats(int64_t N, int64_t D) { return 2 * scatter_chunks(N) * D; }

}  // namespace cuda
}  // namespace vqfast
