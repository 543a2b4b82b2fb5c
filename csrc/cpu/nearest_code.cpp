// nearest_code on the CPU: for every row z_n (D elements along `dim`, read in place, NCHW included),
// argmin_k ||c_k||^2 - 2 <z_n, c_k> in float32, first index on ties, NaN counting as the minimum
// (torch.argmin's rule, which the reference follows).
//
// The codebook is packed once into float32 panels of kVec codes ([block][d][lane]) with its norms
// (O(K * D) extra memory, never N x K). Rows are taken in blocks of kRowBlock, packed to float32,
// and swept against code tiles that stay in L2: a register-blocked micro-kernel computes MR rows x
// NRV * kVec codes of dot products (at::vec FMAs, exact float32 accumulation in d order), then
// d = ||c||^2 - 2 * dot and a vector compare against the row's best; only the rare lanes that beat
// it are scanned in order, so ties keep the first index. Rows or codebooks holding non-finite or
// huge (> 2^40) values take a scalar path with the same arithmetic and NaN-aware argmin.
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
constexpr int kWideMR = 4, kWideNRV = kVec >= 16 ? 4 : 2;
constexpr int kTallMR = kVec >= 16 ? 8 : 4, kTallNRV = 2;
constexpr int64_t kCodeAlign = 4 * kVec;  // codebook padding: a multiple of every NRV * kVec
constexpr int64_t kTileFloats = 1 << 13;
constexpr float kBig = 1099511627776.f;  // 2^40: below it, no distance can overflow or be NaN

struct Codebook {
  int64_t K = 0, Kp = 0, D = 0;
  std::vector<float> panel;  // (Kp / kVec) blocks of D x kVec
  std::vector<float> norm;   // Kp; +inf for padding codes
  bool finite = true;        // every value finite and below kBig
  float at(int64_t k, int64_t d) const { return panel[((k / kVec) * D + d) * kVec + k % kVec]; }
};

template <typename T>
Codebook pack_codebook(const at::Tensor& cb) {
  Codebook p;
  p.K = cb.size(0);
  p.D = cb.size(1);
  p.Kp = (p.K + kCodeAlign - 1) / kCodeAlign * kCodeAlign;
  p.panel.assign(p.Kp * p.D, 0.f);
  p.norm.assign(p.Kp, std::numeric_limits<float>::infinity());
  const T* src = cb.const_data_ptr<T>();
  const int64_t s0 = cb.stride(0), s1 = cb.stride(1), D = p.D;
  std::vector<char> ok(p.K, 1);
  at::parallel_for(0, p.K, 256, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      float norm = 0.f;
      for (int64_t d = 0; d < D; ++d) {
        const float v = static_cast<float>(src[k * s0 + d * s1]);
        p.panel[((k / kVec) * D + d) * kVec + k % kVec] = v;
        norm = std::fma(v, v, norm);
        if (!(std::abs(v) <= kBig)) ok[k] = 0;
      }
      p.norm[k] = norm;
    }
  });
  p.finite = std::all_of(ok.begin(), ok.end(), [](char c) { return c != 0; });
  return p;
}

// acc[i][j] = sum_d zb[i * D + d] * panel_j[d] over the MR rows at zb and NRV code blocks at panel.
// DC > 0: D known at compile time (small D fully unrolled); DC == 0: D at run time.
template <int MR, int NR, int DC>
inline void micro_kernel(const float* zb, int64_t D_runtime, const float* panel, Vec (&acc)[MR][NR]) {
  const int64_t D = DC > 0 ? DC : D_runtime;
  const int64_t block = D * kVec;
  for (int i = 0; i < MR; ++i) {
    const Vec zi(zb[i * D]);
    for (int j = 0; j < NR; ++j) acc[i][j] = zi * Vec::loadu(panel + j * block);  // = fma(z, c, 0)
  }
#pragma GCC unroll 8
  for (int64_t d = 1; d < D; ++d) {
    Vec c[NR];
    for (int j = 0; j < NR; ++j) c[j] = Vec::loadu(panel + j * block + d * kVec);
    for (int i = 0; i < MR; ++i) {
      const Vec zi(zb[i * D + d]);
      for (int j = 0; j < NR; ++j) acc[i][j] = at::vec::fmadd(zi, c[j], acc[i][j]);
    }
  }
}

