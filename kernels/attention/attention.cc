// Attention, CPU implementation: one pass over the keys per query row with a running maximum
// and sum (the "online softmax" of flash attention), so no [s, l] score matrix is ever stored.
//
// Three forms, picked per call from what the CPU has:
//   bf16 (AVX-512 BF16): q (pre-multiplied by scale * log2(e)), k, v and the softmax weights are
//     rounded to bf16 (round to nearest even) and multiplied with vdpbf16ps, which sums pairs of
//     bf16 products into float32 lanes; every sum, the maximum, exp2 and the normalisation stay
//     float32.
//   float32 (AVX-512 F): the same blocked kernel with float32 FMAs (attention_avx512.inc holds
//     it once, compiled for both).
//   float32 AVX2 (AVX2/FMA CPUs without AVX-512): the same flash order with 8-float vectors
//     (attention_avx2.inc).
//   float32 portable (any other CPU): K transposed per (item, head); per block of keys, each
//     row's scores are axpy loops over the block, then exp and the weighted sum of V rows, with
//     the same running maximum and sum.
#include "attention/attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <new>

#include "common/api.h"
#include "common/cpu.h"
#include "common/exp.h"

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define SDRT_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define SDRT_CLONES
#endif

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__) && __GNUC__ >= 10
#define SDRT_HAVE_AVX512_PATHS 1
#include <immintrin.h>
#else
#define SDRT_HAVE_AVX512_PATHS 0
#endif

namespace sdrt {
namespace {

constexpr int kRows = 4;        // query rows per micro-tile (AVX-512 forms)
constexpr int kBlockKeys = 64;  // keys per softmax block (AVX-512 forms): 4 vectors of 16
constexpr float kLog2e = 1.44269504088896341f;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// float32 -> bf16 bits, round to nearest even (NaN stays NaN: its payload's top bits survive)
inline uint32_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u;
  u += 0x7fffu + ((u >> 16) & 1u);
  return u >> 16;
}

// -- portable float32 form ------------------------------------------------------------------------

SDRT_CLONES void axpy(float* y, const float* x, float a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// s[i] = exp(s[i] - m) for m >= every s[i], returns the sum
SDRT_CLONES float softmax_numerators(float* s, int64_t n, float m) {
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    s[i] = exp_nonpositive(s[i] - m);
    sum += s[i];
  }
  return sum;
}

}  // namespace

#if SDRT_HAVE_AVX512_PATHS
// GCC 12's own AVX-512 reduction intrinsics trip its uninitialised-use warning
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,fma")
#define SDRT_ATTN_BF16 1
#define SDRT_ATTN_NS avx512_bf16
#include "attention/attention_avx512.inc"
#undef SDRT_ATTN_NS
#undef SDRT_ATTN_BF16
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,fma")
#define SDRT_ATTN_BF16 0
#define SDRT_ATTN_NS avx512_f32
#include "attention/attention_avx512.inc"
#undef SDRT_ATTN_NS
#undef SDRT_ATTN_BF16
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#include "attention/attention_avx2.inc"
#pragma GCC pop_options
#pragma GCC diagnostic pop
#endif

float AttentionShape::softmax_scale() const {
  return scale != 0.0f ? scale : static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
}

namespace {
bool cpu_has(bool bf16) {
#if SDRT_HAVE_AVX512_PATHS
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
         (!bf16 || __builtin_cpu_supports("avx512bf16"));
#else
  (void)bf16;
  return false;
#endif
}
}  // namespace

bool attention_bf16_supported() { return cpu_has(true); }

AttentionJob::AttentionJob(const AttentionShape& shape, const float* q, const float* k, const float* v,
                           float* out, AttentionMath math)
    : shape_(shape), q_(q), k_(k), v_(v), out_(out), scale_(shape.softmax_scale()) {
  const bool want_bf16 = math == AttentionMath::kAuto || math == AttentionMath::kBFloat16;
  const bool avx512 = math != AttentionMath::kFloat32Avx2 && cpu_has(false);
  const bool avx2 = SDRT_HAVE_AVX512_PATHS && cpu_has_avx2_fma();  // the AVX2 form is built with the AVX-512 ones
  form_ = math == AttentionMath::kPortable ? Form::kPortable
          : want_bf16 && cpu_has(true)     ? Form::kBFloat16
          : avx512                         ? Form::kFloat32
          : avx2                           ? Form::kFloat32Avx2
                                           : Form::kPortable;
  // query rows per task, whole micro-tiles (4 rows; AVX2: 6, and 96 rows so that each block of K
  // and V read serves 16 micro-tiles from the L1 cache)
  row_tile_ = form_ == Form::kFloat32Avx2 ? 96 : 32;
  const int64_t heads = shape.b * shape.heads;
  if (form_ == Form::kPortable) {
    head_units_ = shape.d * shape.l;  // K transposed, [d][l] floats
  } else if (form_ == Form::kFloat32Avx2) {  // floats: K [l / 8][d][8], V [l][d padded to 8]
    lpad_ = round_up(shape.l, 16);
    dpad_ = round_up(shape.d, 8);
    k_units_ = lpad_ * shape.d;
    head_units_ = k_units_ + lpad_ * dpad_;
  } else {
    const int64_t per_unit = form_ == Form::kBFloat16 ? 2 : 1;
    lpad_ = round_up(shape.l, 16);
    steps_ = round_up(shape.d, per_unit) / per_unit;
    dpad_ = round_up(shape.d, 16);
    k_units_ = lpad_ * steps_;
    head_units_ = k_units_ + lpad_ / per_unit * dpad_;
  }
  packed_.assign(static_cast<size_t>(heads * head_units_), 0u);
}

