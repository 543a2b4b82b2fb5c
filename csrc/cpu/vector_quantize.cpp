// vector_quantize on the CPU: diffusers' VectorQuantizer.forward as search (nearest_code.cpp) plus one
// pass that gathers q, writes the straight-through value z + (q - z) rounded to z's dtype after each
// operation as torch does (so it equals diffusers' value bit for bit), and sums (q - z)^2 in float32 per
// row, the rows' sums added in double in a fixed order. Backward: grad_z in one pass; the codebook
// gradient by scatter_rows (deterministic whatever the thread count).
//
// vector_quantize_stats: the same pass also counts the rows of each code and sums them in float32. The
// rows fall into parts of whole row blocks, fixed by N and K (never by the thread count); a thread takes
// a part, sums its rows per code in row order into accumulators of the part's own, and the parts are
// added in part order: the same bits on every run, whatever the thread count.
//
// Rows are read and written in place (NCHW, channels_last or strided) in blocks (row_blocks.h).
#include "cpu/nearest_code.h"
#include "cpu/row_blocks.h"
#include "cpu/scatter_rows.h"
#include "cpu/vec_utils.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

namespace vqfast {
namespace cpu {
namespace {

// Per-code statistics of one forward pass: float32 counts (K) and sums (K x D), contiguous.
struct CodeStats {
  float* counts;
  float* sums;
};

// Parts of the statistics: at least 4 K rows each, so that zeroing and adding a part's K x (D + 1)
// accumulators costs at most about a quarter of its rows' work, and at most kStatsMaxParts.
constexpr int64_t kStatsMaxParts = 64;
int64_t stats_parts(int64_t blocks, int64_t K) {
  const int64_t blocks_per_part = ceil_div(std::max<int64_t>(4 * K, kRowBlock), kRowBlock);
  return std::max<int64_t>(1, std::min(kStatsMaxParts, blocks / blocks_per_part));
}

// The forward pass over z's rows; with `stats`, also the rows' counts and sums per code.
template <typename T>
double forward_kernel(const at::Tensor& z, const Rows& zr, const at::Tensor& codebook, const int64_t* idx,
                      T* out, const Rows& outr, const CodeStats* stats) {
  const T* zp = z.const_data_ptr<T>();
  const T* cb = codebook.const_data_ptr<T>();
  const int64_t N = zr.count(), K = codebook.size(0), D = codebook.size(1);
  const int64_t cs0 = codebook.stride(0), cs1 = codebook.stride(1);
  const int64_t blocks = ceil_div(N, kRowBlock);
  std::vector<double> block_sum(blocks);
  // Block blk of n rows from r0; kStats: its rows also added to `sums` and `counts`, in row order.
  auto quantize = [&](auto with_stats, int64_t blk, int64_t r0, int64_t n, float* sums, int64_t* counts) {
    constexpr bool kStats = decltype(with_stats)::value;
    int64_t zo[kRowBlock], oo[kRowBlock], co[kRowBlock], so[kRowBlock];
    float sum[kRowBlock] = {};
    offsets(zr, r0, n, zo);
    offsets(outr, r0, n, oo);
    for (int64_t i = 0; i < n; ++i) co[i] = idx[r0 + i] * cs0;
    if constexpr (kStats) {
      for (int64_t i = 0; i < n; ++i) {
        so[i] = idx[r0 + i] * D;
        ++counts[idx[r0 + i]];
      }
    }
    for (int64_t d = 0; d < D; ++d) {
      for (int64_t i = 0; i < n; ++i) {
        const float zv = static_cast<float>(zp[zo[i] + d * zr.d_stride]);
        const float qv = static_cast<float>(cb[co[i] + d * cs1]);
        const float diff = qv - zv;
        out[oo[i] + d * outr.d_stride] = static_cast<T>(zv + static_cast<float>(static_cast<T>(diff)));
        sum[i] += diff * diff;
        if constexpr (kStats) sums[so[i] + d] += zv;
      }
    }
    double s = 0;
    for (int64_t i = 0; i < n; ++i) s += sum[i];
    block_sum[blk] = s;
  };
  if (stats == nullptr) {
    for_row_blocks(N, [&](int64_t blk, int64_t r0, int64_t n) {
      quantize(std::false_type{}, blk, r0, n, nullptr, nullptr);
    });
  } else {
    // Part 0 sums into the output, the others into scratch added to it in part order.
    const int64_t parts = stats_parts(blocks, K);
    std::vector<float> part_sums((parts - 1) * K * D, 0.f);
    std::vector<int64_t> part_counts(parts * K, 0);
    at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
      for (int64_t part = begin; part < end; ++part) {
        float* sums = part == 0 ? stats->sums : part_sums.data() + (part - 1) * K * D;
        int64_t* counts = part_counts.data() + part * K;
        for (int64_t blk = part * blocks / parts; blk < (part + 1) * blocks / parts; ++blk) {
          const int64_t r0 = blk * kRowBlock;
          quantize(std::true_type{}, blk, r0, std::min(kRowBlock, N - r0), sums, counts);
        }
      }
    });
    at::parallel_for(0, K, 64, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        int64_t count = part_counts[k];
        for (int64_t part = 1; part < parts; ++part) {
          count += part_counts[part * K + k];
          const float* add = part_sums.data() + (part - 1) * K * D + k * D;
          for (int64_t d = 0; d < D; ++d) stats->sums[k * D + d] += add[d];
        }
        stats->counts[k] = static_cast<float>(count);
      }
    });
  }
  double total = 0;
  for (double s : block_sum) total += s;
  return total;
}

