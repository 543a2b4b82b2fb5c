// CPU kernels shared between ops (vector_quantize reuses the codebook search).
#pragma once

#include <ATen/core/Tensor.h>

namespace vqfast {
namespace cpu {

// int64 indices with z's shape without `dim` (contiguous).
at::Tensor nearest_code(const at::Tensor& z, const at::Tensor& codebook, int64_t dim);

}  // namespace cpu
}  // namespace vqfast
