// Device helpers shared by the CUDA kernels: float32 arithmetic on float / half / bfloat16 storage,
// dtype dispatch and the device-side checks that stand in for host ones.
#pragma once

#include "common/layout.h"
#include "cuda/types.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cassert>

// Stops the kernel with cudaErrorAssert ("device-side assert triggered" in torch) when cond is false,
// whatever NDEBUG says: the host never checks the data (no synchronisation), so this is the check.
#define VQFAST_KERNEL_ASSERT(cond)                                                      \
  do {                                                                                  \
    if (!(cond)) __assert_fail(#cond, __FILE__, static_cast<unsigned>(__LINE__), __func__); \
  } while (0)

namespace vqfast {
namespace cuda {

constexpr int kThreads = 256;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Round-to-nearest-even, as torch's casts.
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Calls f(T{}) with T the storage type of dtype.
template <typename F>
cudaError_t dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float:
      f(float{});
      break;
    case DType::Half:
      f(__half{});
      break;
    case DType::BFloat16:
      f(__nv_bfloat16{});
      break;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace vqfast
