// group_norm_act on CUDA: act(group_norm(x) * weight + bias) with float32 statistics, forward and
// backward, for NCHW-contiguous and channels-last x; and spatial_norm_act, MoVQ's SpatialNorm, which
// multiplies the affine output by scale and adds shift (SPATIAL, SpatialArgs in launchers.h).
// Reductions over a group run in `splits` blocks per group (grid.y), each block combining its threads
// in a fixed tree (Welford / Chan for the forward's mean and variance, so a large mean does not
// cancel), the splits then combined in order: the result is deterministic. Elementwise passes
// recompute x_hat from the statistics.
#include "cuda/common.cuh"

#include <algorithm>
#include <type_traits>

namespace vqfast {
namespace cuda {
namespace {

__device__ __forceinline__ int64_t group_size(const NormShape& sh) { return sh.C / sh.G * sh.S; }

// Address and channel of element i (< Cg * S) of group g of sample n.
__device__ __forceinline__ int64_t group_addr(const NormShape& sh, int64_t n, int64_t g, int64_t i, int64_t& c) {
  const int64_t Cg = sh.C / sh.G;
  if (sh.channels_last) {
    c = g * Cg + i % Cg;
    return (n * sh.S + i / Cg) * sh.C + c;
  }
  c = g * Cg + i / sh.S;
  return (n * sh.C + g * Cg) * sh.S + i;
}

// Spatial position of the element at address a.
__device__ __forceinline__ int64_t spatial_pos(const NormShape& sh, int64_t a) {
  return sh.channels_last ? (a / sh.C) % sh.S : a % sh.S;
}

// Index in scale / shift (N, C, s) of the element (n, c) at address a.
__device__ __forceinline__ int64_t small_index(const NormShape& sh, const SpatialArgs& sp, int64_t n, int64_t c,
                                               int64_t a) {
  return (n * sh.C + c) * sp.s + sp.source[spatial_pos(sh, a)];
}

// Sample and channel of element e of the whole tensor.
__device__ __forceinline__ void elem_nc(const NormShape& sh, int64_t e, int64_t& n, int64_t& c) {
  n = e / (sh.S * sh.C);
  c = sh.channels_last ? e % sh.C : (e / sh.S) % sh.C;
}

struct Welford {  // no default member initializers: it also lives in __shared__ memory
  float count, mean, m2;
  __device__ void add(float v) {
    count += 1.f;
    const float delta = v - mean;
    mean += delta / count;
    m2 = fmaf(delta, v - mean, m2);
  }
  __device__ void merge(const Welford& o) {
    const float n = count + o.count;
    if (o.count == 0.f) return;
    const float delta = o.mean - mean, f = o.count / n;
    mean = fmaf(delta, f, mean);
    m2 = m2 + o.m2 + delta * delta * count * f;
    count = n;
  }
};

template <typename V, typename Op>
__device__ V block_reduce(V v, V* shared, Op op) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s /= 2) {
    if (threadIdx.x < s) shared[threadIdx.x] = op(shared[threadIdx.x], shared[threadIdx.x + s]);
    __syncthreads();
  }
  return shared[0];
}

__device__ __forceinline__ float silu(float y) { return y / (1.f + expf(-y)); }
__device__ __forceinline__ float silu_grad(float y) {
  const float s = 1.f / (1.f + expf(-y));
  return s * (1.f + y * (1.f - s));
}

// The range of group elements split blockIdx.y covers.
__device__ __forceinline__ void split_range(int64_t M, int64_t& begin, int64_t& end) {
  const int64_t chunk = ceil_div(M, gridDim.y);
  begin = blockIdx.y * chunk;
  end = min(M, begin + chunk);
}

template <typename T>
__global__ void stats_kernel(const T* __restrict__ x, NormShape sh, float* __restrict__ part) {
  __shared__ Welford shared[kThreads];
  const int64_t ng = blockIdx.x, n = ng / sh.G, g = ng % sh.G;
  int64_t begin, end, c;
  split_range(group_size(sh), begin, end);
  Welford w{0.f, 0.f, 0.f};
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) w.add(to_float(x[group_addr(sh, n, g, i, c)]));
  w = block_reduce(w, shared, [](Welford a, const Welford& b) { a.merge(b); return a; });
  if (threadIdx.x == 0) {
    float* p = part + (ng * gridDim.y + blockIdx.y) * 3;
    p[0] = w.count, p[1] = w.mean, p[2] = w.m2;
  }
}

