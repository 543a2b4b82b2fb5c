// group_norm_act on CUDA: act(group_norm(x) * weight + bias) with float32 statistics, forward and
// backward, every operand read or written in place at its own (n, c, s) strides, channels-first or
// channels-last; with scale/shift (SPATIAL, SpatialArgs in group_norm_act.h) MoVQ's SpatialNorm, which
// multiplies the affine output by scale and adds shift.
// Both passes reduce per (n, c) first (reduce_kernel, NormGrid): a block sums one channel's positions
// (channels first) or 32 channels' (channels last, a channel per lane), so that loads coalesce in either
// layout; positions split over blocks where (n, c) alone would leave SMs idle. Partial results merge in
// a fixed order (splits, then a group's channels or a channel's samples), so results are deterministic.
// The forward keeps Welford states (Chan merges, so a large mean does not cancel); the backward sums
// g_pre * x_hat and g_pre per (n, c), which give both each channel's grad_weight / grad_bias (over n)
// and each group's coefficients (over the group's channels, times weight), in one pass over x and grad.
// Elementwise passes recompute x_hat from the statistics, a thread taking 16 bytes of each operand where
// the inner dimension is contiguous and aligned (else one element), with 32-bit indices where they fit.
// No __launch_bounds__: with it ptxas held the float32 SiLU reductions to 32 registers and spilled around
// the division's slow-path call.
#include "cuda/group_norm_act.h"

#include "cuda/common.cuh"

#include <algorithm>

