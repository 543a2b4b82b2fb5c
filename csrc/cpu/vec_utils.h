// Shared helpers for the CPU kernels: float32 vectors loaded from / stored to float, bfloat16 and
// float16 memory, with a scalar tail; and a fast SiLU with its derivative.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace vqfast {
namespace cpu {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();

template <typename T>
inline Vec vload(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p);
  } else {
    Vec out;
    at::vec::load_to_float<T>(p, out);
    return out;
  }
}

// Loads n (< kVec) elements; the rest of the lanes are zero.
template <typename T>
inline Vec vload_partial(const T* p, int64_t n) {
  float tmp[kVec] = {};
  for (int64_t i = 0; i < n; ++i) tmp[i] = static_cast<float>(p[i]);
  return Vec::loadu(tmp);
}

template <typename T>
inline void vstore(T* p, const Vec& v) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(p);
#if defined(CPU_CAPABILITY_AVX512)
  // One vector's conversion: convert_from_float converts a pair, here twice the work for half the use.
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
#if defined(__AVX512BF16__)  // one instruction, round to nearest even as torch; flushes results below 1.2e-38
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(__m512(v)));
#else
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), at::vec::cvtfp32_bf16(__m512(v)));
#endif
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), at::vec::cvtfp32_fp16(__m512(v)));
#endif
  } else {
    at::vec::convert_from_float<T>(v, v).store(p, kVec);
  }
}

template <typename T>
inline void vstore_partial(T* p, const Vec& v, int64_t n) {
  float tmp[kVec];
  v.store(tmp);
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(tmp[i]);
}

// Loads the whole vector at p, or only its first n lanes when n < kVec.
template <typename T>
inline Vec vload_n(const T* p, int64_t n) {
  return n >= kVec ? vload(p) : vload_partial(p, n);
}

template <typename T>
inline void vstore_n(T* p, const Vec& v, int64_t n) {
  if (n >= kVec) {
    vstore(p, v);
  } else {
    vstore_partial(p, v, n);
  }
}

// 1 / d: a hardware estimate refined by one Newton step (relative error ~1e-7) where there is one.
inline Vec reciprocal(const Vec& d) {
#if defined(CPU_CAPABILITY_AVX512)
  const Vec r(_mm512_rcp14_ps(d));
  return r * (Vec(2.f) - d * r);
#else
  return Vec(1.f) / d;
#endif
}

// exp(x) for -100 <= x <= 88. AVX512: 2^n * exp(r), n = round(x / ln 2), r = x - n ln 2 (two-part ln 2),
// exp(r) by its degree-6 Taylor polynomial (|r| <= ln 2 / 2: relative error < 3e-8), 2^n by scalef,
// which also takes care of underflow (11 instructions; at::vec's exp_u20 takes 19).
inline Vec exp_clamped(const Vec& x) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);  // ln 2, high part: n * it is exact
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-06f), r);      // ln 2, low part
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(1.f / 720), r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
#else
  return x.exp_u20();
#endif
}

// -y is clamped to [-100, 88] so that 1 + exp(-y) stays finite (its reciprocal's Newton step never
// meets inf * 0) and the range reduction never meets inf - inf. Past 88 the sigmoid, below 7e-39,
// is made exactly 0 as torch's 1 / (1 + inf), so silu(-inf) is NaN and silu(-1000) is -0 as there.
inline Vec sigmoid(const Vec& y) {
  const Vec t = at::vec::clamp(Vec(0.f) - y, Vec(-100.f), Vec(88.f));
  return reciprocal(Vec(1.f) + exp_clamped(t)) & (t < Vec(88.f));
}

inline Vec silu(const Vec& y) { return y * sigmoid(y); }

// d silu(y) / dy = s * (1 + y * (1 - s)), s = sigmoid(y).
inline Vec silu_grad(const Vec& y) {
  const Vec one(1.f);
  const Vec s = sigmoid(y);
  return s * (one + y * (one - s));
}

// Calls f(T{}) with T the C++ type of a float32 / bfloat16 / float16 dtype.
template <typename F>
decltype(auto) dispatch_float(c10::ScalarType t, const char* name, F&& f) {
  switch (t) {
    case c10::ScalarType::Float:
      return f(float{});
    case c10::ScalarType::BFloat16:
      return f(c10::BFloat16{});
    case c10::ScalarType::Half:
      return f(c10::Half{});
    default:
      TORCH_CHECK(false, name, ": expected float32, bfloat16 or float16, got ", t);
  }
}

inline float sum_lanes(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

}  // namespace cpu
}  // namespace vqfast