__global__ void stats_final_kernel(const float* __restrict__ part, int64_t groups, int64_t splits, int64_t M, float eps,
                                   float* __restrict__ mean, float* __restrict__ rstd) {
  const int64_t ng = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (ng >= groups) return;
  Welford w{0.f, 0.f, 0.f};
  for (int64_t s = 0; s < splits; ++s) {
    const float* p = part + (ng * splits + s) * 3;
    w.merge(Welford{p[0], p[1], p[2]});
  }
  mean[ng] = w.mean;
  rstd[ng] = 1.f / sqrtf(w.m2 / static_cast<float>(M) + eps);
}

template <typename T, bool SILU, bool SPATIAL>
__global__ void apply_kernel(const T* __restrict__ x, NormShape sh, const float* __restrict__ weight,
                             const float* __restrict__ bias, SpatialArgs sp, const float* __restrict__ mean,
                             const float* __restrict__ rstd, T* __restrict__ y, int64_t total) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= total) return;
  int64_t n, c;
  elem_nc(sh, e, n, c);
  const int64_t ng = n * sh.G + c / (sh.C / sh.G);
  float v = (to_float(x[e]) - mean[ng]) * rstd[ng];
  if (weight) v *= weight[c];
  if (bias) v += bias[c];
  if (SPATIAL) {
    const int64_t j = small_index(sh, sp, n, c, e);
    v = v * sp.scale[j] + sp.shift[j];
  }
  y[e] = from_float<T>(SILU ? silu(v) : v);
}

// What the backward passes recompute at an element: x_hat, the affine output (norm), the gradient at
// the input of the activation (g_act), at the output of the affine map (g_pre) and at x_hat (g_hat).
struct Grads {
  float xh, norm, g_act, g_pre, g_hat;
};

template <typename T, bool SILU, bool SPATIAL>
__device__ __forceinline__ Grads grads_at(const T* grad, const T* x, const NormShape& sh, const SpatialArgs& sp,
                                          int64_t a, int64_t n, int64_t c, float mean, float rstd,
                                          const float* weight, const float* bias) {
  Grads r;
  r.xh = (to_float(x[a]) - mean) * rstd;
  const float w = weight ? weight[c] : 1.f;
  r.norm = r.xh * w + (bias ? bias[c] : 0.f);
  float scale = 1.f, pre = r.norm;
  if (SPATIAL) {
    const int64_t j = small_index(sh, sp, n, c, a);
    scale = sp.scale[j];
    pre = r.norm * scale + sp.shift[j];
  }
  r.g_act = to_float(grad[a]);
  if (SILU) r.g_act *= silu_grad(pre);
  r.g_pre = SPATIAL ? r.g_act * scale : r.g_act;
  r.g_hat = r.g_pre * w;
  return r;
}

template <typename T, bool SILU, bool SPATIAL>
__global__ void backward_stats_kernel(const T* __restrict__ grad, const T* __restrict__ x, NormShape sh,
                                      const float* __restrict__ weight, const float* __restrict__ bias, SpatialArgs sp,
                                      const float* __restrict__ mean, const float* __restrict__ rstd,
                                      float* __restrict__ part) {
  __shared__ float2 shared[kThreads];
  const int64_t ng = blockIdx.x, n = ng / sh.G, g = ng % sh.G;
  int64_t begin, end, c;
  split_range(group_size(sh), begin, end);
  float2 s = {0.f, 0.f};
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const int64_t a = group_addr(sh, n, g, i, c);
    const Grads r = grads_at<T, SILU, SPATIAL>(grad, x, sh, sp, a, n, c, mean[ng], rstd[ng], weight, bias);
    s.x += r.g_hat, s.y = fmaf(r.g_hat, r.xh, s.y);
  }
  s = block_reduce(s, shared, [](float2 a, const float2& b) { return float2{a.x + b.x, a.y + b.y}; });
  if (threadIdx.x == 0) reinterpret_cast<float2*>(part)[ng * gridDim.y + blockIdx.y] = s;
}

// part (groups x splits float2) -> coef[ng] = (mean(g_hat), mean(g_hat * x_hat)) over the group.
__global__ void backward_final_kernel(const float* __restrict__ part, int64_t groups, int64_t splits, int64_t M,
                                      float* __restrict__ coef) {
  const int64_t ng = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (ng >= groups) return;
  float2 s = {0.f, 0.f};
  for (int64_t k = 0; k < splits; ++k) {
    const float2 p = reinterpret_cast<const float2*>(part)[ng * splits + k];
    s.x += p.x, s.y += p.y;
  }
  coef[2 * ng] = s.x / static_cast<float>(M);
  coef[2 * ng + 1] = s.y / static_cast<float>(M);
}