namespace vqfast {
namespace cuda {
namespace {

// An element (n, c, s) of x and its operands, and its offset in one of them.
template <typename Index>
struct Elem {
  Index n, c, s;
  __device__ __forceinline__ Index in(const NormStrides& t) const {
    return n * static_cast<Index>(t.n_stride) + c * static_cast<Index>(t.c_stride) +
           s * static_cast<Index>(t.s_stride);
  }
};

// Element e of the whole tensor, in the visiting order.
template <typename Index>
__device__ __forceinline__ Elem<Index> elem(const NormShape& sh, Index e) {
  const Index C = static_cast<Index>(sh.C), S = static_cast<Index>(sh.S);
  const Index n = e / (S * C), r = e - n * (S * C);
  return sh.channels_last ? Elem<Index>{n, r % C, r / C} : Elem<Index>{n, r / S, r % S};
}

// An element and its group (n * G + g), stepped to the next element of a vector (the next channel when
// channels last, else the next position) without division.
template <typename Index>
struct Cursor {
  Elem<Index> el;
  Index ng;  // n * G + el.c / Cg
  Index cg;  // el.c % Cg
  Index Cg;  // channels per group
  __device__ __forceinline__ Cursor(const NormShape& sh, Elem<Index> e) : el(e), Cg(static_cast<Index>(sh.C / sh.G)) {
    const Index g = e.c / Cg;
    ng = e.n * static_cast<Index>(sh.G) + g;
    cg = e.c - g * Cg;
  }
  __device__ __forceinline__ void next(bool channels_last) {
    if (!channels_last) {
      ++el.s;
      return;
    }
    ++el.c;
    if (++cg == Cg) cg = 0, ++ng;
  }
};

// Index in scale / shift (N, C, s) that element el reads.
template <typename Index>
__device__ __forceinline__ Index small_index(const NormShape& sh, const SpatialArgs& sp, const Elem<Index>& el) {
  return (el.n * static_cast<Index>(sh.C) + el.c) * static_cast<Index>(sp.s) + static_cast<Index>(sp.source[el.s]);
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

// The backward's per-(n, c) sums: gx = sum g_pre * x_hat, g = sum g_pre.
struct Sums {
  float gx, g;
  __device__ void merge(const Sums& o) { gx += o.gx, g += o.g; }
};

struct Merge {
  template <typename Acc>
  __device__ __forceinline__ Acc operator()(Acc a, const Acc& b) const {
    a.merge(b);
    return a;
  }
};

__device__ __forceinline__ float silu(float y) { return y / (1.f + expf(-y)); }
__device__ __forceinline__ float silu_grad(float y) {
  const float s = 1.f / (1.f + expf(-y));
  return s * (1.f + y * (1.f - s));
}

// What the backward recomputes at an element: x_hat, the affine output (norm), the gradient at the input
// of the activation (g_act), at the output of the affine map (g_pre) and at x_hat (g_hat).
struct Grads {
  float xh, norm, g_act, g_pre, g_hat;
};

// What the backward reads once per channel: its group's statistics and its affine map.
struct ChannelTerms {
  float mean, rstd, w, b;
};

template <typename Index>
__device__ __forceinline__ ChannelTerms channel_terms(const GroupNormBwdParams& p, Index ng, Index c) {
  return {p.mean[ng], p.rstd[ng], p.weight ? p.weight[c] : 1.f, p.bias ? p.bias[c] : 0.f};
}

// The backward's recomputation at element el from its x and gradient values.
template <bool SILU, bool SPATIAL, typename Index>
__device__ __forceinline__ Grads grads_at(const GroupNormBwdParams& p, const ChannelTerms& t, const Elem<Index>& el,
                                          float x, float grad) {
  Grads r;
  r.xh = (x - t.mean) * t.rstd;
  r.norm = r.xh * t.w + t.b;
  float scale = 1.f, pre = r.norm;
  if (SPATIAL) {
    const Index j = small_index(p.shape, p.spatial, el);
    scale = p.spatial.scale[j];
    pre = r.norm * scale + p.spatial.shift[j];
  }
  r.g_act = SILU ? grad * silu_grad(pre) : grad;
  r.g_pre = SPATIAL ? r.g_act * scale : r.g_act;
  r.g_hat = r.g_pre * t.w;
  return r;
}

// ------------------------------------------------------------------------------------ reductions

// The forward's per-(n, c) reduction: Welford over x.
template <typename T>
struct XStats {
  using Acc = Welford;
  GroupNormFwdParams p;
  template <typename Index>
  __device__ __forceinline__ Acc reduce(Index n, Index c, Index s, Index end, Index step) const {
    Welford w{0.f, 0.f, 0.f};
    const T* x = static_cast<const T*>(p.x);
    for (; s < end; s += step) w.add(to_float(x[Elem<Index>{n, c, s}.in(p.x_strides)]));
    return w;
  }
};

// The backward's per-(n, c) reduction: Sums of g_pre * x_hat and g_pre.
template <typename T, bool SILU, bool SPATIAL>
struct GradSums {
  using Acc = Sums;
  GroupNormBwdParams p;
  template <typename Index>
  __device__ __forceinline__ Acc reduce(Index n, Index c, Index s, Index end, Index step) const {
    Sums sums{0.f, 0.f};
    const Index ng = n * static_cast<Index>(p.shape.G) + c / static_cast<Index>(p.shape.C / p.shape.G);
    const ChannelTerms t = channel_terms(p, ng, c);
    const T* x = static_cast<const T*>(p.x);
    const T* grad = static_cast<const T*>(p.grad);
    for (; s < end; s += step) {
      const Elem<Index> el{n, c, s};
      const Grads r = grads_at<SILU, SPATIAL>(p, t, el, to_float(x[el.in(p.x_strides)]),
                                              to_float(grad[el.in(p.grad_strides)]));
      sums.gx = fmaf(r.g_pre, r.xh, sums.gx), sums.g += r.g_pre;
    }
    return sums;
  }
};

// Block (n * channel tiles + tile, split): `pass` over the split's chunk of positions of each channel of
// the tile -> part[split * N * C + n * C + c] (split-major, so that lanes' stores and merge_splits' loads
// coalesce). Channels first: the block's threads walk one channel's positions, then block_reduce.
// Channels last: lane l takes channel tile * 32 + l and each warp a row of positions (8 rows), so that a
// warp reads 32 adjacent channels; the warps then fold lane by lane.
template <typename Index, typename Pass>
__global__ void reduce_kernel(const Pass pass, const NormGrid grid, typename Pass::Acc* __restrict__ part) {
  using Acc = typename Pass::Acc;
  __shared__ Acc shared[kThreads];
  const NormShape& sh = pass.p.shape;
  const Index C = static_cast<Index>(sh.C), tile = static_cast<Index>(grid.tile), tiles = (C + tile - 1) / tile;
  const Index n = static_cast<Index>(blockIdx.x) / tiles;
  const Index c = (static_cast<Index>(blockIdx.x) - n * tiles) * tile + static_cast<Index>(threadIdx.x) % tile;
  const Index rows = kThreads / tile, begin = static_cast<Index>(blockIdx.y) * static_cast<Index>(grid.chunk);
  const Index end = min(static_cast<Index>(sh.S), begin + static_cast<Index>(grid.chunk));
  Acc acc{};
  if (c < C) acc = pass.reduce(n, c, begin + static_cast<Index>(threadIdx.x) / tile, end, rows);
  const bool lanes = sh.channels_last;
  acc = lanes ? fold_warps(acc, shared, Merge{}) : block_reduce(acc, shared, Merge{});
  if (threadIdx.x < (lanes ? kWarpSize : 1) && c < C) {
    part[static_cast<int64_t>(blockIdx.y) * sh.N * sh.C + static_cast<int64_t>(n) * sh.C + c] = acc;
  }
}

// One thread per (n, c): its splits' partial results merged in order.
template <typename Acc>
__global__ void merge_splits_kernel(const Acc* __restrict__ part, int64_t nc, int64_t splits, Acc* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= nc) return;
  Acc acc = part[i];
  for (int64_t k = 1; k < splits; ++k) acc.merge(part[k * nc + i]);
  out[i] = acc;
}

// One thread per (n, g): the group's channels' Welford states merged in order -> mean, rstd.
__global__ void stats_final_kernel(const Welford* __restrict__ nc, int64_t groups, int64_t Cg, int64_t M, float eps,
                                   float* __restrict__ mean, float* __restrict__ rstd) {
  const int64_t ng = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (ng >= groups) return;
  Welford w = nc[ng * Cg];
  for (int64_t c = 1; c < Cg; ++c) w.merge(nc[ng * Cg + c]);
  mean[ng] = w.mean;
  rstd[ng] = 1.f / sqrtf(w.m2 / static_cast<float>(M) + eps);
}

// Threads [0, N * G): coef[ng] = (mean(g_hat), mean(g_hat * x_hat)) over the group, from its channels'
// sums times their weights (g_hat = g_pre * weight), in channel order. Threads [N * G, N * G + C):
// grad_weight[c] = sum g_pre * x_hat, grad_bias[c] = sum g_pre over the samples, in order.
__global__ void backward_final_kernel(const GroupNormBwdParams p, const Sums* __restrict__ nc,
                                      float2* __restrict__ coef) {
  const NormShape& sh = p.shape;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x, groups = sh.N * sh.G;
  if (i < groups) {
    const int64_t Cg = sh.C / sh.G, c0 = i % sh.G * Cg;
    float g_hat = 0.f, g_hat_xh = 0.f;
    for (int64_t c = c0; c < c0 + Cg; ++c) {
      const float w = p.weight ? p.weight[c] : 1.f;
      const Sums s = nc[i / sh.G * sh.C + c];
      g_hat = fmaf(w, s.g, g_hat), g_hat_xh = fmaf(w, s.gx, g_hat_xh);
    }
    const float M = static_cast<float>(Cg * sh.S);
    coef[i] = float2{g_hat / M, g_hat_xh / M};
  } else if (i < groups + sh.C) {
    const int64_t c = i - groups;
    Sums s{0.f, 0.f};
    for (int64_t n = 0; n < sh.N; ++n) s.merge(nc[n * sh.C + c]);
    p.grad_weight[c] = s.gx;
    p.grad_bias[c] = s.g;
  }
}

// One thread per (n, c, j): grad_scale = sum g_act * norm, grad_shift = sum g_act over the positions p
// with source[p] == j, in order of p.
template <typename T, bool SILU, typename Index>
__global__ void down_sum_kernel(const GroupNormBwdParams p) {
  const SpatialArgs& sp = p.spatial;
  const Index C = static_cast<Index>(p.shape.C), s = static_cast<Index>(sp.s);
  const Index i = static_cast<Index>(blockIdx.x) * kThreads + static_cast<Index>(threadIdx.x);
  if (i >= static_cast<Index>(p.shape.N) * C * s) return;
  const Index j = i % s, nc = i / s, n = nc / C, c = nc - n * C;
  const Index G = static_cast<Index>(p.shape.G);
  const ChannelTerms t = channel_terms(p, n * G + c / (C / G), c);
  const T* x = static_cast<const T*>(p.x);
  const T* grad = static_cast<const T*>(p.grad);
  float gs = 0.f, gt = 0.f;
  for (int64_t q = sp.start[j]; q < sp.start[j + 1]; ++q) {
    const Elem<Index> el{n, c, static_cast<Index>(sp.order[q])};
    const Grads r =
        grads_at<SILU, true>(p, t, el, to_float(x[el.in(p.x_strides)]), to_float(grad[el.in(p.grad_strides)]));
    gs = fmaf(r.g_act, r.norm, gs), gt += r.g_act;
  }
  sp.grad_scale[i] = gs;
  sp.grad_shift[i] = gt;
}

// ---------------------------------------------------------------------------------- elementwise

// One thread per VEC elements (VEC > 1: one 16-byte access per operand, as group_norm_vector_width
// allows): y = act((x - mean) * rstd * weight + bias [* scale + shift]).
template <typename T, int VEC, typename Index, bool SILU, bool SPATIAL>
__global__ void apply_kernel(const GroupNormFwdParams p, Index vectors) {
  const Index vec = static_cast<Index>(blockIdx.x) * kThreads + static_cast<Index>(threadIdx.x);
  if (vec >= vectors) return;
  Cursor<Index> at(p.shape, elem(p.shape, vec * VEC));
  const Vec<T, VEC> x = load_vec<VEC>(static_cast<const T*>(p.x) + at.el.in(p.x_strides));
  T* y = static_cast<T*>(p.y) + at.el.in(p.y_strides);
  Vec<T, VEC> out;
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    float v = (to_float(x.v[i]) - p.mean[at.ng]) * p.rstd[at.ng];
    if (p.weight) v *= p.weight[at.el.c];
    if (p.bias) v += p.bias[at.el.c];
    if (SPATIAL) {
      const Index j = small_index(p.shape, p.spatial, at.el);
      v = v * p.spatial.scale[j] + p.spatial.shift[j];
    }
    out.v[i] = from_float<T>(SILU ? silu(v) : v);
    at.next(p.shape.channels_last);
  }
  store_vec(y, out);
}

// grad_x = rstd * (g_hat - mean(g_hat) - x_hat * mean(g_hat * x_hat)), VEC elements per thread as apply.
template <typename T, int VEC, typename Index, bool SILU, bool SPATIAL>
__global__ void grad_x_kernel(const GroupNormBwdParams p, const float2* __restrict__ coef, Index vectors) {
  const Index vec = static_cast<Index>(blockIdx.x) * kThreads + static_cast<Index>(threadIdx.x);
  if (vec >= vectors) return;
  Cursor<Index> at(p.shape, elem(p.shape, vec * VEC));
  const Vec<T, VEC> x = load_vec<VEC>(static_cast<const T*>(p.x) + at.el.in(p.x_strides));
  const Vec<T, VEC> grad = load_vec<VEC>(static_cast<const T*>(p.grad) + at.el.in(p.grad_strides));
  T* grad_x = static_cast<T*>(p.grad_x) + at.el.in(p.grad_x_strides);
  Vec<T, VEC> out;
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    const ChannelTerms t = channel_terms(p, at.ng, at.el.c);
    const Grads r = grads_at<SILU, SPATIAL>(p, t, at.el, to_float(x.v[i]), to_float(grad.v[i]));
    const float2 k = coef[at.ng];
    out.v[i] = from_float<T>(t.rstd * (r.g_hat - k.x - r.xh * k.y));
    at.next(p.shape.channels_last);
  }
  store_vec(grad_x, out);
}

// ------------------------------------------------------------------------------------- launches

// The largest element index or offset of a launch over sh's operands (the last block's overhang of up to
// kThreads vectors included).
int64_t largest_index(const NormShape& sh, const NormOperand* operands, int count) {
  int64_t largest = sh.N * sh.C * sh.S + kThreads * 16;
  for (int i = 0; i < count; ++i) {
    const NormStrides& t = operands[i].strides;
    largest = std::max(largest, (sh.N - 1) * t.n_stride + (sh.C - 1) * t.c_stride + (sh.S - 1) * t.s_stride);
  }
  return largest;
}

// The per-(n, c) reduction of `pass` into part, its splits merged into nc (part itself when one split).
template <typename Index, typename Pass>
void reduce_channels(const Pass& pass, const NormGrid& grid, typename Pass::Acc* part, typename Pass::Acc* nc,
                     cudaStream_t stream) {
  const NormShape& sh = pass.p.shape;
  const dim3 blocks(static_cast<unsigned>(sh.N * ceil_div(sh.C, grid.tile)), static_cast<unsigned>(grid.splits));
  launch(reduce_kernel<Index, Pass>, blocks, kThreads, 0, stream, pass, grid, part);
  if (grid.splits > 1) {
    launch(merge_splits_kernel<typename Pass::Acc>, static_cast<unsigned>(ceil_div(sh.N * sh.C, kThreads)), kThreads, 0,
           stream, part, sh.N * sh.C, grid.splits, nc);
  }
}

// The scratch of a pass: part (N * C * splits accumulators), then nc (N * C) when there are splits, then,
// for the backward, coef (N * G float2).
template <typename Acc>
Acc* merged(Acc* part, const NormShape& sh, const NormGrid& grid) {
  return grid.splits > 1 ? part + sh.N * sh.C * grid.splits : part;
}

}  // namespace

