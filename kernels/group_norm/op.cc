// GroupNorm (+ SiLU), CPU implementation, NCHW and NHWC.
//
// Statistics: per group, one pass of float partial sums (vectorised, shifted by the group's
// first value against cancellation) gathered in double. SiLU uses a polynomial exp accurate to
// a few float ulps so the loop vectorises; the library is built with AVX2/FMA clones of the
// hot loops next to the baseline x86-64 code and picks one at load time.
#include <cmath>
#include <cstring>
#include <vector>

#include "common/api.h"
#include "common/exp.h"
#include "group_norm/group_norm.h"

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define SDRT_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define SDRT_CLONES
#endif

namespace sdrt {
namespace {

// x * sigmoid(x), from e = exp(-|x|) so it never overflows: sigmoid is 1/(1+e) for x >= 0 and
// e/(1+e) below; branch-free (fabs, fmax, a select of two computed values) so the loop vectorises
inline float silu(float v) {
  const float e = exp_nonpositive(-std::fabs(v));
  const float num = v < 0.0f ? e : 1.0f;
  return v * num / (1.0f + e);
}

SDRT_CLONES void row_sums(const float* x, int64_t count, float shift, double* sum, double* sq) {
  float s = 0.0f, q = 0.0f;
  for (int64_t i = 0; i < count; ++i) {
    const float d = x[i] - shift;
    s += d;
    q += d * d;
  }
  *sum += s;
  *sq += q;
}

SDRT_CLONES void row_apply(const float* x, float* y, int64_t count, float scale, float shift, bool apply_silu) {
  if (apply_silu) {
    for (int64_t i = 0; i < count; ++i) y[i] = silu(x[i] * scale + shift);
  } else {
    for (int64_t i = 0; i < count; ++i) y[i] = x[i] * scale + shift;
  }
}

SDRT_CLONES void pixel_apply(const float* x, float* y, int64_t c, const float* scale, const float* shift,
                             bool apply_silu) {
  if (apply_silu) {
    for (int64_t i = 0; i < c; ++i) y[i] = silu(x[i] * scale[i] + shift[i]);
  } else {
    for (int64_t i = 0; i < c; ++i) y[i] = x[i] * scale[i] + shift[i];
  }
}

// Mean and 1/std of a group from sums shifted by `shift`
inline void moments(double sum, double sq, double count, float shift, float eps, double* mean, float* inv) {
  const double m = count > 0 ? sum / count : 0.0;
  const double var = count > 0 ? sq / count - m * m : 0.0;
  *mean = m + shift;
  *inv = static_cast<float>(1.0 / std::sqrt((var > 0 ? var : 0.0) + eps));
}

}  // namespace

void group_norm_task(const GroupNormShape& s, const float* x, const float* gamma, const float* beta, float* y,
                     float eps, bool apply_silu, int64_t task) {
  const int64_t cg = s.c / s.groups;
  const double count = static_cast<double>(cg * s.hw);
  if (!s.channels_last) {
    const int64_t b = task / s.groups, g = task % s.groups;
    const float* xg = x + (b * s.c + g * cg) * s.hw;
    float* yg = y + (b * s.c + g * cg) * s.hw;
    const float shift0 = s.hw > 0 ? xg[0] : 0.0f;
    double sum = 0.0, sq = 0.0;
    for (int64_t ch = 0; ch < cg; ++ch) row_sums(xg + ch * s.hw, s.hw, shift0, &sum, &sq);
    double mean;
    float inv;
    moments(sum, sq, count, shift0, eps, &mean, &inv);
    for (int64_t ch = 0; ch < cg; ++ch) {
      const int64_t k = g * cg + ch;
      const float scale = (gamma ? gamma[k] : 1.0f) * inv;
      const float shift = (beta ? beta[k] : 0.0f) - static_cast<float>(mean) * scale;
      row_apply(xg + ch * s.hw, yg + ch * s.hw, s.hw, scale, shift, apply_silu);
    }
    return;
  }
  // NHWC: one task per batch item; per-channel sums over the pixels, then gathered per group
  const int64_t b = task;
  const float* xb = x + b * s.hw * s.c;
  float* yb = y + b * s.hw * s.c;
  std::vector<double> sum(s.c, 0.0), sq(s.c, 0.0);
  std::vector<float> shift0(s.c, 0.0f), scale(s.c), shift(s.c);
  if (s.hw > 0)
    for (int64_t ch = 0; ch < s.c; ++ch) shift0[ch] = xb[ch];
  for (int64_t i = 0; i < s.hw; ++i) {
    const float* px = xb + i * s.c;
    for (int64_t ch = 0; ch < s.c; ++ch) {
      const double d = px[ch] - shift0[ch];
      sum[ch] += d;
      sq[ch] += d * d;
    }
  }
  for (int64_t g = 0; g < s.groups; ++g) {
    // Re-centre every channel's sums on the group's first channel shift
    const float ref = shift0[g * cg];
    double gs = 0.0, gq = 0.0;
    for (int64_t ch = g * cg; ch < (g + 1) * cg; ++ch) {
      const double delta = static_cast<double>(shift0[ch]) - ref;
      gs += sum[ch] + delta * s.hw;
      gq += sq[ch] + 2.0 * delta * sum[ch] + delta * delta * s.hw;
    }
    double mean;
    float inv;
    moments(gs, gq, count, ref, eps, &mean, &inv);
    for (int64_t ch = g * cg; ch < (g + 1) * cg; ++ch) {
      scale[ch] = (gamma ? gamma[ch] : 1.0f) * inv;
      shift[ch] = (beta ? beta[ch] : 0.0f) - static_cast<float>(mean) * scale[ch];
    }
  }
  for (int64_t i = 0; i < s.hw; ++i) pixel_apply(xb + i * s.c, yb + i * s.c, s.c, scale.data(), shift.data(), apply_silu);
}

}  // namespace sdrt

extern "C" int32_t sdrt_group_norm_f32(const float* x, const float* gamma, const float* beta, float* y,
                                       int64_t n, int64_t c, int64_t hw, int64_t groups, float eps,
                                       int32_t channels_last, int32_t apply_silu) {
  sdrt::GroupNormShape s{n, c, hw, groups, channels_last != 0};
  if (!x || !y || !s.valid()) return -1;
  const int64_t tasks = sdrt::group_norm_tasks(s);
  for (int64_t t = 0; t < tasks; ++t) sdrt::group_norm_task(s, x, gamma, beta, y, eps, apply_silu != 0, t);
  return 0;
}