int64_t AttentionJob::tasks() const {
  return shape_.b * shape_.heads * ((shape_.s + row_tile_ - 1) / row_tile_);
}

void AttentionJob::pack_task(int64_t bh) {
  const int64_t b = bh / shape_.heads, h = bh % shape_.heads, hd = shape_.heads * shape_.d;
  const float* kb = k_ + b * shape_.l * hd + h * shape_.d;
  const float* vb = v_ + b * shape_.l * hd + h * shape_.d;
  uint32_t* dst = packed_.data() + bh * head_units_;
  switch (form_) {
#if SDRT_HAVE_AVX512_PATHS
    case Form::kBFloat16:
      avx512_bf16::pack(kb, vb, hd, shape_.l, shape_.d, steps_, dpad_, dst, dst + k_units_);
      return;
    case Form::kFloat32:
      avx512_f32::pack(kb, vb, hd, shape_.l, shape_.d, steps_, dpad_, dst, dst + k_units_);
      return;
    case Form::kFloat32Avx2: {
      float* kf = reinterpret_cast<float*>(dst);
      avx2_f32::pack(kb, vb, hd, shape_.l, shape_.d, dpad_, kf, kf + k_units_);
      return;
    }
#endif
    default: {
      float* kt = reinterpret_cast<float*>(dst);
      for (int64_t j = 0; j < shape_.l; ++j)
        for (int64_t dd = 0; dd < shape_.d; ++dd) kt[dd * shape_.l + j] = kb[j * hd + dd];
    }
  }
}

void AttentionJob::run_task(int64_t task) {
  const int64_t per_head = (shape_.s + row_tile_ - 1) / row_tile_;
  const int64_t bh = task / per_head, row0 = (task % per_head) * row_tile_;
  const int64_t rows = std::min(row_tile_, shape_.s - row0);
  if (rows <= 0) return;
  if (form_ == Form::kPortable) return run_portable(bh, row0, rows);
  if (form_ == Form::kFloat32Avx2) return run_avx2(bh, row0, rows);
#if SDRT_HAVE_AVX512_PATHS
  const int64_t b = bh / shape_.heads, h = bh % shape_.heads, hd = shape_.heads * shape_.d;
  const uint32_t* kp = packed_.data() + bh * head_units_;
  const uint32_t* vp = kp + k_units_;
  const float qscale = scale_ * kLog2e;  // scores in the log2 domain: softmax by exp2
  std::vector<uint32_t> q(static_cast<size_t>(kRows * steps_));
  std::vector<float> o(static_cast<size_t>(kRows * dpad_));
  for (int64_t r0 = row0; r0 < row0 + rows; r0 += kRows) {
    const int n = static_cast<int>(std::min<int64_t>(kRows, row0 + rows - r0));
    const float* qrows[kRows];
    float* orows[kRows];
    for (int r = 0; r < kRows; ++r) {
      const int64_t row = r0 + std::min(r, n - 1);
      qrows[r] = q_ + (b * shape_.s + row) * hd + h * shape_.d;
      orows[r] = out_ + (b * shape_.s + row) * hd + h * shape_.d;
    }
    if (form_ == Form::kBFloat16)
      avx512_bf16::rows(qrows, orows, n, shape_.d, shape_.l, steps_, dpad_, qscale, kp, vp, q.data(),
                        o.data());
    else
      avx512_f32::rows(qrows, orows, n, shape_.d, shape_.l, steps_, dpad_, qscale, kp, vp, q.data(),
                       o.data());
  }
#endif
}