int group_norm_vector_width(DType dtype, const NormShape& sh, const NormOperand* operands, int count) {
  const int vec = 16 / element_bytes(dtype);
  if ((sh.channels_last ? sh.C : sh.S) % vec != 0) return 1;
  for (int i = 0; i < count; ++i) {  // the inner stride is 1 by the kernel family
    const NormStrides& t = operands[i].strides;
    const int64_t outer = sh.channels_last ? t.s_stride : t.c_stride;
    if (!aligned16(operands[i].data) || t.n_stride % vec != 0 || outer % vec != 0) return 1;
  }
  return vec;
}

NormGrid group_norm_grid(const NormShape& sh) {
  int device = 0, sms = 1;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  NormGrid g{};
  g.tile = sh.channels_last ? kWarpSize : 1;
  const int64_t rows = kThreads / g.tile, blocks = sh.N * ceil_div(sh.C, g.tile);
  // About four blocks per SM, each block reading at least 4096 elements (16 per thread).
  const int64_t want = ceil_div(4 * static_cast<int64_t>(sms), std::max<int64_t>(1, blocks));
  const int64_t splits = std::max<int64_t>(1, std::min({want, ceil_div(sh.S * g.tile, 4096), int64_t{65535}}));
  g.chunk = ceil_div(ceil_div(sh.S, splits), rows) * rows;
  g.splits = ceil_div(sh.S, g.chunk);
  return g;
}

