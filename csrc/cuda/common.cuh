// Device helpers shared by the CUDA kernels: float32 arithmetic on float / half / bfloat16 storage,
// dtype dispatch, the index width, warp and block reductions, and the device-side checks that stand in
// for host ones.
#pragma once

#include "common/layout.h"
#include "cuda/types.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cassert>
#include <climits>
#include <cstdint>
#include <type_traits>

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

constexpr int kWarpSize = 32;

// v from lane (this lane ^ offset), moved in 32-bit words (what a shuffle moves), so any trivially
// copyable value of whole words crosses lanes: floats, doubles, float2, Welford states, (distance, index).
template <typename V>
__device__ __forceinline__ V shfl_xor(const V& v, int offset) {
  static_assert(sizeof(V) % 4 == 0, "shuffled in 32-bit words");
  union Words {  // the value's words in registers (a memcpy through memory would cost a stack frame)
    V value;
    unsigned word[sizeof(V) / 4];
  } u{v};
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(V) / 4); ++i) u.word[i] = __shfl_xor_sync(0xffffffffu, u.word[i], offset);
  return u.value;
}

// op over the warp's lanes in a fixed butterfly (lanes 16, 8, 4, 2, 1 apart): lane 0 ends with the same
// tree of op on every run, so a non-associative op (float sums, Welford merges) stays deterministic.
template <typename V, typename Op>
__device__ __forceinline__ V warp_reduce(V v, Op op) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v = op(v, shfl_xor(v, offset));
  return v;
}

// Lane l of warp 0 returns op over lane l's values of the block's warps, in warp order; other threads
// return their own v. `shared` holds blockDim.x values (a multiple of 32); reusing it for another fold
// needs a __syncthreads between.
template <typename V, typename Op>
__device__ __forceinline__ V fold_warps(V v, V* shared, Op op) {
  shared[threadIdx.x] = v;
  __syncthreads();
  if (threadIdx.x < kWarpSize) {
    for (unsigned w = 1; w < blockDim.x / kWarpSize; ++w) v = op(v, shared[w * kWarpSize + threadIdx.x]);
  }
  return v;
}

// op over the block's threads in a fixed order (each warp's butterfly, then the warps in order): the
// result is thread 0's. `shared` as fold_warps'.
template <typename V, typename Op>
__device__ __forceinline__ V block_reduce(V v, V* shared, Op op) {
  return fold_warps(warp_reduce(v, op), shared, op);
}

struct Plus {
  template <typename V>
  __device__ __forceinline__ V operator()(V a, V b) const {
    return a + b;
  }
};

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

// ---------------------------------------------------------------------------------- index width
// Kernels take their element indices and offsets as a template Index: int32_t when every value a launch
// computes fits (no 64-bit division or multiply per element), else int64_t (tensors past 2**31 elements).

// The largest value the int32_t kernels may compute: INT32_MAX, lowered by the host build's tests
// (_C_cuda_host.set_index32_limit) to run the int64_t kernels on small tensors.
inline int64_t& index32_limit() {
  static int64_t limit = INT32_MAX;
  return limit;
}

// Calls f(Index{}): int32_t when `largest` (the largest index or offset of the launch, its last block's
// overhang included) fits, else int64_t.
template <typename F>
void with_index(int64_t largest, F&& f) {
  if (largest <= index32_limit()) {
    f(int32_t{});
  } else {
    f(int64_t{});
  }
}

// The largest offset of t's elements (strides are never negative), 0 for none.
inline int64_t max_offset(const Strided& t) {
  int64_t off = 0;
  for (int d = 0; d < t.ndim; ++d) off += (t.size[d] - 1) * t.stride[d];
  return t.numel > 0 ? off : 0;
}
inline int64_t max_offset(const Rows& t, int64_t D) {
  return max_offset(t.rows) + std::max<int64_t>(D - 1, 0) * t.d_stride;
}

// Strided::offset in Index arithmetic; the loop runs over kMaxDims with a guard so that size[] and
// stride[] are indexed by constants (kept in registers, not copied to a stack frame).
template <typename Index>
__device__ __forceinline__ Index offset_of(const Strided& t, Index i) {
  Index off = 0;
#pragma unroll
  for (int d = kMaxDims - 1; d > 0; --d) {
    if (d < t.ndim) {
      const Index size = static_cast<Index>(t.size[d]);
      off += i % size * static_cast<Index>(t.stride[d]);
      i /= size;
    }
  }
  return t.ndim > 0 ? off + i * static_cast<Index>(t.stride[0]) : Index{0};
}

// Element e of `rows` rows of D elements, visited d fastest when d_fast (a row's elements adjacent in
// memory), else rows fastest (NCHW latents: neighbouring pixels), so that a warp's loads coalesce.
template <typename Index>
struct RowElem {
  Index row, d;
};
template <typename Index>
__device__ __forceinline__ RowElem<Index> row_elem(Index e, Index rows, Index D, bool d_fast) {
  return d_fast ? RowElem<Index>{e / D, e % D} : RowElem<Index>{e % rows, e / rows};
}

// The offset of element el of `rows`, and of element d of code k.
template <typename Index>
__device__ __forceinline__ Index offset_in(const Rows& rows, RowElem<Index> el) {
  return offset_of(rows.rows, el.row) + el.d * static_cast<Index>(rows.d_stride);
}
template <typename Index>
__device__ __forceinline__ Index code_offset(const CodebookView& cb, Index k, Index d) {
  return k * static_cast<Index>(cb.stride0) + d * static_cast<Index>(cb.stride1);
}
inline int64_t max_offset(const CodebookView& cb) {
  return cb.K > 0 && cb.D > 0 ? (cb.K - 1) * cb.stride0 + (cb.D - 1) * cb.stride1 : 0;
}

// ------------------------------------------------------------------------------- 16-byte accesses

// Elements of T in one 16-byte access.
template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));

// VEC elements moved as one access (ld/st.global.v4 when 16 bytes); its address must be a multiple of its
// size, which the launchers check (aligned16 and strides multiples of VEC) before they pick VEC > 1.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};
template <int VEC, typename T>
__device__ __forceinline__ Vec<T, VEC> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, VEC>*>(p);
}
template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, VEC>& v) {
  *reinterpret_cast<Vec<T, VEC>*>(p) = v;
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Calls f(std::integral_constant<int, VEC>{}): VEC = kVec<T> when `fits`, else 1 (one element per access).
template <typename T, typename F>
void with_vec(bool fits, F&& f) {
  if (fits) {
    f(std::integral_constant<int, kVec<T>>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

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
