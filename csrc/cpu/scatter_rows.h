// Deterministic scatter-add of rows into a (K, D) codebook gradient, shared by vector_quantize and
// codebook_gather backward: rows are grouped by code with a stable counting sort, then every code is
// summed by one thread, in row order, in float32. The result does not depend on the thread count.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <numeric>
#include <vector>

namespace vqfast {
namespace cpu {

// out (K x D, contiguous) = sum over rows r with code(r) == k of the row that add_row(r, k, acc)
// adds into the float32 accumulator acc[D].
template <typename T, typename Code, typename AddRow>
void scatter_rows(Code code, int64_t N, int64_t K, int64_t D, T* out, AddRow add_row) {
  std::vector<int64_t> start(K + 1, 0), order(N);
  for (int64_t r = 0; r < N; ++r) {
    const int64_t k = code(r);
    TORCH_CHECK_INDEX(k >= 0 && k < K, "index ", k, " is out of bounds for ", K, " codes");
    ++start[k + 1];
  }
  std::partial_sum(start.begin(), start.end(), start.begin());
  std::vector<int64_t> next(start.begin(), start.end() - 1);
  for (int64_t r = 0; r < N; ++r) order[next[code(r)]++] = r;
  at::parallel_for(0, K, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(D);
    for (int64_t k = begin; k < end; ++k) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = start[k]; j < start[k + 1]; ++j) add_row(order[j], k, acc.data());
      for (int64_t d = 0; d < D; ++d) out[k * D + d] = static_cast<T>(acc[d]);
    }
  });
}

}  // namespace cpu
}  // namespace vqfast
