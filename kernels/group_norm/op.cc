// GroupNorm (+ SiLU), CPU reference implementation, NCHW and NHWC.
#include <cmath>

#include "common/api.h"

namespace {

inline float silu(float v) { return v / (1.0f + std::exp(-v)); }

}  // namespace

extern "C" int32_t sdrt_group_norm_f32(const float* x, const float* gamma, const float* beta, float* y,
                                       int64_t n, int64_t c, int64_t hw, int64_t groups, float eps,
                                       int32_t channels_last, int32_t apply_silu) {
  if (!x || !y || n < 0 || c <= 0 || hw < 0 || groups <= 0 || c % groups != 0) return -1;
  const int64_t cg = c / groups;
  for (int64_t b = 0; b < n; ++b) {
    const float* xb = x + b * c * hw;
    float* yb = y + b * c * hw;
    for (int64_t g = 0; g < groups; ++g) {
      // Mean and variance of the group in double
      double sum = 0.0, sq = 0.0;
      for (int64_t ch = g * cg; ch < (g + 1) * cg; ++ch) {
        for (int64_t i = 0; i < hw; ++i) {
          const double v = channels_last ? xb[i * c + ch] : xb[ch * hw + i];
          sum += v;
          sq += v * v;
        }
      }
      const double count = static_cast<double>(cg * hw);
      const double mean = count > 0 ? sum / count : 0.0;
      const double var = count > 0 ? sq / count - mean * mean : 0.0;
      const float inv = static_cast<float>(1.0 / std::sqrt((var > 0 ? var : 0.0) + eps));
      // Normalise, scale and shift
      for (int64_t ch = g * cg; ch < (g + 1) * cg; ++ch) {
        const float scale = (gamma ? gamma[ch] : 1.0f) * inv;
        const float shift = (beta ? beta[ch] : 0.0f) - static_cast<float>(mean) * scale;
        for (int64_t i = 0; i < hw; ++i) {
          const int64_t k = channels_last ? i * c + ch : ch * hw + i;
          const float v = xb[k] * scale + shift;
          yb[k] = apply_silu ? silu(v) : v;
        }
      }
    }
  }
  return 0;
}