int64_t group_norm_work_floats(const NormShape& sh, bool backward) {
  const NormGrid g = group_norm_grid(sh);
  const int64_t accumulators = sh.N * sh.C * (g.splits > 1 ? g.splits + 1 : 1);
  return backward ? 2 * accumulators + 2 * sh.N * sh.G : 3 * accumulators;
}

cudaError_t group_norm_act(const GroupNormFwdParams& p, cudaStream_t stream) {
  const NormShape& sh = p.shape;
  const int64_t total = sh.N * sh.C * sh.S;
  if (total == 0) return cudaSuccess;
  const NormGrid grid = group_norm_grid(sh);
  Welford* part = reinterpret_cast<Welford*>(p.work);
  const NormOperand operands[] = {{p.x, p.x_strides}, {p.y, p.y_strides}};
  const int width = group_norm_vector_width(p.dtype, sh, operands, 2);
  return dispatch(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    with_index(largest_index(sh, operands, 2), [&](auto index_tag) {
      using Index = decltype(index_tag);
      reduce_channels<Index>(XStats<T>{p}, grid, part, merged(part, sh, grid), stream);
      launch(stats_final_kernel, static_cast<unsigned>(ceil_div(sh.N * sh.G, kThreads)), kThreads, 0, stream,
             merged(part, sh, grid), sh.N * sh.G, sh.C / sh.G, sh.C / sh.G * sh.S, p.eps, p.mean, p.rstd);
      with_vec<T>(width == kVec<T>, [&](auto vec_tag) {
        constexpr int VEC = decltype(vec_tag)::value;
        with_flags(p.silu, p.spatial.scale != nullptr, [&](auto silu_tag, auto spatial_tag) {
          launch(apply_kernel<T, VEC, Index, decltype(silu_tag)::value, decltype(spatial_tag)::value>,
                 static_cast<unsigned>(ceil_div(total / VEC, kThreads)), kThreads, 0, stream, p,
                 static_cast<Index>(total / VEC));
        });
      });
    });
  });
}

