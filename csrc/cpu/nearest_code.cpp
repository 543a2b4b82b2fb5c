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
// order, so ties keep the first index. Rows or codebooks holding non-finite or huge (> 2^40) values
// take a scalar path with the reference's arithmetic and NaN-aware argmin.
#include "cpu/kernels.h"
#include "cpu/rows.h"
#include "cpu/vec_utils.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
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
constexpr float kBig = 1099511627776.f;   // 2^40: below it, no distance can overflow or be NaN

struct Codebook {
  int64_t K = 0, Kp = 0, D = 0;
  std::vector<float> panel;  // (Kp / kVec) blocks of (1 + D) x kVec: norms, then -2 * c
  bool finite = true;        // every value finite and below kBig
  int64_t block(int64_t k) const { return (k / kVec) * (D + 1) * kVec + k % kVec; }
  float norm(int64_t k) const { return panel[block(k)]; }
  float at(int64_t k, int64_t d) const { return -0.5f * panel[block(k) + (d + 1) * kVec]; }
};

template <typename T>
Codebook pack_codebook(const at::Tensor& cb) {
  Codebook p;
  p.K = cb.size(0);
  p.D = cb.size(1);
  p.Kp = (p.K + kCodeAlign - 1) / kCodeAlign * kCodeAlign;
  p.panel.assign(p.Kp * (p.D + 1), 0.f);
  for (int64_t k = p.K; k < p.Kp; ++k) p.panel[p.block(k)] = std::numeric_limits<float>::infinity();
  const T* src = cb.const_data_ptr<T>();
  const int64_t s0 = cb.stride(0), s1 = cb.stride(1), D = p.D;
  std::vector<char> ok(p.K, 1);
  at::parallel_for(0, p.K, 256, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      float norm = 0.f;
      float* dst = p.panel.data() + p.block(k);
      for (int64_t d = 0; d < D; ++d) {
        const float v = static_cast<float>(src[k * s0 + d * s1]);
        dst[(d + 1) * kVec] = -2.f * v;
        norm = std::fma(v, v, norm);
        if (!(std::abs(v) <= kBig)) ok[k] = 0;
      }
      dst[0] = norm;
    }
  });
  p.finite = std::all_of(ok.begin(), ok.end(), [](char c) { return c != 0; });
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

// True when some lane of v is below b.
inline bool any_less(const Vec& v, const Vec& b) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_cmp_ps_mask(v, b, _CMP_LT_OQ) != 0;
#else
  return (v < b).zero_mask() != (1 << kVec) - 1;
#endif
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
              for (int i = 0; i < MR; ++i) {
                Vec low = dist[i][0];
                for (int j = 1; j < NRV; ++j) low = min_finite(low, dist[i][j]);
                if (!any_less(low, Vec(best[i0 + i]))) continue;
                // Some lane beats the row's best: scan this micro-tile's codes in order.
                float d[kCodesPerMicro];
                for (int j = 0; j < NRV; ++j) dist[i][j].store(d + j * kVec);
                float& bi = best[i0 + i];
                for (int64_t l = 0; l < kCodesPerMicro; ++l) {
                  if (d[l] < bi) bi = d[l], index[i0 + i] = k + l;
                }
              }
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

}  // namespace

at::Tensor nearest_code(const at::Tensor& z_in, const at::Tensor& codebook, int64_t dim) {
  TORCH_CHECK(z_in.device().is_cpu() && codebook.device().is_cpu(), "nearest_code: CPU tensors expected");
  TORCH_CHECK(codebook.dim() == 2 && codebook.size(0) > 0, "nearest_code: codebook must be (K, D) with K > 0");
  TORCH_CHECK(z_in.scalar_type() == codebook.scalar_type(), "nearest_code: z and codebook dtypes differ");
  dim = c10::maybe_wrap_dim(dim, z_in.dim());
  TORCH_CHECK(z_in.size(dim) == codebook.size(1), "nearest_code: z's size along dim differs from codebook's D");
  std::vector<int64_t> shape;
  for (int64_t i = 0; i < z_in.dim(); ++i)
    if (i != dim) shape.push_back(z_in.size(i));
  at::Tensor out = at::empty(shape, z_in.options().dtype(at::kLong));
  if (out.numel() == 0) return out;
  if (codebook.size(1) == 0) return out.zero_();
  Rows rows;
  const at::Tensor z = as_rows(z_in, dim, rows);
  dispatch_float(z.scalar_type(), "nearest_code", [&](auto tag) {
    using scalar_t = decltype(tag);
    const Codebook cb = pack_codebook<scalar_t>(codebook);
    int64_t* o = out.data_ptr<int64_t>();
    if (cb.D == 4) {  // VQ-GAN / MoVQ latents
      search<scalar_t, kWideMR, kWideNRV, 4>(z, rows, cb, o);
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
