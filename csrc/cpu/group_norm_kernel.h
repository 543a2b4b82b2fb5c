// GroupNorm + activation kernels on strided views (View): the plain group norm and MoVQ's SpatialNorm.
//
// Layouts: channels-first (runs along s: a group is Cg runs of S elements, one run of Cg * S when its
// channels are adjacent) and channels-last (runs along c); batch, channel and position strides are
// read as given, so sliced and padded tensors need no copy. Statistics are float32 vector sums of (x - K) and
// (x - K)^2, K the group's first element (no cancellation when |mean| >> std), folded into double
// every kBlock elements. Forward: one read for the statistics, one read + write for the output
// (channels-first runs them group by group, so the second read hits L2). Backward: one read of
// (grad, x) for the per-channel sums, one read + write for grad_x.
//
// SPATIAL adds MoVQ's SpatialNorm: pre = (x_hat * w + b) * scale[n, c, src(s)] + shift[n, c, src(s)],
// scale/shift float32 (N, C, s) at the latent's resolution and src the nearest-upsampling map.
#pragma once

#include "common/layout.h"
#include "cpu/vec_utils.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace vqfast {
namespace cpu {
namespace gn {

constexpr int64_t kBlock = 2048;  // elements per lane group summed in float32 before going to double

struct Shape {
  int64_t N, C, S, G;
  int64_t Cg() const { return C / G; }
};

// An operand (N, C, S) read or written in place.
template <typename T>
struct View {
  T* data;
  NormStrides st;
  T* at(int64_t n, int64_t c, int64_t s) const { return data + n * st.n_stride + c * st.c_stride + s * st.s_stride; }
};

struct Spatial {
  const float* scale = nullptr;  // (N, C, s) float32 contiguous
  const float* shift = nullptr;
  const int64_t* src = nullptr;  // S entries in [0, s)
  int64_t s = 0;
  float* grad_scale = nullptr;  // (N, C, s) float32, zeroed, backward only
  float* grad_shift = nullptr;
};

inline float w_at(const float* w, int64_t c) { return w ? w[c] : 1.f; }
inline float b_at(const float* b, int64_t c) { return b ? b[c] : 0.f; }

// sum(x - K) and sum((x - K)^2) over n contiguous elements.
template <typename T>
void moments(const T* p, int64_t n, float K, double& s1, double& s2) {
  const Vec k(K);
  int64_t i = 0;
  while (i + kVec <= n) {
    const int64_t end = std::min(n, i + kBlock) / kVec * kVec;
    Vec a0(0.f), a1(0.f), q0(0.f), q1(0.f);
    for (; i + 2 * kVec <= end; i += 2 * kVec) {
      const Vec v0 = vload(p + i) - k, v1 = vload(p + i + kVec) - k;
      a0 = a0 + v0, a1 = a1 + v1;
      q0 = at::vec::fmadd(v0, v0, q0), q1 = at::vec::fmadd(v1, v1, q1);
    }
    for (; i < end; i += kVec) {
      const Vec v0 = vload(p + i) - k;
      a0 = a0 + v0, q0 = at::vec::fmadd(v0, v0, q0);
    }
    s1 += sum_lanes(a0 + a1), s2 += sum_lanes(q0 + q1);
  }
  for (; i < n; ++i) {
    const double v = static_cast<float>(p[i]) - K;
    s1 += v, s2 += v * v;
  }
}

inline void finish_stats(double s1, double s2, double count, float K, float eps, float& mean, float& rstd) {
  const double m = s1 / count;
  const double var = std::max(s2 / count - m * m, 0.0);
  mean = static_cast<float>(K + m);
  rstd = static_cast<float>(1.0 / std::sqrt(var + eps));
}

template <bool SILU>
inline Vec activate(const Vec& pre) {
  if constexpr (SILU) return silu(pre);
  return pre;
}

template <bool SILU>
inline Vec activate_grad(const Vec& g, const Vec& pre) {
  if constexpr (SILU) return g * silu_grad(pre);
  return g;
}

// The upsampled scale and shift of one (n, c) over S positions, as float rows.
inline void spatial_rows(const Spatial& sp, int64_t nc, int64_t S, float* scale, float* shift) {
  const float* a = sp.scale + nc * sp.s;
  const float* b = sp.shift + nc * sp.s;
  for (int64_t i = 0; i < S; ++i) scale[i] = a[sp.src[i]], shift[i] = b[sp.src[i]];
}

// ---------------------------------------------------------------- channels-first (N, C, S)

template <typename T, bool SILU, bool SPATIAL>
void forward_cf(View<const T> x, View<T> y, Shape sh, const float* w, const float* b, float eps, float* mean,
                float* rstd, const Spatial& sp) {
  const int64_t Cg = sh.Cg(), S = sh.S;
  at::parallel_for(0, sh.N * sh.G, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> sc(SPATIAL ? S + kVec : 0), sf(SPATIAL ? S + kVec : 0);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / sh.G, g = t % sh.G;
      const T* xg = x.at(n, g * Cg, 0);
      T* yg = y.at(n, g * Cg, 0);
      const float K = static_cast<float>(xg[0]);
      double s1 = 0, s2 = 0;
      if (Cg == 1 || x.st.c_stride == S) {
        moments(xg, Cg * S, K, s1, s2);
      } else {
        for (int64_t cl = 0; cl < Cg; ++cl) moments(xg + cl * x.st.c_stride, S, K, s1, s2);
      }
      finish_stats(s1, s2, static_cast<double>(Cg * S), K, eps, mean[t], rstd[t]);
      for (int64_t cl = 0; cl < Cg; ++cl) {
        const int64_t c = g * Cg + cl;
        const Vec va(rstd[t] * w_at(w, c)), vb(b_at(b, c)), vm(mean[t]);
        const T* xc = xg + cl * x.st.c_stride;
        T* yc = yg + cl * y.st.c_stride;
        if constexpr (SPATIAL) spatial_rows(sp, n * sh.C + c, S, sc.data(), sf.data());
        for (int64_t i = 0; i < S; i += kVec) {
          const int64_t m = S - i;
          Vec pre = at::vec::fmadd(vload_n(xc + i, m) - vm, va, vb);
          if constexpr (SPATIAL) pre = at::vec::fmadd(pre, Vec::loadu(sc.data() + i), Vec::loadu(sf.data() + i));
          vstore_n(yc + i, activate<SILU>(pre), m);
        }
      }
    }
  });
}

