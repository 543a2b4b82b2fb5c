// Stand-in for cuda_fp16.h in the host build (csrc/host/): __half storage and its round-to-nearest-even
// conversions, bit for bit the device's.
#pragma once

#include <cstdint>
#include <cstring>

struct __half {
  uint16_t __x;
};

inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.__x & 0x8000u) << 16;
  const uint32_t exponent = (h.__x >> 10) & 0x1fu, mantissa = h.__x & 0x3ffu;
  uint32_t bits;
  if (exponent == 0x1f) {  // inf, NaN
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else {  // zero, subnormal: mantissa * 2^-24 is exact in float
    const float v = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    std::memcpy(&bits, &v, sizeof bits);
    bits |= sign;
  }
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

inline __half __float2half_rn(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  const uint32_t sign = bits & 0x80000000u;
  bits ^= sign;
  uint32_t out;
  if (bits >= 0x47800000u) {  // |f| >= 2^16 (inf after rounding), inf, NaN
    out = bits > 0x7f800000u ? 0x7e00u : 0x7c00u;
  } else if (bits < 0x38800000u) {  // half subnormal or zero: let float addition round at 2^-24
    float v;
    std::memcpy(&v, &bits, sizeof v);
    v += 0.5f;
    std::memcpy(&out, &v, sizeof out);
    out -= 0x3f000000u;
  } else {  // rebias, round the 13 dropped bits to nearest even (a carry may reach inf: correct)
    out = (bits + 0xc8000fffu + ((bits >> 13) & 1u)) >> 13;
  }
  return __half{static_cast<uint16_t>(out | (sign >> 16))};
}

inline __half __float2half(float f) { return __float2half_rn(f); }
