// Row-wise CPU kernels (nearest_code, vector_quantize, codebook_gather) take rows (common/layout.h) in
// blocks of kRowBlock and, for each element d, the block's rows in turn, so that NCHW reads and writes
// run along contiguous spatial positions.
#pragma once

#include "common/layout.h"

#include <ATen/Parallel.h>

#include <algorithm>

namespace vqfast {
namespace cpu {

constexpr int64_t kRowBlock = 64;

// Calls f(blk, r0, n) for every block blk of n <= kRowBlock rows starting at row r0, in parallel.
template <typename F>
void for_row_blocks(int64_t N, F&& f) {
  at::parallel_for(0, ceil_div(N, kRowBlock), 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) f(blk, blk * kRowBlock, std::min(kRowBlock, N - blk * kRowBlock));
  });
}

// off[i] = offset of element r0 + i of t, for i < n.
template <typename Layout>
void offsets(const Layout& t, int64_t r0, int64_t n, int64_t* off) {
  for (int64_t i = 0; i < n; ++i) off[i] = t.offset(r0 + i);
}

// The rows of t along dim, read in place (no copy: a layout with more than kMaxDims merged
// dimensions is refused here, and declined by vqfast.native before).
template <typename Tensor>
Rows rows_in_place(const Tensor& t, int64_t dim, const char* name) {
  Rows rows;
  TORCH_CHECK(rows_of(t, dim, rows), name, ": more than ", kMaxDims, " dimensions remain once merged (strides ",
              t.strides(), ")");
  return rows;
}

}  // namespace cpu
}  // namespace vqfast