// grad_weight/grad_bias partial sums per (n, c) go to pw/pb (double, N x C).
template <typename T, bool SILU, bool SPATIAL>
void backward_cf(View<const T> gy, View<const T> x, View<T> gx, Shape sh, const float* w, const float* b,
                 const float* mean, const float* rstd, double* pw, double* pb, const Spatial& sp) {
  const int64_t Cg = sh.Cg(), S = sh.S;
  at::parallel_for(0, sh.N * sh.G, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> sc(SPATIAL ? S + kVec : 0), sf(SPATIAL ? S + kVec : 0);
    std::vector<float> gsc(SPATIAL ? S + kVec : 0), gsf(SPATIAL ? S + kVec : 0);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / sh.G, g = t % sh.G;
      const float r = rstd[t];
      const Vec vr(r), vm(mean[t]);
      double m1 = 0, m2 = 0;  // sum_c w_c sum_s gn, sum_c w_c sum_s gn * x_hat
      // Pass 1: per-channel sums of gn (the gradient at the affine output) and gn * x_hat.
      for (int64_t cl = 0; cl < Cg; ++cl) {
        const int64_t c = g * Cg + cl;
        const Vec vw(w_at(w, c)), vb(b_at(b, c));
        const T* xc = x.at(n, c, 0);
        const T* gc = gy.at(n, c, 0);
        if constexpr (SPATIAL) spatial_rows(sp, n * sh.C + c, S, sc.data(), sf.data());
        double A = 0, B = 0;
        for (int64_t i0 = 0; i0 < S; i0 += kBlock) {
          const int64_t i1 = std::min(S, i0 + kBlock);
          Vec va(0.f), vbb(0.f);
          for (int64_t i = i0; i < i1; i += kVec) {
            const int64_t m = i1 - i;
            const Vec xh = (vload_n(xc + i, m) - vm) * vr;
            const Vec norm = at::vec::fmadd(xh, vw, vb);
            Vec gn;
            if constexpr (SPATIAL) {
              const Vec s = Vec::loadu(sc.data() + i);
              const Vec gp = activate_grad<SILU>(vload_n(gc + i, m), at::vec::fmadd(norm, s, Vec::loadu(sf.data() + i)));
              (gp * norm).store(gsc.data() + i);
              gp.store(gsf.data() + i);
              gn = gp * s;
            } else {
              gn = activate_grad<SILU>(vload_n(gc + i, m), norm);
            }
            if (m < kVec) gn = Vec::set(Vec(0.f), gn, m);  // padding lanes must not count
            va = va + gn;
            vbb = at::vec::fmadd(gn, xh, vbb);
          }
          A += sum_lanes(va), B += sum_lanes(vbb);
        }
        if constexpr (SPATIAL) {
          float* dsc = sp.grad_scale + (n * sh.C + c) * sp.s;
          float* dsf = sp.grad_shift + (n * sh.C + c) * sp.s;
          for (int64_t i = 0; i < S; ++i) dsc[sp.src[i]] += gsc[i], dsf[sp.src[i]] += gsf[i];
        }
        pw[n * sh.C + c] = B;
        pb[n * sh.C + c] = A;
        m1 += w_at(w, c) * A;
        m2 += w_at(w, c) * B;
      }
      const double count = static_cast<double>(Cg * S);
      const Vec c1(static_cast<float>(-m1 / count * r)), c2(static_cast<float>(-m2 / count * r));
      // Pass 2: grad_x = rstd * (w * gn - mean(w gn) - x_hat * mean(w gn x_hat)).
      for (int64_t cl = 0; cl < Cg; ++cl) {
        const int64_t c = g * Cg + cl;
        const Vec vw(w_at(w, c)), vb(b_at(b, c)), vwr(w_at(w, c) * r);
        const T* xc = x.at(n, c, 0);
        const T* gc = gy.at(n, c, 0);
        T* dc = gx.at(n, c, 0);
        if constexpr (SPATIAL) spatial_rows(sp, n * sh.C + c, S, sc.data(), sf.data());
        for (int64_t i = 0; i < S; i += kVec) {
          const int64_t m = S - i;
          const Vec xh = (vload_n(xc + i, m) - vm) * vr;
          const Vec norm = at::vec::fmadd(xh, vw, vb);
          Vec gn;
          if constexpr (SPATIAL) {
            const Vec s = Vec::loadu(sc.data() + i);
            gn = activate_grad<SILU>(vload_n(gc + i, m), at::vec::fmadd(norm, s, Vec::loadu(sf.data() + i))) * s;
          } else {
            gn = activate_grad<SILU>(vload_n(gc + i, m), norm);
          }
          vstore_n(dc + i, at::vec::fmadd(gn, vwr, at::vec::fmadd(xh, c2, c1)), m);
        }
      }
    }
  });
}

