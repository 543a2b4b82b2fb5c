// Torch-free types the CUDA launchers take (csrc/cuda/<op>.h): storage dtypes and codebook views.
#pragma once

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

}  // namespace cuda
}  // namespace vqfast
