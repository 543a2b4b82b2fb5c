// nearest_code on the CPU: for every row z_n (D elements along `dim`, read in place, NCHW included),
// argmin_k ||c_k||^2 - 2 <z_n, c_k> in float32, first index on ties, NaN counting as the minimum
// (torch.argmin's rule, which the reference follows).
//
// The codebook is packed once into float32 panels of kVec codes, [block][1 + D][lane]: the codes'
// norms, then -2 * c (exact: a power of two), so that a distance is D FMAs started from the norm,
// ||c||^2 + sum_d z_d * (-2 c_d), with no separate scaling step (O(K * D) extra memory, never N x K).
// Rows are taken in blocks of kRowBlock, packed to float32, and swept against code tiles that stay in
// L1: a register-blocked micro-kernel computes MR rows x NRV * kVec codes of distances, their lane-wise
// minimum is compared with the row's best, and only the rare micro-tiles that beat it are scanned in
// order, so ties keep the first index. Up to D = kSortedMaxD the codebook is also sorted along its
// principal axis and each row visits only the tiles whose projections could hold its nearest code
// (search_sorted), with the same distances and the same answer. Rows or codebooks holding non-finite
// or huge (> 2^40) values take a scalar path with the reference's arithmetic and NaN-aware argmin.
#include "cpu/nearest_code.h"
#include "cpu/row_blocks.h"
#include "cpu/vec_utils.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