// Scalar path with the kernel's arithmetic and torch.argmin's NaN rule, for non-finite rows.
int64_t scan_row(const float* z, const Codebook& cb) {
  float best = std::numeric_limits<float>::infinity();
  int64_t index = 0;
  for (int64_t k = 0; k < cb.K; ++k) {
    float acc = 0.f;
    for (int64_t d = 0; d < cb.D; ++d) acc = std::fma(z[d], cb.at(k, d), acc);
    const float dist = std::fma(acc, -2.f, cb.norm[k]);
    if (std::isnan(dist)) return k;
    if (dist < best) best = dist, index = k;
  }
  return index;
}

// True when some lane of a or b is below the row's best b.
inline bool any_less(const Vec& a, const Vec& b, const Vec& best) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_cmp_ps_mask(_mm512_min_ps(a, b), best, _CMP_LT_OQ) != 0;
#else
  return ((a < best) | (b < best)).zero_mask() != (1 << kVec) - 1;
#endif
}

template <typename T, int MR, int NRV, int DC>
void search(const at::Tensor& z, const Rows& rows, const Codebook& cb, int64_t* out) {
  const T* zp = z.const_data_ptr<T>();
  const int64_t N = rows.count(), D = cb.D;
  const int64_t n_blocks = (N + kRowBlock - 1) / kRowBlock;
  constexpr int64_t kCodesPerMicro = NRV * kVec;
  static_assert(kRowBlock % MR == 0 && kCodeAlign % kCodesPerMicro == 0, "tile sizes");
  // Code tiles of about 32 KiB (L1), a multiple of the micro-tile width.
  const int64_t tile = std::max<int64_t>(kCodesPerMicro, kTileFloats / D / kCodesPerMicro * kCodesPerMicro);
  at::parallel_for(0, n_blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    std::vector<float> zb(kRowBlock * D);
    float best[kRowBlock];
    int64_t index[kRowBlock];
    bool finite[kRowBlock];
    for (int64_t blk = block_begin; blk < block_end; ++blk) {
      const int64_t r0 = blk * kRowBlock;
      const int64_t nr = std::min(kRowBlock, N - r0);
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
        best[i] = std::numeric_limits<float>::infinity();
        index[i] = 0;
      }
      for (int64_t i = nr; i < kRowBlock; ++i) best[i] = std::numeric_limits<float>::infinity();
      if (cb.finite) {
        for (int64_t k0 = 0; k0 < cb.Kp; k0 += tile) {
          const int64_t k1 = std::min(cb.Kp, k0 + tile);
          for (int64_t i0 = 0; i0 < nr; i0 += MR) {
            for (int64_t k = k0; k < k1; k += kCodesPerMicro) {
              Vec acc[MR][NRV];
              micro_kernel<MR, NRV, DC>(zb.data() + i0 * D, D, cb.panel.data() + k * D, acc);
              Vec norm[NRV];
              for (int j = 0; j < NRV; ++j) norm[j] = Vec::loadu(cb.norm.data() + k + j * kVec);
              for (int i = 0; i < MR; ++i) {
                const Vec b(best[i0 + i]);
                Vec dist[NRV];
                for (int j = 0; j < NRV; ++j) dist[j] = at::vec::fmadd(acc[i][j], Vec(-2.f), norm[j]);
                bool less = false;
                for (int j = 0; j < NRV; j += 2) less |= any_less(dist[j], dist[j + 1], b);
                if (!less) continue;
                // Some lane beats the row's best: scan this micro-tile's codes in order.
                float d[kCodesPerMicro];
                for (int j = 0; j < NRV; ++j) dist[j].store(d + j * kVec);
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