// z_q, loss and indices; with `stats`, also the counts and sums it points to (zeroed (K), (K, D) float32).
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize(const at::Tensor& z, const at::Tensor& codebook, double w_z,
                                                        double w_q, int64_t dim, const CodeStats* stats) {
  at::Tensor indices = nearest_code(z, codebook, dim).reshape(-1);  // checks devices, dtypes, sizes, dim
  at::Tensor z_q = at::empty_like(z);
  const Rows zr = rows_in_place(z, dim, "vector_quantize");
  const Rows qr = rows_in_place(z_q, dim, "vector_quantize");
  float loss = std::numeric_limits<float>::quiet_NaN();  // the mean of nothing, as torch.mean
  dispatch_float(z.scalar_type(), "vector_quantize", [&](auto tag) {
    using scalar_t = decltype(tag);
    const double total = forward_kernel<scalar_t>(z, zr, codebook, indices.const_data_ptr<int64_t>(),
                                                  z_q.mutable_data_ptr<scalar_t>(), qr, stats);
    if (z.numel() > 0) {
      const float mse = static_cast<float>(total / static_cast<double>(z.numel()));
      loss = static_cast<float>(w_z) * mse + static_cast<float>(w_q) * mse;
    }
  });
  return {z_q, at::full({}, loss, z.options()), indices};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> vector_quantize(const at::Tensor& z, const at::Tensor& codebook,
                                                               double w_z, double w_q, int64_t dim) {
  return quantize(z, codebook, w_z, w_q, dim, nullptr);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> vector_quantize_stats(
    const at::Tensor& z, const at::Tensor& codebook, double w_z, double w_q, int64_t dim) {
  TORCH_CHECK(codebook.dim() == 2, "vector_quantize_stats: codebook must be (K, D)");
  const auto options = codebook.options().dtype(at::kFloat);
  at::Tensor counts = at::zeros({codebook.size(0)}, options);
  at::Tensor sums = at::zeros({codebook.size(0), codebook.size(1)}, options);
  const CodeStats stats{counts.mutable_data_ptr<float>(), sums.mutable_data_ptr<float>()};
  auto [z_q, loss, indices] = quantize(z, codebook, w_z, w_q, dim, &stats);
  return {z_q, loss, indices, counts, sums};
}

template <typename T>
void backward_kernel(const at::Tensor& grad, const Rows& gr, const at::Tensor& z, const Rows& zr,
                     const at::Tensor& codebook, const int64_t* idx, float scale, float w_z, float w_q,
                     T* grad_z, const Rows& gzr, T* grad_cb) {
  const T* gp = grad.const_data_ptr<T>();
  const T* zp = z.const_data_ptr<T>();
  const T* cb = codebook.const_data_ptr<T>();
  const int64_t N = zr.count(), K = codebook.size(0), D = codebook.size(1);
  const int64_t cs0 = codebook.stride(0), cs1 = codebook.stride(1);
  // grad_z = grad_z_q + w_z * (z - q) * 2 grad_loss / numel, rounded as the reference.
  for_row_blocks(N, [&](int64_t, int64_t r0, int64_t n) {
    int64_t go[kRowBlock], zo[kRowBlock], oo[kRowBlock], co[kRowBlock];
    offsets(gr, r0, n, go);
    offsets(zr, r0, n, zo);
    offsets(gzr, r0, n, oo);
    for (int64_t i = 0; i < n; ++i) co[i] = idx[r0 + i] * cs0;
    for (int64_t d = 0; d < D; ++d) {
      for (int64_t i = 0; i < n; ++i) {
        const float diff = (static_cast<float>(zp[zo[i] + d * zr.d_stride]) -
                            static_cast<float>(cb[co[i] + d * cs1])) * scale;
        const float g = static_cast<float>(gp[go[i] + d * gr.d_stride]);
        grad_z[oo[i] + d * gzr.d_stride] = static_cast<T>(g + w_z * diff);
      }
    }
  });
  // grad_codebook[k] = sum over the rows quantized to k of -w_q * (z - q) * scale.
  scatter_rows([idx](int64_t r) { return idx[r]; }, N, K, D, grad_cb, [&](int64_t r, int64_t k, float* acc) {
    const T* zrow = zp + zr.offset(r);
    for (int64_t d = 0; d < D; ++d) {
      const float diff =
          (static_cast<float>(zrow[d * zr.d_stride]) - static_cast<float>(cb[k * cs0 + d * cs1])) * scale;
      acc[d] += -w_q * diff;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> vector_quantize_backward(const at::Tensor& grad_z_q, const at::Tensor& grad_loss,
                                                            const at::Tensor& z, const at::Tensor& codebook,
                                                            const at::Tensor& indices, double w_z, double w_q,
                                                            int64_t dim) {
  TORCH_CHECK(z.device().is_cpu() && codebook.device().is_cpu() && grad_z_q.device().is_cpu(),
              "vector_quantize_backward: CPU tensors expected");
  TORCH_CHECK(grad_z_q.sizes() == z.sizes() && grad_z_q.scalar_type() == z.scalar_type() &&
                  codebook.scalar_type() == z.scalar_type(),
              "vector_quantize_backward: grad_z_q, z and codebook must share shape / dtype");
  TORCH_CHECK(0 <= dim && dim < z.dim() && codebook.dim() == 2 && z.size(dim) == codebook.size(1),
              "vector_quantize_backward: bad dim or codebook");
  TORCH_CHECK(indices.scalar_type() == at::kLong && indices.is_contiguous() &&
                  indices.numel() * z.size(dim) == z.numel(),
              "vector_quantize_backward: indices must be int64, contiguous, one per row of z");
  at::Tensor grad_z = at::empty_like(z);
  at::Tensor grad_cb = at::empty(codebook.sizes(), codebook.options());
  const Rows zr = rows_in_place(z, dim, "vector_quantize_backward");
  const Rows gr = rows_in_place(grad_z_q, dim, "vector_quantize_backward");
  const Rows gzr = rows_in_place(grad_z, dim, "vector_quantize_backward");
  // 2 * grad_loss / numel in float32, as the reference.
  const float scale = 2.f * grad_loss.item<float>() / static_cast<float>(z.numel());
  dispatch_float(z.scalar_type(), "vector_quantize_backward", [&](auto tag) {
    using scalar_t = decltype(tag);
    backward_kernel<scalar_t>(grad_z_q, gr, z, zr, codebook, indices.const_data_ptr<int64_t>(), scale,
                              static_cast<float>(w_z), static_cast<float>(w_q), grad_z.mutable_data_ptr<scalar_t>(),
                              gzr, grad_cb.mutable_data_ptr<scalar_t>());
  });
  return {grad_z, grad_cb};
}

}  // namespace
}  // namespace cpu
}  // namespace vqfast

TORCH_LIBRARY_IMPL(vqfast_C, CPU, m) {
  m.impl("vector_quantize", &vqfast::cpu::vector_quantize);
  m.impl("vector_quantize_stats", &vqfast::cpu::vector_quantize_stats);
  m.impl("vector_quantize_backward", &vqfast::cpu::vector_quantize_backward);
}