namespace vqfast {
namespace cpu {
namespace {

// Micro-tiles: MR rows x NRV vectors of codes. Small D favours wide tiles (fewer row-best checks
// per code), large D tall ones (fewer loads per FMA). AVX512 has 32 registers, AVX2 16.
constexpr int kWideMR = kVec >= 16 ? 6 : 3, kWideNRV = kVec >= 16 ? 4 : 2;
constexpr int kTallMR = kVec >= 16 ? 8 : 4, kTallNRV = 2;
constexpr int64_t kCodeAlign = 4 * kVec;  // codebook padding: a multiple of every NRV * kVec
constexpr int64_t kTileFloats = 1 << 12;  // 16 KiB code tiles: half of a 32 KiB L1
constexpr int64_t kSortedMaxD = 8;        // up to this D, search a sorted codebook (search_sorted),
constexpr int64_t kSortedMinRows = 1024;  // given rows enough to repay the sort (~1 ms at K = 16384)
constexpr float kBig = 1099511627776.f;   // 2^40: below it, no distance can overflow or be NaN

struct Codebook {
  int64_t K = 0, Kp = 0, D = 0;
  std::vector<float> panel;  // (Kp / kVec) blocks of (1 + D) x kVec: norms, then -2 * c
  bool finite = true;        // every value finite and below kBig
  // Sorted codebooks (small D) hold their codes in order of projection on `axis`: slot s holds code
  // order[s] (padding slots: K), and micro-tile t (the search's width of slots) spans projections
  // [lo[t], hi[t]].
  std::vector<int64_t> order, slot;
  std::vector<float> axis, lo, hi;
  float max_norm = 0.f;
  int64_t block(int64_t s) const { return (s / kVec) * (D + 1) * kVec + s % kVec; }
  int64_t slot_of(int64_t k) const { return slot.empty() ? k : slot[k]; }
  int64_t code_at(int64_t s) const { return order.empty() ? s : order[s]; }
  float norm(int64_t k) const { return panel[block(slot_of(k))]; }
  float at(int64_t k, int64_t d) const { return -0.5f * panel[block(slot_of(k)) + (d + 1) * kVec]; }
};

// The codebook's principal axis (unit norm): power iteration on the covariance of at most about
// kAxisSample codes. Any unit axis keeps the search exact; a good one only makes it skip more.
constexpr int64_t kAxisSample = 4096;

std::vector<float> principal_axis(const std::vector<float>& v, int64_t K, int64_t D) {
  const int64_t step = std::max<int64_t>(1, K / kAxisSample);
  const double count = static_cast<double>((K + step - 1) / step);
  std::vector<double> mean(D, 0.0), cov(D * D, 0.0), u(D, 1.0 / std::sqrt(static_cast<double>(D)));
  for (int64_t k = 0; k < K; k += step)
    for (int64_t d = 0; d < D; ++d) mean[d] += v[k * D + d] / count;
  for (int64_t k = 0; k < K; k += step)
    for (int64_t a = 0; a < D; ++a)
      for (int64_t b = 0; b < D; ++b) cov[a * D + b] += (v[k * D + a] - mean[a]) * (v[k * D + b] - mean[b]);
  for (int it = 0; it < 64; ++it) {
    std::vector<double> w(D, 0.0);
    double n2 = 0.0;
    for (int64_t a = 0; a < D; ++a) {
      for (int64_t b = 0; b < D; ++b) w[a] += cov[a * D + b] * u[b];
      n2 += w[a] * w[a];
    }
    if (!(n2 > 0.0)) break;  // all codes equal: any axis will do
    for (int64_t a = 0; a < D; ++a) u[a] = w[a] / std::sqrt(n2);
  }
  return std::vector<float>(u.begin(), u.end());
}

// A key whose unsigned order is the float order of f: one integer sort then orders (projection, index).
inline uint32_t ordered_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
}

// Packs the codebook; tile > 0 also sorts it along its principal axis in micro-tiles of `tile` slots.
template <typename T>
Codebook pack_codebook(const at::Tensor& cb, int64_t tile) {
  Codebook p;
  p.K = cb.size(0);
  p.D = cb.size(1);
  p.Kp = (p.K + kCodeAlign - 1) / kCodeAlign * kCodeAlign;
  const int64_t K = p.K, D = p.D;
  std::vector<float> v(K * D);
  const T* src = cb.const_data_ptr<T>();
  const int64_t s0 = cb.stride(0), s1 = cb.stride(1);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t d = 0; d < D; ++d) v[k * D + d] = static_cast<float>(src[k * s0 + d * s1]);
  p.finite = std::all_of(v.begin(), v.end(), [](float x) { return std::abs(x) <= kBig; });
  if (tile > 0 && p.finite && K < (int64_t{1} << 32)) {
    p.axis = principal_axis(v, K, D);
    std::vector<float> proj(K, 0.f);
    std::vector<uint64_t> keys(K);  // (projection, index): sorted, ties keep index order
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t d = 0; d < D; ++d) proj[k] = std::fma(v[k * D + d], p.axis[d], proj[k]);
      keys[k] = (static_cast<uint64_t>(ordered_bits(proj[k])) << 32) | static_cast<uint64_t>(k);
    }
    std::sort(keys.begin(), keys.end());
    p.order.resize(p.Kp, K);
    p.slot.resize(K);
    for (int64_t s = 0; s < K; ++s) {
      p.order[s] = static_cast<int64_t>(keys[s] & 0xffffffffu);
      p.slot[p.order[s]] = s;
    }
    for (int64_t t0 = 0; t0 < K; t0 += tile) {
      p.lo.push_back(proj[p.order[t0]]);
      p.hi.push_back(proj[p.order[std::min(K, t0 + tile) - 1]]);
    }
  }
  p.panel.assign(p.Kp * (D + 1), 0.f);
  std::vector<float> norms(p.Kp, 0.f);
  at::parallel_for(0, p.Kp, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      float* dst = p.panel.data() + p.block(s);
      if (s >= K) {
        dst[0] = std::numeric_limits<float>::infinity();
        continue;
      }
      const float* c = v.data() + p.code_at(s) * D;
      float norm = 0.f;
      for (int64_t d = 0; d < D; ++d) {
        dst[(d + 1) * kVec] = -2.f * c[d];
        norm = std::fma(c[d], c[d], norm);
      }
      dst[0] = norms[s] = norm;
    }
  });
  p.max_norm = *std::max_element(norms.begin(), norms.end());
  return p;
}

// dist[i][j] = norm_j + sum_d zb[i * D + d] * panel_j[d] over the MR rows at zb and the NRV code
// blocks at panel. DC > 0: D known at compile time (small D fully unrolled); DC == 0: D at run time.
template <int MR, int NR, int DC>
inline void micro_kernel(const float* zb, int64_t D_runtime, const float* panel, Vec (&dist)[MR][NR]) {
  const int64_t D = DC > 0 ? DC : D_runtime;
  const int64_t block = (D + 1) * kVec;
  for (int j = 0; j < NR; ++j) dist[0][j] = Vec::loadu(panel + j * block);
  for (int i = 1; i < MR; ++i)
    for (int j = 0; j < NR; ++j) dist[i][j] = dist[0][j];
#pragma GCC unroll 8
  for (int64_t d = 0; d < D; ++d) {
    Vec c[NR];
    for (int j = 0; j < NR; ++j) c[j] = Vec::loadu(panel + j * block + (d + 1) * kVec);
    for (int i = 0; i < MR; ++i) {
      const Vec zi(zb[i * D + d]);
      for (int j = 0; j < NR; ++j) dist[i][j] = at::vec::fmadd(zi, c[j], dist[i][j]);
    }
  }
}

