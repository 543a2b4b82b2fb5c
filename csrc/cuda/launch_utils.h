// Tensor-side helpers of csrc/cuda/*_launch.cpp: dtypes, in-place views (common/layout.h), the device,
// the current stream, launch errors and the code segments of deterministic scatters.
#pragma once

#include "common/layout.h"
#include "cuda/types.h"

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <cuda_runtime_api.h>
#ifndef VQFAST_CUDA_HOST
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace vqfast {
namespace cuda {

inline DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::Float;
    case at::kHalf:
      return DType::Half;
    case at::kBFloat16:
      return DType::BFloat16;
    default:
      TORCH_CHECK(false, name, ": expected float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

inline CodebookView codebook_view(const at::Tensor& cb) {
  return {cb.const_data_ptr(), cb.size(0), cb.size(1), cb.stride(0), cb.stride(1)};
}

// The rows of t along dim, read in place (vqfast.native declines layouts that keep more than kMaxDims
// dimensions once merged).
inline Rows rows_in_place(const at::Tensor& t, int64_t dim, const char* name) {
  Rows rows;
  TORCH_CHECK(rows_of(t, dim, rows), name, ": more than ", kMaxDims, " dimensions remain once merged (strides ",
              t.strides(), ")");
  return rows;
}

inline Strided indices_in_place(const at::Tensor& indices, const char* name) {
  TORCH_CHECK(indices.scalar_type() == at::kLong, name, ": indices must be int64");
  Strided idx;
  TORCH_CHECK(merge_dims(indices, -1, idx), name, ": more than ", kMaxDims, " index dimensions remain once merged");
  return idx;
}

#ifdef VQFAST_CUDA_HOST  // the host build (csrc/host/): the kernels run emulated, on CPU tensors
constexpr c10::DeviceType kDeviceType = c10::DeviceType::CPU;
struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};
inline cudaStream_t stream() { return nullptr; }
// The launchers' operator registrations: the same schemas under the cuda_host backend's namespace.
#define VQFAST_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(vqfast_cuda_host, CPU, m)
#else
constexpr c10::DeviceType kDeviceType = c10::DeviceType::CUDA;
using DeviceGuard = c10::cuda::CUDAGuard;
inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
#define VQFAST_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(vqfast_C, CUDA, m)
#endif

// Whether t is on the device the kernels run on.
inline bool on_device(const at::Tensor& t) { return t.device().type() == kDeviceType; }

inline void check(cudaError_t err, const char* name) {
  TORCH_CHECK(err == cudaSuccess, name, ": CUDA launch failed: ", cudaGetErrorString(err));
}

// A float32 (K, D) buffer for scatter_rows.cuh and, under torch.use_deterministic_algorithms, the rows
// sorted by code: order (a stable sort of `index`), start (K + 1 segment bounds) and part (the chunk sums'
// scratch); undefined otherwise (the atomic form, which needs the buffer zeroed).
struct CodeSegments {
  at::Tensor out, order, start, part;
  CodeSegments(const at::Tensor& index, int64_t K, int64_t D) {
    // Without rows the sum is zero either way (and an empty sort's order has no data pointer).
    if (at::globalContext().deterministicAlgorithms() && index.numel() > 0) {
      auto sorted = at::sort(index.reshape(-1), /*stable=*/true, /*dim=*/0, /*descending=*/false);
      order = std::get<1>(sorted);
      start = at::searchsorted(std::get<0>(sorted), at::arange(K + 1, index.options()));
      out = at::empty({K, D}, index.options().dtype(at::kFloat));
      part = at::empty({scatter_part_floats(index.numel(), D)}, index.options().dtype(at::kFloat));
    } else {
      out = at::zeros({K, D}, index.options().dtype(at::kFloat));
    }
  }
  const int64_t* order_ptr() const { return order.defined() ? order.const_data_ptr<int64_t>() : nullptr; }
  const int64_t* start_ptr() const { return start.defined() ? start.const_data_ptr<int64_t>() : nullptr; }
  float* part_ptr() const { return part.defined() ? part.mutable_data_ptr<float>() : nullptr; }
};

}  // namespace cuda
}  // namespace vqfast
