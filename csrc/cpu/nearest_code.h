// nearest_code on the CPU (nearest_code.cpp), also the search of vector_quantize.cpp.
#pragma once

#include <ATen/core/Tensor.h>

namespace vqfast {
namespace cpu {

// int64 indices with z's shape without `dim` (contiguous).
at::Tensor nearest_code(const at::Tensor& z, const at::Tensor& codebook, int64_t dim);

}  // namespace cpu
}  // namespace vqfast