void AttentionJob::run_avx2(int64_t bh, int64_t row0, int64_t rows) {
#if SDRT_HAVE_AVX512_PATHS
  const float qscale = scale_ * kLog2e;  // scores in the log2 domain: softmax by exp2
  const int64_t b = bh / shape_.heads, h = bh % shape_.heads, hd = shape_.heads * shape_.d;
  const float* kp = reinterpret_cast<const float*>(packed_.data() + bh * head_units_);
  const float* vp = kp + k_units_;
  // the task's rows at once, in whole micro-tiles (the last row repeated to fill them)
  const int n = static_cast<int>(rows);
  const int tiles = (n + avx2_f32::kRows - 1) / avx2_f32::kRows, all = tiles * avx2_f32::kRows;
  std::vector<const float*> qrows(static_cast<size_t>(all));
  std::vector<float*> orows(static_cast<size_t>(all));
  for (int r = 0; r < all; ++r) {
    const int64_t row = row0 + std::min(r, n - 1);
    qrows[r] = q_ + (b * shape_.s + row) * hd + h * shape_.d;
    orows[r] = out_ + (b * shape_.s + row) * hd + h * shape_.d;
  }
  std::vector<float> scratch(static_cast<size_t>(all * (shape_.d + dpad_ + 2)));
  float* q = scratch.data();
  float* o = q + all * shape_.d;
  avx2_f32::rows(qrows.data(), orows.data(), n, tiles, shape_.d, shape_.l, dpad_, qscale, kp, vp, q, o,
                 o + all * dpad_);
#else
  (void)bh, (void)row0, (void)rows;
#endif
}

void AttentionJob::run_portable(int64_t bh, int64_t row0, int64_t rows) {
  // The flash order with plain loops (the compiler vectorises the axpys): the key blocks outside
  // and the task's rows inside, so a block of K^T and V (kBlockKeys keys) is read from memory once
  // per task and then from the L1 cache. Row by row over every key, as this form first did, read
  // a head's whole K and V per query row: 5x ONNX Runtime's time at 4096 keys.
  const int64_t b = bh / shape_.heads, h = bh % shape_.heads, hd = shape_.heads * shape_.d;
  const int64_t l = shape_.l, d = shape_.d;
  const float* kt = reinterpret_cast<const float*>(packed_.data() + bh * head_units_);
  const float* vb = v_ + b * l * hd + h * d;
  std::vector<float> acc(static_cast<size_t>(rows * (d + 2)), 0.0f);  // per row: output sums, max, sum
  float* o = acc.data();
  float* m = o + rows * d;
  float* lsum = m + rows;
  std::fill(m, m + rows, -std::numeric_limits<float>::infinity());
  float sc[kBlockKeys];
  for (int64_t j0 = 0; j0 < l; j0 += kBlockKeys) {
    const int64_t n = std::min<int64_t>(kBlockKeys, l - j0);
    for (int64_t r = 0; r < rows; ++r) {
      const float* qr = q_ + (b * shape_.s + row0 + r) * hd + h * d;
      std::fill(sc, sc + n, 0.0f);
      for (int64_t dd = 0; dd < d; ++dd) axpy(sc, kt + dd * l + j0, qr[dd] * scale_, n);
      float mx = sc[0];
      for (int64_t j = 1; j < n; ++j) mx = sc[j] > mx ? sc[j] : mx;
      const float m_new = std::max(m[r], mx);
      const float corr = m_new == m[r] ? 1.0f : std::exp(m[r] - m_new);  // 0 on the first block
      m[r] = m_new;
      float* orow = o + r * d;
      for (int64_t dd = 0; dd < d; ++dd) orow[dd] *= corr;
      lsum[r] = lsum[r] * corr + softmax_numerators(sc, n, m_new);
      for (int64_t j = 0; j < n; ++j) axpy(orow, vb + (j0 + j) * hd, sc[j], d);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* out = out_ + (b * shape_.s + row0 + r) * hd + h * d;
    const float inv = 1.0f / lsum[r];
    for (int64_t dd = 0; dd < d; ++dd) out[dd] = o[r * d + dd] * inv;
  }
}

}  // namespace sdrt

extern "C" int32_t sdrt_attention_f32(const float* q, const float* k, const float* v, float* out, int64_t b,
                                      int64_t s, int64_t l, int64_t heads, int64_t d, float scale,
                                      int32_t math) {
  sdrt::AttentionShape shape{b, s, l, heads, d, scale};
  if (!q || !k || !v || !out || !shape.valid() || math < 0 || math > 4) return -1;
  try {
    sdrt::AttentionJob job(shape, q, k, v, out, static_cast<sdrt::AttentionMath>(math));
    for (int64_t t = 0; t < job.pack_tasks(); ++t) job.pack_task(t);
    for (int64_t t = 0; t < job.tasks(); ++t) job.run_task(t);
    return static_cast<int32_t>(job.form());
  } catch (const std::bad_alloc&) {
    return -2;
  }
}
