// group_norm_act on CUDA: act(group_norm(x) * weight + bias) with float32 statistics, forward and
// backward, every operand read or written in place at its own (n, c, s) strides, channels-first or
// channels-last; with scale/shift (SPATIAL, SpatialArgs in group_norm_act.h) MoVQ's SpatialNorm, which
// multiplies the affine output by scale and adds shift.
// Reductions over a group run in `splits` blocks per group (grid.y), each block combining its threads
// in a fixed tree (Welford / Chan for the forward's mean and variance, so a large mean does not
// cancel), the splits then combined in order: the result is deterministic. Elementwise passes
// recompute x_hat from the statistics.
#include "cuda/group_norm_act.h"

#include "cuda/common.cuh"

#include <algorithm>

namespace vqfast {
namespace cuda {
namespace {

__device__ __forceinline__ int64_t group_size(const NormShape& sh) { return sh.C / sh.G * sh.S; }

// An element of x and its operands, and its offset in one of them.
struct Elem {
  int64_t n, c, s;
  __device__ __forceinline__ int64_t in(const NormStrides& t) const {
    return n * t.n_stride + c * t.c_stride + s * t.s_stride;
  }
};

// Element i (< Cg * S) of group g of sample n, in the visiting order.
__device__ __forceinline__ Elem group_elem(const NormShape& sh, int64_t n, int64_t g, int64_t i) {
  const int64_t Cg = sh.C / sh.G;
  return sh.channels_last ? Elem{n, g * Cg + i % Cg, i / Cg} : Elem{n, g * Cg + i / sh.S, i % sh.S};
}

// Element e of the whole tensor, in the visiting order.
__device__ __forceinline__ Elem elem(const NormShape& sh, int64_t e) {
  const int64_t n = e / (sh.S * sh.C), r = e % (sh.S * sh.C);
  return sh.channels_last ? Elem{n, r % sh.C, r / sh.C} : Elem{n, r / sh.S, r % sh.S};
}

// Index in scale / shift (N, C, s) that element el reads.
__device__ __forceinline__ int64_t small_index(const NormShape& sh, const SpatialArgs& sp, const Elem& el) {
  return (el.n * sh.C + el.c) * sp.s + sp.source[el.s];
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
__global__ void stats_kernel(const GroupNormFwdParams p) {
  __shared__ Welford shared[kThreads];
  const NormShape& sh = p.shape;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const int64_t ng = blockIdx.x, n = ng / sh.G, g = ng % sh.G;
  int64_t begin, end;
  split_range(group_size(sh), begin, end);
  Welford w{0.f, 0.f, 0.f};
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    w.add(to_float(x[group_elem(sh, n, g, i).in(p.x_strides)]));
  }
  w = block_reduce(w, shared, [](Welford a, const Welford& b) { a.merge(b); return a; });
  if (threadIdx.x == 0) {
    float* part = p.work + (ng * gridDim.y + blockIdx.y) * 3;
    part[0] = w.count, part[1] = w.mean, part[2] = w.m2;
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
__global__ void apply_kernel(const GroupNormFwdParams p, int64_t total) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= total) return;
  const NormShape& sh = p.shape;
  const Elem el = elem(sh, e);
  const int64_t ng = el.n * sh.G + el.c / (sh.C / sh.G);
  float v = (to_float(static_cast<const T*>(p.x)[el.in(p.x_strides)]) - p.mean[ng]) * p.rstd[ng];
  if (p.weight) v *= p.weight[el.c];
  if (p.bias) v += p.bias[el.c];
  if (SPATIAL) {
    const int64_t j = small_index(sh, p.spatial, el);
    v = v * p.spatial.scale[j] + p.spatial.shift[j];
  }
  static_cast<T*>(p.y)[el.in(p.y_strides)] = from_float<T>(SILU ? silu(v) : v);
}

// What the backward passes recompute at an element: x_hat, the affine output (norm), the gradient at
// the input of the activation (g_act), at the output of the affine map (g_pre) and at x_hat (g_hat).
struct Grads {
  float xh, norm, g_act, g_pre, g_hat;
};

template <typename T, bool SILU, bool SPATIAL>
__device__ __forceinline__ Grads grads_at(const GroupNormBwdParams& p, const Elem& el) {
  const int64_t ng = el.n * p.shape.G + el.c / (p.shape.C / p.shape.G);
  Grads r;
  r.xh = (to_float(static_cast<const T*>(p.x)[el.in(p.x_strides)]) - p.mean[ng]) * p.rstd[ng];
  const float w = p.weight ? p.weight[el.c] : 1.f;
  r.norm = r.xh * w + (p.bias ? p.bias[el.c] : 0.f);
  float scale = 1.f, pre = r.norm;
  if (SPATIAL) {
    const int64_t j = small_index(p.shape, p.spatial, el);
    scale = p.spatial.scale[j];
    pre = r.norm * scale + p.spatial.shift[j];
  }
  r.g_act = to_float(static_cast<const T*>(p.grad)[el.in(p.grad_strides)]);
  if (SILU) r.g_act *= silu_grad(pre);
  r.g_pre = SPATIAL ? r.g_act * scale : r.g_act;
  r.g_hat = r.g_pre * w;
  return r;
}

template <typename T, bool SILU, bool SPATIAL>
__global__ void backward_stats_kernel(const GroupNormBwdParams p) {
  __shared__ float2 shared[kThreads];
  const int64_t ng = blockIdx.x, n = ng / p.shape.G, g = ng % p.shape.G;
  int64_t begin, end;
  split_range(group_size(p.shape), begin, end);
  float2 s = {0.f, 0.f};
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const Grads r = grads_at<T, SILU, SPATIAL>(p, group_elem(p.shape, n, g, i));
    s.x += r.g_hat, s.y = fmaf(r.g_hat, r.xh, s.y);
  }
  s = block_reduce(s, shared, [](float2 a, const float2& b) { return float2{a.x + b.x, a.y + b.y}; });
  if (threadIdx.x == 0) reinterpret_cast<float2*>(p.work)[ng * gridDim.y + blockIdx.y] = s;
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
__global__ void grad_x_kernel(const GroupNormBwdParams p, const float* __restrict__ coef, int64_t total) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= total) return;
  const Elem el = elem(p.shape, e);
  const int64_t ng = el.n * p.shape.G + el.c / (p.shape.C / p.shape.G);
  const Grads r = grads_at<T, SILU, SPATIAL>(p, el);
  static_cast<T*>(p.grad_x)[el.in(p.grad_x_strides)] =
      from_float<T>(p.rstd[ng] * (r.g_hat - coef[2 * ng] - r.xh * coef[2 * ng + 1]));
}

// One block per channel: grad_weight[c] = sum g_pre * x_hat, grad_bias[c] = sum g_pre over (n, s).
template <typename T, bool SILU, bool SPATIAL>
__global__ void channel_grads_kernel(const GroupNormBwdParams p) {
  __shared__ float2 shared[kThreads];
  const int64_t c = blockIdx.x, S = p.shape.S;
  float2 s = {0.f, 0.f};
  for (int64_t j = threadIdx.x; j < p.shape.N * S; j += kThreads) {
    const Grads r = grads_at<T, SILU, SPATIAL>(p, Elem{j / S, c, j % S});
    s.x = fmaf(r.g_pre, r.xh, s.x), s.y += r.g_pre;
  }
  s = block_reduce(s, shared, [](float2 a, const float2& b) { return float2{a.x + b.x, a.y + b.y}; });
  if (threadIdx.x == 0) p.grad_weight[c] = s.x, p.grad_bias[c] = s.y;
}

// One thread per (n, c, j): grad_scale = sum g_act * norm, grad_shift = sum g_act over the positions p
// with source[p] == j, in order of p.
template <typename T, bool SILU>
__global__ void down_sum_kernel(const GroupNormBwdParams p) {
  const SpatialArgs& sp = p.spatial;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.shape.N * p.shape.C * sp.s) return;
  const int64_t j = i % sp.s, c = (i / sp.s) % p.shape.C, n = i / (sp.s * p.shape.C);
  float gs = 0.f, gt = 0.f;
  for (int64_t q = sp.start[j]; q < sp.start[j + 1]; ++q) {
    const Grads r = grads_at<T, SILU, true>(p, Elem{n, c, sp.order[q]});
    gs = fmaf(r.g_act, r.norm, gs), gt += r.g_act;
  }
  sp.grad_scale[i] = gs;
  sp.grad_shift[i] = gt;
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

cudaError_t group_norm_act(const GroupNormFwdParams& p, cudaStream_t stream) {
  const NormShape& sh = p.shape;
  const int64_t groups = sh.N * sh.G, total = sh.N * sh.C * sh.S, splits = group_norm_splits(sh);
  if (total == 0) return cudaSuccess;
  return dispatch(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    launch(stats_kernel<T>, dim3(static_cast<unsigned>(groups), static_cast<unsigned>(splits)), kThreads, 0, stream, p);
    launch(stats_final_kernel, static_cast<unsigned>(ceil_div(groups, kThreads)), kThreads, 0, stream, p.work, groups,
           splits, sh.C / sh.G * sh.S, p.eps, p.mean, p.rstd);
    with_flags(p.silu, p.spatial.scale != nullptr, [&](auto silu_tag, auto spatial_tag) {
      launch(apply_kernel<T, decltype(silu_tag)::value, decltype(spatial_tag)::value>,
             static_cast<unsigned>(ceil_div(total, kThreads)), kThreads, 0, stream, p, total);
    });
  });
}

