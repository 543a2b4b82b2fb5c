// A tensor seen as rows of D elements along `dim`, the other dimensions collapsed into at most two
// (outer, inner) without copying: row r = b * inner + p starts at b * outer_stride + p * inner_stride
// and its elements are d_stride apart. NCHW latents with dim=1 are (N, H*W) rows, D = C apart.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>

#include <utility>
#include <vector>

namespace vqfast {

struct Rows {
  int64_t outer = 1, inner = 1;              // rows = outer * inner
  int64_t outer_stride = 0, inner_stride = 0;
  int64_t d_stride = 1;
  int64_t count() const { return outer * inner; }
  int64_t offset(int64_t r) const { return (r / inner) * outer_stride + (r % inner) * inner_stride; }
};

// Fills `rows` when the dimensions other than `dim` collapse into at most two; false otherwise.
inline bool collapse_rows(const at::Tensor& t, int64_t dim, Rows& rows) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (size, stride), size-1 dims dropped
  for (int64_t i = 0; i < t.dim(); ++i) {
    if (i == dim || t.size(i) == 1) continue;
    if (!dims.empty() && dims.back().second == t.stride(i) * t.size(i)) {
      dims.back() = {dims.back().first * t.size(i), t.stride(i)};
    } else {
      dims.emplace_back(t.size(i), t.stride(i));
    }
  }
  if (dims.size() > 2) return false;
  rows = Rows{};
  rows.d_stride = t.stride(dim);
  if (dims.size() == 2) {
    rows.outer = dims[0].first, rows.outer_stride = dims[0].second;
    rows.inner = dims[1].first, rows.inner_stride = dims[1].second;
  } else if (dims.size() == 1) {
    rows.inner = dims[0].first, rows.inner_stride = dims[0].second;
  }
  for (int64_t i = 0; i < t.dim(); ++i) {
    if (t.size(i) == 0 && i != dim) rows.outer = 0;
  }
  return true;
}

// t itself when its rows collapse, else a contiguous copy of it; `rows` describes the tensor returned.
inline at::Tensor as_rows(const at::Tensor& t, int64_t dim, Rows& rows) {
  if (collapse_rows(t, dim, rows)) return t;
  at::Tensor c = t.contiguous();
  collapse_rows(c, dim, rows);
  return c;
}

// torch.empty_like(like), and the tensor the kernel writes as rows: the same one when its rows
// collapse, else a contiguous buffer that finish() copies into it.
struct RowsOutput {
  at::Tensor out, buffer;
  Rows rows;
  RowsOutput(const at::Tensor& like, int64_t dim) : out(at::empty_like(like)) {
    buffer = collapse_rows(out, dim, rows) ? out : at::empty(out.sizes(), out.options());
    collapse_rows(buffer, dim, rows);
  }
  at::Tensor finish() { return buffer.is_same(out) ? out : out.copy_(buffer); }
};

// Row-wise kernels take rows in blocks of kRowBlock and, for each element d, the block's rows in turn,
// so that NCHW reads and writes run along contiguous spatial positions.
constexpr int64_t kRowBlock = 64;

// Calls f(blk, r0, n) for every block blk of n <= kRowBlock rows starting at row r0, in parallel.
template <typename F>
void for_row_blocks(int64_t N, F&& f) {
  at::parallel_for(0, (N + kRowBlock - 1) / kRowBlock, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) f(blk, blk * kRowBlock, std::min(kRowBlock, N - blk * kRowBlock));
  });
}

// off[i] = offset of row r0 + i, for i < n.
inline void row_offsets(const Rows& rows, int64_t r0, int64_t n, int64_t* off) {
  for (int64_t i = 0; i < n; ++i) off[i] = rows.offset(r0 + i);
}

}  // namespace vqfast