// Scalar path with the reference's arithmetic and torch.argmin's NaN rule, for non-finite rows.
int64_t scan_row(const float* z, const Codebook& cb) {
  float best = std::numeric_limits<float>::infinity();
  int64_t index = 0;
  for (int64_t k = 0; k < cb.K; ++k) {
    float acc = 0.f;
    for (int64_t d = 0; d < cb.D; ++d) acc = std::fma(z[d], cb.at(k, d), acc);
    const float dist = std::fma(acc, -2.f, cb.norm(k));
    if (std::isnan(dist)) return k;
    if (dist < best) best = dist, index = k;
  }
  return index;
}

// Lane-wise minimum of finite vectors (at::vec::minimum also propagates NaN, at three times the cost).
inline Vec min_finite(const Vec& a, const Vec& b) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_min_ps(a, b);
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_min_ps(a, b);
#else
  return at::vec::minimum(a, b);
#endif
}

// True when some lane of v is at most b.
inline bool any_less_equal(const Vec& v, const Vec& b) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_cmp_ps_mask(v, b, _CMP_LE_OQ) != 0;
#else
  return (v <= b).zero_mask() != (1 << kVec) - 1;
#endif
}

// Folds the distances of MR rows to the micro-tile of NRV * kVec codes at slot k into each row's
// (best, index). Only a tile whose lane-wise minimum reaches a row's best is scanned, in slot order;
// an equal distance wins when its code index is lower, so ties go to the first index whatever
// order the tiles are visited in.
template <int MR, int NRV>
inline void update_best(const Vec (&dist)[MR][NRV], int64_t k, const Codebook& cb, float* best, int64_t* index) {
  for (int i = 0; i < MR; ++i) {
    Vec low = dist[i][0];
    for (int j = 1; j < NRV; ++j) low = min_finite(low, dist[i][j]);
    if (!any_less_equal(low, Vec(best[i]))) continue;
    float d[NRV * kVec];
    for (int j = 0; j < NRV; ++j) dist[i][j].store(d + j * kVec);
    for (int64_t l = 0; l < NRV * kVec; ++l) {
      const int64_t code = cb.code_at(k + l);
      if (d[l] < best[i] || (d[l] == best[i] && code < index[i])) best[i] = d[l], index[i] = code;
    }
  }
}

template <typename T, int MR, int NRV, int DC>
void search(const at::Tensor& z, const Rows& rows, const Codebook& cb, int64_t* out) {
  const T* zp = z.const_data_ptr<T>();
  const int64_t N = rows.count(), D = cb.D;
  constexpr int64_t kCodesPerMicro = NRV * kVec;
  constexpr int64_t kRows = kRowBlock / MR * MR;  // rows per block: a multiple of MR
  static_assert(kCodeAlign % kCodesPerMicro == 0, "tile sizes");
  const int64_t n_blocks = (N + kRows - 1) / kRows;
  // Code tiles of about kTileFloats, a multiple of the micro-tile width.
  const int64_t tile =
      std::max<int64_t>(kCodesPerMicro, kTileFloats / (D + 1) / kCodesPerMicro * kCodesPerMicro);
  at::parallel_for(0, n_blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    std::vector<float> zb(kRows * D);
    float best[kRows];
    int64_t index[kRows];
    bool finite[kRows];
    for (int64_t blk = block_begin; blk < block_end; ++blk) {
      const int64_t r0 = blk * kRows;
      const int64_t nr = std::min(kRows, N - r0);
      // Pack the rows to float32 (padding rows are zero), noting which are finite and small.
      std::fill(zb.begin(), zb.end(), 0.f);
      for (int64_t i = 0; i < nr; ++i) {
        const T* src = zp + rows.offset(r0 + i);
        bool ok = true;
        for (int64_t d = 0; d < D; ++d) {
          const float v = static_cast<float>(src[d * rows.d_stride]);
          zb[i * D + d] = v;
          ok &= std::abs(v) <= kBig;
        }
        finite[i] = ok;
      }
      std::fill(best, best + kRows, std::numeric_limits<float>::infinity());
      std::fill(index, index + kRows, 0);
      if (cb.finite) {
        for (int64_t k0 = 0; k0 < cb.Kp; k0 += tile) {
          const int64_t k1 = std::min(cb.Kp, k0 + tile);
          for (int64_t i0 = 0; i0 < nr; i0 += MR) {
            for (int64_t k = k0; k < k1; k += kCodesPerMicro) {
              Vec dist[MR][NRV];
              micro_kernel<MR, NRV, DC>(zb.data() + i0 * D, D, cb.panel.data() + k * (D + 1), dist);
              update_best(dist, k, cb, best + i0, index + i0);
            }
          }
        }
      }
      for (int64_t i = 0; i < nr; ++i) {
        out[r0 + i] = (cb.finite && finite[i]) ? index[i] : scan_row(zb.data() + i * D, cb);
      }
    }
  });
}

