// exp for float32 loops that must vectorise (no libm call): shared by the CPU kernels.
#pragma once
#include <cstdint>
#include <cstring>

namespace sdrt {

// exp(v) for v <= 0: 2^k * p(r), r in [-ln2/2, ln2/2], degree-6 Taylor polynomial (relative
// error < 2e-7 on that range). k is rounded to nearest by adding and subtracting 1.5 * 2^23
// (exact in float arithmetic for |k| < 2^22), which vectorises where a call to nearbyint would
// not. Inputs below -87 give exp(-87).
inline float exp_nonpositive(float v) {
  v = v > -87.0f ? v : -87.0f;
  const float round = 12582912.0f;
  const float k = (v * 1.44269504088896341f + round) - round;
  const float r = v - k * 0.693145751953125f - k * 1.428606765330187045e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;  // 2^k as a float's bits
  float two_k;
  std::memcpy(&two_k, &bits, sizeof two_k);
  return p * two_k;
}

}  // namespace sdrt