// grad_x = rstd * (g_hat - mean(g_hat) - x_hat * mean(g_hat * x_hat)).
template <typename T, bool SILU, bool SPATIAL>
__global__ void grad_x_kernel(const T* __restrict__ grad, const T* __restrict__ x, NormShape sh,
                              const float* __restrict__ weight, const float* __restrict__ bias, SpatialArgs sp,
                              const float* __restrict__ mean, const float* __restrict__ rstd,
                              const float* __restrict__ coef, T* __restrict__ grad_x, int64_t total) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= total) return;
  int64_t n, c;
  elem_nc(sh, e, n, c);
  const int64_t ng = n * sh.G + c / (sh.C / sh.G);
  const Grads r = grads_at<T, SILU, SPATIAL>(grad, x, sh, sp, e, n, c, mean[ng], rstd[ng], weight, bias);
  grad_x[e] = from_float<T>(rstd[ng] * (r.g_hat - coef[2 * ng] - r.xh * coef[2 * ng + 1]));
}

// One block per channel: grad_weight[c] = sum g_pre * x_hat, grad_bias[c] = sum g_pre over (n, s).
template <typename T, bool SILU, bool SPATIAL>
__global__ void channel_grads_kernel(const T* __restrict__ grad, const T* __restrict__ x, NormShape sh,
                                     const float* __restrict__ weight, const float* __restrict__ bias, SpatialArgs sp,
                                     const float* __restrict__ mean, const float* __restrict__ rstd,
                                     float* __restrict__ grad_weight, float* __restrict__ grad_bias) {
  __shared__ float2 shared[kThreads];
  const int64_t c = blockIdx.x, g = c / (sh.C / sh.G);
  float2 s = {0.f, 0.f};
  for (int64_t j = threadIdx.x; j < sh.N * sh.S; j += kThreads) {
    const int64_t n = j / sh.S, p = j % sh.S;
    const int64_t a = sh.channels_last ? (n * sh.S + p) * sh.C + c : (n * sh.C + c) * sh.S + p;
    const Grads r =
        grads_at<T, SILU, SPATIAL>(grad, x, sh, sp, a, n, c, mean[n * sh.G + g], rstd[n * sh.G + g], weight, bias);
    s.x = fmaf(r.g_pre, r.xh, s.x), s.y += r.g_pre;
  }
  s = block_reduce(s, shared, [](float2 a, const float2& b) { return float2{a.x + b.x, a.y + b.y}; });
  if (threadIdx.x == 0) grad_weight[c] = s.x, grad_bias[c] = s.y;
}

// One thread per (n, c, j): grad_scale = sum g_act * norm, grad_shift = sum g_act over the positions p
// with source[p] == j, in order of p.
template <typename T, bool SILU>
__global__ void down_sum_kernel(const T* __restrict__ grad, const T* __restrict__ x, NormShape sh,
                                const float* __restrict__ weight, const float* __restrict__ bias, SpatialArgs sp,
                                const float* __restrict__ mean, const float* __restrict__ rstd) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= sh.N * sh.C * sp.s) return;
  const int64_t j = i % sp.s, c = (i / sp.s) % sh.C, n = i / (sp.s * sh.C);
  const int64_t ng = n * sh.G + c / (sh.C / sh.G);
  float gs = 0.f, gt = 0.f;
  for (int64_t q = sp.start[j]; q < sp.start[j + 1]; ++q) {
    const int64_t p = sp.order[q];
    const int64_t a = sh.channels_last ? (n * sh.S + p) * sh.C + c : (n * sh.C + c) * sh.S + p;
    const Grads r = grads_at<T, SILU, true>(grad, x, sh, sp, a, n, c, mean[ng], rstd[ng], weight, bias);
    gs = fmaf(r.g_act, r.norm, gs), gt += r.g_act;
  }
  sp.grad_scale[i] = gs;
  sp.grad_shift[i] = gt;
}

// Calls f(silu_tag, spatial_tag) with std::integral_constant<bool, ...> tags.
template <typename F>
void dispatch_flags(bool silu, bool spatial, F&& f) {
  auto with_spatial = [&](auto silu_tag) {
    if (spatial) {
      f(silu_tag, std::true_type{});
    } else {
      f(silu_tag, std::false_type{});
    }
  };
  if (silu) {
    with_spatial(std::true_type{});
  } else {
    with_spatial(std::false_type{});
  }
}

}  // namespace