// ---------------------------------------------------------------- channels-last (N, S, C)
// Tasks are (n, a run of kPositions positions) with every channel: contiguous streaming. Per-channel
// sums are float32 within a task and combined in double. SpatialNorm's backward scatters into
// grad_scale/grad_shift per channel, so its first pass takes (n, kChunk channels) tasks instead.

constexpr int64_t kPositions = 256;
constexpr int64_t kChunk = 2 * kVec;

// Runs f(n, s_begin, s_end) over every (n, run of positions) task.
template <typename F>
void for_each_run(const Shape& sh, F&& f) {
  const int64_t runs = (sh.S + kPositions - 1) / kPositions;
  at::parallel_for(0, sh.N * runs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / runs, s0 = (t % runs) * kPositions;
      f(n, t % runs, s0, std::min(sh.S, s0 + kPositions));
    }
  });
}

// Per-channel double sums over all positions of two float32 per-run partials (runs x C each).
inline void combine_runs(const Shape& sh, const std::vector<float>& part, int64_t n, double* s1, double* s2) {
  const int64_t runs = (sh.S + kPositions - 1) / kPositions, C = sh.C;
  for (int64_t c = 0; c < C; ++c) s1[c] = 0, s2[c] = 0;
  for (int64_t r = 0; r < runs; ++r) {
    const float* p = part.data() + ((n * runs + r) * 2) * C;
    for (int64_t c = 0; c < C; ++c) s1[c] += p[c], s2[c] += p[C + c];
  }
}