// Small D, on a codebook sorted along its principal axis u (pack_codebook with tile = NRV * kVec):
// |z.u - c.u| <= ||z - c||, so a micro-tile whose projections lie farther from a row's than the
// row's best distance cannot hold its nearest code. Rows are sorted by projection within blocks of
// kSortedRows; each group of MR neighbours starts at the tile its projections fall in and walks
// outwards on both sides until every row of the group can stop. Distances are the same float32
// values as the exhaustive search's and ties go to the lowest code index, so the answer is too;
// the stopping test keeps a margin far above float32 rounding.
template <typename T, int MR, int NRV, int DC>
void search_sorted(const at::Tensor& z, const Rows& rows, const Codebook& cb, int64_t* out) {
  constexpr int64_t W = NRV * kVec;
  constexpr int64_t kSortedRows = MR * 64;
  constexpr float kMargin = 1e-5f;  // relative to ||z||^2 + max ||c||^2
  const T* zp = z.const_data_ptr<T>();
  const int64_t N = rows.count(), D = cb.D, n_tiles = static_cast<int64_t>(cb.lo.size());
  TORCH_INTERNAL_ASSERT(n_tiles == (cb.K + W - 1) / W);  // packed in micro-tiles of W slots
  at::parallel_for(0, (N + kSortedRows - 1) / kSortedRows, 1, [&](int64_t block_begin, int64_t block_end) {
    std::vector<float> zb(kSortedRows * D), zs(kSortedRows * D);
    std::vector<float> q(kSortedRows), qs(kSortedRows), bound_base(kSortedRows);
    std::vector<int64_t> perm(kSortedRows);
    std::vector<char> finite(kSortedRows);
    for (int64_t blk = block_begin; blk < block_end; ++blk) {
      const int64_t r0 = blk * kSortedRows;
      const int64_t nr = std::min(kSortedRows, N - r0);
      for (int64_t i = 0; i < nr; ++i) {
        const T* src = zp + rows.offset(r0 + i);
        bool ok = true;
        double proj = 0.0;
        for (int64_t d = 0; d < D; ++d) {
          const float v = static_cast<float>(src[d * rows.d_stride]);
          zb[i * D + d] = v;
          ok &= std::abs(v) <= kBig;
          proj += v * static_cast<double>(cb.axis[d]);
        }
        finite[i] = ok;
        q[i] = ok ? static_cast<float>(proj) : 0.f;  // non-finite rows: searched as zeros, rescanned below
      }
      std::iota(perm.begin(), perm.begin() + nr, int64_t{0});
      std::sort(perm.begin(), perm.begin() + nr, [&](int64_t a, int64_t b) { return q[a] < q[b]; });
      // Sorted rows; the last group is padded with copies of the last row.
      const int64_t padded = (nr + MR - 1) / MR * MR;
      for (int64_t j = 0; j < padded; ++j) {
        const int64_t i = perm[std::min(j, nr - 1)];
        float zz = 0.f;
        for (int64_t d = 0; d < D; ++d) {
          const float v = finite[i] ? zb[i * D + d] : 0.f;
          zs[j * D + d] = v;
          zz = std::fma(v, v, zz);
        }
        qs[j] = q[i];
        // A row may stop at a tile whose gap^2 exceeds best + bound_base (best excludes ||z||^2).
        bound_base[j] = zz + kMargin * (zz + cb.max_norm);
      }
      for (int64_t j0 = 0; j0 < padded; j0 += MR) {
        float best[MR];
        int64_t index[MR];
        std::fill(best, best + MR, std::numeric_limits<float>::infinity());
        std::fill(index, index + MR, std::numeric_limits<int64_t>::max());
        auto visit = [&](int64_t t) {
          Vec dist[MR][NRV];
          micro_kernel<MR, NRV, DC>(zs.data() + j0 * D, D, cb.panel.data() + t * W * (D + 1), dist);
          update_best(dist, t * W, cb, best, index);
        };
        // Every row of the group is done with the tiles beyond t (on the side gap() measures).
        auto done = [&](auto gap) {
          for (int i = 0; i < MR; ++i) {
            const float g = gap(qs[j0 + i]);
            if (!(g > 0.f && g * g > best[i] + bound_base[j0 + i])) return false;
          }
          return true;
        };
        const float q_mid = qs[j0 + MR / 2];
        int64_t right = std::lower_bound(cb.hi.begin(), cb.hi.end(), q_mid) - cb.hi.begin();
        right = std::min(right, n_tiles - 1);
        int64_t left = right - 1;
        visit(right++);
        while (right < n_tiles || left >= 0) {
          if (right < n_tiles) {
            if (done([&](float qi) { return cb.lo[right] - qi; })) {
              right = n_tiles;
            } else {
              visit(right++);
            }
          }
          if (left >= 0) {
            if (done([&](float qi) { return qi - cb.hi[left]; })) {
              left = -1;
            } else {
              visit(left--);
            }
          }
        }
        for (int64_t j = j0; j < std::min(j0 + MR, nr); ++j) {
          const int64_t i = perm[j];
          out[r0 + i] = finite[i] ? index[j - j0] : scan_row(zb.data() + i * D, cb);
        }
      }
    }
  });
}

}  // namespace

