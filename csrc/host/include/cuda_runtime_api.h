// Stand-in for the CUDA runtime API in the host build of csrc/cuda/ (csrc/host/, the cuda_host backend):
// what the kernels and launchers use of it, with no CUDA toolkit. The launches themselves and the
// device side are csrc/host/cuda_device.h's.
#pragma once

#include <cstdint>

// vector_types.h
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) int2 {
  int x, y;
};
struct alignas(16) int4 {
  int x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorAssert = 710,
  cudaErrorLaunchFailure = 719,
};

using cudaStream_t = struct CUstream_st*;

enum cudaDeviceAttr : int {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrMultiProcessorCount = 16,
};

namespace vqfast {
namespace host {
// The emulated device: an H100's multiprocessor count, so that the launchers choose the grids (splits)
// they would choose there; the per-block limits every launch is held to.
constexpr int kMultiProcessors = 132;
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxSharedPerBlock = 48 * 1024;  // dynamic shared memory without an opt-in attribute

// The calling thread's last error, as the CUDA runtime keeps one per host thread.
inline cudaError_t& last_error() {
  static thread_local cudaError_t error = cudaSuccess;
  return error;
}
}  // namespace host
}  // namespace vqfast

inline cudaError_t cudaGetLastError() {
  const cudaError_t error = vqfast::host::last_error();
  vqfast::host::last_error() = cudaSuccess;
  return error;
}

inline cudaError_t cudaPeekAtLastError() { return vqfast::host::last_error(); }

inline const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
    case cudaErrorAssert:
      return "device-side assert triggered";
    case cudaErrorLaunchFailure:
      return "unspecified launch failure";
  }
  return "unknown error";
}

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidValue;
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock:
      *value = static_cast<int>(vqfast::host::kMaxThreadsPerBlock);
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock:
      *value = static_cast<int>(vqfast::host::kMaxSharedPerBlock);
      return cudaSuccess;
    case cudaDevAttrMultiProcessorCount:
      *value = vqfast::host::kMultiProcessors;
      return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