// scale and shift transposed to (N, s, C), channels innermost: the C values a position needs are one
// contiguous row, where the (N, C, s) tensors give them at stride s (a scalar gather per channel that
// cost ten times the norm itself). Latent-sized: built once per call.
struct SpatialRows {
  float* scale = nullptr;
  float* shift = nullptr;
  int64_t C, s;
  SpatialRows(const Spatial& sp, int64_t N, int64_t C_) : C(C_), s(sp.s) {
    if (!sp.scale) return;
    // One buffer per calling thread, kept between calls: a fresh multi-MiB allocation each call costs
    // more in page faults than the whole transposition.
    thread_local std::vector<float> buffer;
    const int64_t size = N * s * C + kVec;
    if (static_cast<int64_t>(buffer.size()) < 2 * size) buffer.resize(2 * size);
    scale = buffer.data(), shift = buffer.data() + size;
    // kTile x kTile blocks through a local tile, so that every cache line is read once and written once
    // whole (strided single-float writes made the power-of-two strides alias in L1: 20 ms for 4M floats).
    constexpr int64_t kTile = 16;
    const int64_t c_tiles = (C + kTile - 1) / kTile;
    at::parallel_for(0, N * c_tiles, 1, [&](int64_t begin, int64_t end) {
      float tile[kTile][kTile];
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / c_tiles, c0 = (t % c_tiles) * kTile, cw = std::min(kTile, C - c0);
        for (int64_t j0 = 0; j0 < s; j0 += kTile) {
          const int64_t jw = std::min(kTile, s - j0);
          for (auto [from, to] : {std::pair{sp.scale, scale}, std::pair{sp.shift, shift}}) {
            for (int64_t c = 0; c < cw; ++c)
              for (int64_t j = 0; j < jw; ++j) tile[j][c] = from[(n * C + c0 + c) * s + j0 + j];
            for (int64_t j = 0; j < jw; ++j) std::copy_n(tile[j], cw, to + (n * s + j0 + j) * C + c0);
          }
        }
      }
    });
  }
  // The upsampled scale (shift) row of all C channels at (n, position p).
  const float* scale_at(const Spatial& sp, int64_t n, int64_t p) const { return scale + (n * s + sp.src[p]) * C; }
  const float* shift_at(const Spatial& sp, int64_t n, int64_t p) const { return shift + (n * s + sp.src[p]) * C; }
};

template <typename T, bool SILU, bool SPATIAL>
void forward_cl(View<const T> x, View<T> y, Shape sh, const float* w, const float* b, float eps, float* mean,
                float* rstd, const Spatial& sp) {
  const int64_t C = sh.C, S = sh.S, Cg = sh.Cg();
  const int64_t runs = (S + kPositions - 1) / kPositions;
  std::vector<float> K(sh.N * C + kVec), part(sh.N * runs * 2 * C + kVec);
  for (int64_t n = 0; n < sh.N; ++n)
    for (int64_t c = 0; c < C; ++c) K[n * C + c] = static_cast<float>(*x.at(n, c / Cg * Cg, 0));
  for_each_run(sh, [&](int64_t n, int64_t r, int64_t s0, int64_t s1) {
    float* p1 = part.data() + ((n * runs + r) * 2) * C;
    float* p2 = p1 + C;
    std::fill(p1, p2 + C, 0.f);
    const float* Kn = K.data() + n * C;
    // Positions outer, channels inner: x streams in memory order, and a channel's running sums come
    // back from L1 only after the other channels' updates, so no add latency chain bounds the loop.
    for (int64_t s = s0; s < s1; ++s) {
      const T* xs = x.at(n, 0, s);
      for (int64_t c = 0; c < C; c += kVec) {
        const int64_t m = C - c;
        const Vec v = vload_n(xs + c, m) - Vec::loadu(Kn + c);
        vstore_n(p1 + c, Vec::loadu(p1 + c) + v, m);
        vstore_n(p2 + c, at::vec::fmadd(v, v, Vec::loadu(p2 + c)), m);
      }
    }
  });
  // Per (n, c): y = act((x - mean) * a + b) (before the spatial scale/shift), a = rstd * w.
  std::vector<float> A(sh.N * C + kVec), Bv(sh.N * C + kVec), M(sh.N * C + kVec);
  std::vector<double> s1(C), s2(C);
  for (int64_t n = 0; n < sh.N; ++n) {
    combine_runs(sh, part, n, s1.data(), s2.data());
    for (int64_t g = 0; g < sh.G; ++g) {
      double t1 = 0, t2 = 0;
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) t1 += s1[c], t2 += s2[c];
      const int64_t t = n * sh.G + g;
      finish_stats(t1, t2, static_cast<double>(Cg * S), K[n * C + g * Cg], eps, mean[t], rstd[t]);
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        A[n * C + c] = rstd[t] * w_at(w, c);
        Bv[n * C + c] = b_at(b, c);
        M[n * C + c] = mean[t];
      }
    }
  }
  const SpatialRows rows(sp, sh.N, C);  // empty without scale/shift
  for_each_run(sh, [&](int64_t n, int64_t, int64_t s0, int64_t s1e) {
    const float* An = A.data() + n * C;
    const float* Bn = Bv.data() + n * C;
    const float* Mn = M.data() + n * C;
    for (int64_t s = s0; s < s1e; ++s) {
      const T* xs = x.at(n, 0, s);
      T* ys = y.at(n, 0, s);
      for (int64_t c = 0; c < C; c += kVec) {
        const int64_t m = C - c;
        Vec pre = at::vec::fmadd(vload_n(xs + c, m) - Vec::loadu(Mn + c), Vec::loadu(An + c), Vec::loadu(Bn + c));
        if constexpr (SPATIAL)
          pre = at::vec::fmadd(pre, Vec::loadu(rows.scale_at(sp, n, s) + c), Vec::loadu(rows.shift_at(sp, n, s) + c));
        vstore_n(ys + c, activate<SILU>(pre), m);
      }
    }
  });
}

