// Outputs that a kernel writes in full: ask Linux for transparent huge pages before the first touch.
// A fresh buffer of 32 MiB or more comes straight from mmap, and faulting it in 4 KiB pages costs more
// than the kernel's own pass over it (measured on this project's 2-core CI machine: filling a fresh
// 32 MiB tensor 6.9 ms, a warm one 0.8 ms, a fresh one advised to use 2 MiB pages 2.4 ms).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace vqfast {
namespace cpu {

// Advice only: memory already faulted in keeps its pages, and a refusal (THP off) changes nothing.
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t first = reinterpret_cast<uintptr_t>(t.storage().data());
  const uintptr_t begin = (first + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (first + t.storage().nbytes()) & ~(kHuge - 1);
  if (end >= begin + 4 * kHuge) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

}  // namespace cpu
}  // namespace vqfast