at::Tensor nearest_code(const at::Tensor& z, const at::Tensor& codebook, int64_t dim) {
  TORCH_CHECK(z.device().is_cpu() && codebook.device().is_cpu(), "nearest_code: CPU tensors expected");
  TORCH_CHECK(codebook.dim() == 2 && codebook.size(0) > 0, "nearest_code: codebook must be (K, D) with K > 0");
  TORCH_CHECK(z.scalar_type() == codebook.scalar_type(), "nearest_code: z and codebook dtypes differ");
  TORCH_CHECK(0 <= dim && dim < z.dim(), "nearest_code: dim must be in [0, z.dim())");
  TORCH_CHECK(z.size(dim) == codebook.size(1), "nearest_code: z's size along dim differs from codebook's D");
  std::vector<int64_t> shape;
  for (int64_t i = 0; i < z.dim(); ++i)
    if (i != dim) shape.push_back(z.size(i));
  at::Tensor out = at::empty(shape, z.options().dtype(at::kLong));
  if (out.numel() == 0) return out;
  if (codebook.size(1) == 0) return out.zero_();
  const Rows rows = rows_in_place(z, dim, "nearest_code");
  dispatch_float(z.scalar_type(), "nearest_code", [&](auto tag) {
    using scalar_t = decltype(tag);
    int64_t* o = out.data_ptr<int64_t>();
    const int64_t D = codebook.size(1);
    const bool sorted = D <= kSortedMaxD && rows.count() >= kSortedMinRows;
    const Codebook cb = pack_codebook<scalar_t>(codebook, sorted ? kWideNRV * kVec : 0);
    if (!cb.order.empty()) {
      if (D == 4) {  // VQ-GAN / MoVQ latents
        search_sorted<scalar_t, kWideMR, kWideNRV, 4>(z, rows, cb, o);
      } else {
        search_sorted<scalar_t, kWideMR, kWideNRV, 0>(z, rows, cb, o);
      }
    } else if (cb.D <= 32) {
      search<scalar_t, kWideMR, kWideNRV, 0>(z, rows, cb, o);
    } else {
      search<scalar_t, kTallMR, kTallNRV, 0>(z, rows, cb, o);
    }
  });
  return out;
}

}  // namespace cpu
}  // namespace vqfast

TORCH_LIBRARY_IMPL(vqfast_C, CPU, m) { m.impl("nearest_code", &vqfast::cpu::nearest_code); }