template <typename T, bool SILU, bool SPATIAL>
void backward_cl(View<const T> gy, View<const T> x, View<T> gx, Shape sh, const float* w, const float* b,
                 const float* mean, const float* rstd, double* pw, double* pb, const Spatial& sp) {
  const int64_t C = sh.C, S = sh.S, Cg = sh.Cg(), G = sh.G;
  const int64_t runs = (S + kPositions - 1) / kPositions;
  // Per-channel rstd, mean for each n; w, b.
  std::vector<float> R(sh.N * C + kChunk), M(sh.N * C + kChunk), W(C + kChunk), Bb(C + kChunk);
  for (int64_t c = 0; c < C; ++c) W[c] = w_at(w, c), Bb[c] = b_at(b, c);
  for (int64_t n = 0; n < sh.N; ++n)
    for (int64_t c = 0; c < C; ++c) R[n * C + c] = rstd[n * G + c / Cg], M[n * C + c] = mean[n * G + c / Cg];
  // x_hat, the affine output and gp (the gradient at the pre-activation) at (n, s, c + lanes).
  auto grad_at = [&](int64_t n, int64_t s, int64_t c, int64_t width, const float* sc, const float* sf, Vec& xh,
                     Vec& norm, Vec& gp) {
    xh = (vload_n(x.at(n, c, s), width) - Vec::loadu(M.data() + n * C + c)) * Vec::loadu(R.data() + n * C + c);
    norm = at::vec::fmadd(xh, Vec::loadu(W.data() + c), Vec::loadu(Bb.data() + c));
    Vec pre = norm;
    if constexpr (SPATIAL) pre = at::vec::fmadd(norm, Vec::loadu(sc), Vec::loadu(sf));
    gp = activate_grad<SILU>(vload_n(gy.at(n, c, s), width), pre);
    if (width < kVec) gp = Vec::set(Vec(0.f), gp, width);
  };
  if constexpr (!SPATIAL) {
    std::vector<float> part(sh.N * runs * 2 * C);
    for_each_run(sh, [&](int64_t n, int64_t r, int64_t s0, int64_t s1) {
      float* pa = part.data() + ((n * runs + r) * 2) * C;
      float* pbb = pa + C;
      for (int64_t c = 0; c < C; c += kVec) {
        const int64_t m = C - c;
        Vec a(0.f), q(0.f);
        for (int64_t s = s0; s < s1; ++s) {
          Vec xh, norm, gp;
          grad_at(n, s, c, m, nullptr, nullptr, xh, norm, gp);
          a = a + gp, q = at::vec::fmadd(gp, xh, q);
        }
        vstore_n(pa + c, a, m);
        vstore_n(pbb + c, q, m);
      }
    });
    for (int64_t n = 0; n < sh.N; ++n) combine_runs(sh, part, n, pb + n * C, pw + n * C);
  } else {
    // (n, kChunk channels) tasks over all positions: grad_scale/grad_shift rows are task-private.
    const int64_t chunks = (C + kChunk - 1) / kChunk;
    at::parallel_for(0, sh.N * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / chunks, c0 = (t % chunks) * kChunk;
        const int64_t width = std::min(kChunk, C - c0);
        double dA[kChunk] = {}, dB[kChunk] = {};
        for (int64_t s0 = 0; s0 < S; s0 += kBlock) {
          const int64_t s1e = std::min(S, s0 + kBlock);
          float fa[kChunk] = {}, fb[kChunk] = {};
          for (int64_t s = s0; s < s1e; ++s) {
            float sc[kChunk] = {}, sf[kChunk] = {}, g1[kChunk], g2[kChunk], gn[kChunk], xhv[kChunk];
            const int64_t off = (n * C + c0) * sp.s + sp.src[s];
            for (int64_t l = 0; l < width; ++l) sc[l] = sp.scale[off + l * sp.s], sf[l] = sp.shift[off + l * sp.s];
            for (int64_t j = 0; j * kVec < width; ++j) {
              Vec xh, norm, gp;
              grad_at(n, s, c0 + j * kVec, width - j * kVec, sc + j * kVec, sf + j * kVec, xh, norm, gp);
              (gp * norm).store(g1 + j * kVec);
              gp.store(g2 + j * kVec);
              (gp * Vec::loadu(sc + j * kVec)).store(gn + j * kVec);
              xh.store(xhv + j * kVec);
            }
            for (int64_t l = 0; l < width; ++l) {
              sp.grad_scale[off + l * sp.s] += g1[l], sp.grad_shift[off + l * sp.s] += g2[l];
              fa[l] += gn[l], fb[l] += gn[l] * xhv[l];
            }
          }
          for (int64_t l = 0; l < width; ++l) dA[l] += fa[l], dB[l] += fb[l];
        }
        for (int64_t l = 0; l < width; ++l) pb[n * C + c0 + l] = dA[l], pw[n * C + c0 + l] = dB[l];
      }
    });
  }
  // Group coefficients: grad_x = w r gn + c2 x_hat + c1 per (n, group).
  std::vector<float> C1(sh.N * C + kChunk), C2(sh.N * C + kChunk), WR(sh.N * C + kChunk);
  for (int64_t n = 0; n < sh.N; ++n) {
    for (int64_t g = 0; g < G; ++g) {
      double m1 = 0, m2 = 0;
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) m1 += W[c] * pb[n * C + c], m2 += W[c] * pw[n * C + c];
      const double count = static_cast<double>(Cg * S), r = rstd[n * G + g];
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        C1[n * C + c] = static_cast<float>(-m1 / count * r);
        C2[n * C + c] = static_cast<float>(-m2 / count * r);
        WR[n * C + c] = static_cast<float>(W[c] * r);
      }
    }
  }
  const SpatialRows rows(sp, sh.N, C);  // empty without scale/shift
  for_each_run(sh, [&](int64_t n, int64_t, int64_t s0, int64_t s1e) {
    for (int64_t s = s0; s < s1e; ++s) {
      const float* sc = SPATIAL ? rows.scale_at(sp, n, s) : nullptr;
      const float* sf = SPATIAL ? rows.shift_at(sp, n, s) : nullptr;
      T* ds = gx.at(n, 0, s);
      for (int64_t c = 0; c < C; c += kVec) {
        const int64_t m = C - c;
        Vec xh, norm, gp;
        grad_at(n, s, c, m, SPATIAL ? sc + c : nullptr, SPATIAL ? sf + c : nullptr, xh, norm, gp);
        if constexpr (SPATIAL) gp = gp * Vec::loadu(sc + c);
        const int64_t nc = n * C + c;
        const Vec out = at::vec::fmadd(gp, Vec::loadu(WR.data() + nc),
                                       at::vec::fmadd(xh, Vec::loadu(C2.data() + nc), Vec::loadu(C1.data() + nc)));
        vstore_n(ds + c, out, m);
      }
    }
  });
}

}  // namespace gn
}  // namespace cpu
}  // namespace vqfast