cudaError_t group_norm_act_backward(const GroupNormBwdParams& p, cudaStream_t stream) {
  const NormShape& sh = p.shape;
  const SpatialArgs& sp = p.spatial;
  const int64_t total = sh.N * sh.C * sh.S;
  if (total == 0) return cudaSuccess;
  const NormGrid grid = group_norm_grid(sh);
  Sums* part = reinterpret_cast<Sums*>(p.work);
  Sums* nc = merged(part, sh, grid);
  float2* coef = reinterpret_cast<float2*>(part + sh.N * sh.C * (grid.splits > 1 ? grid.splits + 1 : 1));
  const NormOperand operands[] = {{p.grad, p.grad_strides}, {p.x, p.x_strides}, {p.grad_x, p.grad_x_strides}};
  const int width = group_norm_vector_width(p.dtype, sh, operands, 3);
  return dispatch(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    with_index(largest_index(sh, operands, 3), [&](auto index_tag) {
      using Index = decltype(index_tag);
      with_flags(p.silu, sp.scale != nullptr, [&](auto silu_tag, auto spatial_tag) {
        constexpr bool SILU = decltype(silu_tag)::value, SPATIAL = decltype(spatial_tag)::value;
        reduce_channels<Index>(GradSums<T, SILU, SPATIAL>{p}, grid, part, nc, stream);
        launch(backward_final_kernel, static_cast<unsigned>(ceil_div(sh.N * sh.G + sh.C, kThreads)), kThreads, 0,
               stream, p, nc, coef);
        with_vec<T>(width == kVec<T>, [&](auto vec_tag) {
          constexpr int VEC = decltype(vec_tag)::value;
          launch(grad_x_kernel<T, VEC, Index, SILU, SPATIAL>, static_cast<unsigned>(ceil_div(total / VEC, kThreads)),
                 kThreads, 0, stream, p, coef, static_cast<Index>(total / VEC));
        });
        if (SPATIAL && sh.N * sh.C * sp.s > 0) {
          launch(down_sum_kernel<T, SILU, Index>, static_cast<unsigned>(ceil_div(sh.N * sh.C * sp.s, kThreads)),
                 kThreads, 0, stream, p);
        }
      });
    });
  });
}

}  // namespace cuda
}  // namespace vqfast
