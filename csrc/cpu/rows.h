// A tensor seen as rows of D elements along `dim`, the other dimensions collapsed into at most two
// (outer, inner) without copying: row r = b * inner + p starts at b * outer_stride + p * inner_stride
// and its elements are d_stride apart. NCHW latents with dim=1 are (N, H*W) rows, D = C apart.
#pragma once

#include <ATen/core/Tensor.h>

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

}  // namespace vqfast