int64_t group_norm_splits(const NormShape& sh) {
  int device = 0, sms = 1;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  // About four blocks per SM, each split reading at least 4096 elements.
  const int64_t want = ceil_div(4 * static_cast<int64_t>(sms), std::max<int64_t>(1, sh.N * sh.G));
  return std::max<int64_t>(1, std::min({want, ceil_div(sh.C / sh.G * sh.S, 4096), int64_t{65535}}));
}

int64_t group_norm_work_floats(const NormShape& sh) { return sh.N * sh.G * (3 * group_norm_splits(sh) + 2); }

cudaError_t group_norm_act(DType dtype, const void* x, NormShape sh, const float* weight, const float* bias,
                           const SpatialArgs* spatial, float eps, bool silu, void* y, float* mean, float* rstd,
                           float* work, cudaStream_t stream) {
  const SpatialArgs sp = spatial ? *spatial : SpatialArgs{};
  const int64_t groups = sh.N * sh.G, total = sh.N * sh.C * sh.S, splits = group_norm_splits(sh);
  if (total == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    stats_kernel<T><<<dim3(static_cast<unsigned>(groups), static_cast<unsigned>(splits)), kThreads, 0, stream>>>(
        static_cast<const T*>(x), sh, work);
    stats_final_kernel<<<static_cast<unsigned>(ceil_div(groups, kThreads)), kThreads, 0, stream>>>(
        work, groups, splits, sh.C / sh.G * sh.S, eps, mean, rstd);
    dispatch_flags(silu, spatial != nullptr, [&](auto silu_tag, auto spatial_tag) {
      apply_kernel<T, decltype(silu_tag)::value, decltype(spatial_tag)::value>
          <<<static_cast<unsigned>(ceil_div(total, kThreads)), kThreads, 0, stream>>>(
              static_cast<const T*>(x), sh, weight, bias, sp, mean, rstd, static_cast<T*>(y), total);
    });
  });
}

cudaError_t group_norm_act_backward(DType dtype, const void* grad, const void* x, NormShape sh, const float* weight,
                                    const float* bias, const SpatialArgs* spatial, const float* mean,
                                    const float* rstd, bool silu, void* grad_x, float* grad_weight, float* grad_bias,
                                    float* work, cudaStream_t stream) {
  const SpatialArgs sp = spatial ? *spatial : SpatialArgs{};
  const int64_t groups = sh.N * sh.G, total = sh.N * sh.C * sh.S, splits = group_norm_splits(sh);
  if (total == 0) return cudaSuccess;
  float* coef = work + 2 * groups * splits;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* g = static_cast<const T*>(grad);
    const T* xp = static_cast<const T*>(x);
    dispatch_flags(silu, spatial != nullptr, [&](auto silu_tag, auto spatial_tag) {
      constexpr bool S = decltype(silu_tag)::value, SP = decltype(spatial_tag)::value;
      backward_stats_kernel<T, S, SP><<<dim3(static_cast<unsigned>(groups), static_cast<unsigned>(splits)), kThreads,
                                        0, stream>>>(g, xp, sh, weight, bias, sp, mean, rstd, work);
      backward_final_kernel<<<static_cast<unsigned>(ceil_div(groups, kThreads)), kThreads, 0, stream>>>(
          work, groups, splits, sh.C / sh.G * sh.S, coef);
      grad_x_kernel<T, S, SP><<<static_cast<unsigned>(ceil_div(total, kThreads)), kThreads, 0, stream>>>(
          g, xp, sh, weight, bias, sp, mean, rstd, coef, static_cast<T*>(grad_x), total);
      channel_grads_kernel<T, S, SP><<<static_cast<unsigned>(sh.C), kThreads, 0, stream>>>(
          g, xp, sh, weight, bias, sp, mean, rstd, grad_weight, grad_bias);
      if (SP && sh.N * sh.C * sp.s > 0) {
        down_sum_kernel<T, S><<<static_cast<unsigned>(ceil_div(sh.N * sh.C * sp.s, kThreads)), kThreads, 0, stream>>>(
            g, xp, sh, weight, bias, sp, mean, rstd);
      }
    });
  });
}

}  // namespace cuda
}  // namespace vqfast