cudaError_t group_norm_act_backward(const GroupNormBwdParams& p, cudaStream_t stream) {
  const NormShape& sh = p.shape;
  const SpatialArgs& sp = p.spatial;
  const int64_t groups = sh.N * sh.G, total = sh.N * sh.C * sh.S, splits = group_norm_splits(sh);
  if (total == 0) return cudaSuccess;
  float* coef = p.work + 2 * groups * splits;
  return dispatch(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    with_flags(p.silu, sp.scale != nullptr, [&](auto silu_tag, auto spatial_tag) {
      constexpr bool S = decltype(silu_tag)::value, SP = decltype(spatial_tag)::value;
      launch(backward_stats_kernel<T, S, SP>, dim3(static_cast<unsigned>(groups), static_cast<unsigned>(splits)),
             kThreads, 0, stream, p);
      launch(backward_final_kernel, static_cast<unsigned>(ceil_div(groups, kThreads)), kThreads, 0, stream, p.work,
             groups, splits, sh.C / sh.G * sh.S, coef);
      launch(grad_x_kernel<T, S, SP>, static_cast<unsigned>(ceil_div(total, kThreads)), kThreads, 0, stream, p, coef,
             total);
      launch(channel_grads_kernel<T, S, SP>, static_cast<unsigned>(sh.C), kThreads, 0, stream, p);
      if (SP && sh.N * sh.C * sp.s > 0) {
        launch(down_sum_kernel<T, S>, static_cast<unsigned>(ceil_div(sh.N * sh.C * sp.s, kThreads)), kThreads, 0,
               stream, p);
      }
    });
  });
}

}  // namespace cuda
}  // namespace vqfast
