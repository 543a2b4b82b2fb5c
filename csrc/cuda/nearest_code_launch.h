// nearest_code for CUDA tensors (nearest_code_launch.cpp), also the search of vector_quantize_launch.cpp.
#pragma once

#include <ATen/core/Tensor.h>

namespace vqfast {
namespace cuda {

// int64 indices with z's shape without `dim` (contiguous).
at::Tensor nearest_code_cuda(const at::Tensor& z, const at::Tensor& codebook, int64_t dim);

}  // namespace cuda
}  // namespace vqfast
