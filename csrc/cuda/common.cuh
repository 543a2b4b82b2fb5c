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
// The host build (csrc/host/cuda_device.h) defines VQFAST_ASSERT_FAIL to stop the emulated launch.
#ifndef VQFAST_ASSERT_FAIL
#define VQFAST_ASSERT_FAIL __assert_fail
#endif
#define VQFAST_KERNEL_ASSERT(cond)                                                             \
  do {                                                                                         \
    if (!(cond)) VQFAST_ASSERT_FAIL(#cond, __FILE__, static_cast<unsigned>(__LINE__), __func__); \
  } while (0)

namespace vqfast {
namespace cuda {

constexpr int kThreads = 256;

#ifdef __CUDACC__  // the host build (csrc/host/cuda_device.h) defines both to run blocks on host threads
// kernel<<<grid, block, smem, stream>>>(args...): every launch goes through here, so one launcher source
// serves nvcc and the host build.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args... args) {
  kernel<<<grid, block, smem, stream>>>(args...);
}

// The launch's dynamic shared memory (its smem bytes), 16-byte aligned.
template <typename T>
__device__ __forceinline__ T* dynamic_shared() {
  extern __shared__ __align__(16) unsigned char vqfast_dynamic_shared[];
  return reinterpret_cast<T*>(vqfast_dynamic_shared);
}
#endif

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
