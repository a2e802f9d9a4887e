// 3x3 convolution by Winograd's F(4x4, 3x3), CPU implementation (see winograd.h).
//
// The transform matrices are Lavin and Gray's ("Fast Algorithms for Convolutional Neural
// Networks", 2016) for the interpolation points 0, +-1, +-2 and infinity:
//   B^T = [4  0 -5  0 1 0]   G = [ 1/4     0     0 ]   A^T = [1 1  1 1  1 0]
//         [0 -4 -4  1 1 0]       [-1/6  -1/6  -1/6 ]         [0 1 -1 2 -2 0]
//         [0  4 -4 -1 1 0]       [-1/6   1/6  -1/6 ]         [0 1  1 4  4 0]
//         [0 -2 -1  2 1 0]       [1/24  1/12   1/6 ]         [0 1 -1 8 -8 1]
//         [0  2 -1 -2 1 0]       [1/24 -1/12   1/6 ]
//         [0  4  0 -5 0 1]       [  0     0     1  ]
// Each 2-D transform is the 1-D one applied to the columns, then to the rows. In float32 the
// result differs from the direct convolution's by rounding only (about 1e-6 relative, the
// transforms' constants being small), far below what an 8-bit image shows.
#include "winograd/winograd.h"

#include <algorithm>
#include <cstring>
#include <new>

#include "common/api.h"
#include "common/cpu.h"

#if defined(__GNUC__) && defined(__x86_64__)
#define SDRT_X86 1
#include <immintrin.h>
#else
#define SDRT_X86 0
#endif

namespace sdrt {
namespace {

constexpr int64_t kTiles = 6;             // tiles per panel: the product kernel's rows
constexpr int64_t kLanes = 16;            // output channels per block: the product kernel's columns
constexpr int64_t kChunkBytes = 16 << 20;  // transformed input (and products) of one chunk, at most
constexpr int64_t kPanelsPerTask = 12;    // 6-tile panels per product task: reuse of its filter blocks
constexpr int64_t kBlocksPerTask = 4;     // 16-channel filter blocks per product task: reuse of its tiles
constexpr int64_t kDepth = 256;           // input channels per pass of the product kernel: its operands
                                          // (6 x 256 and 256 x 16 floats) stay in the L1 cache

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define SDRT_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define SDRT_CLONES
#endif

// The 1-D transforms on L lanes at once (lanes innermost, so the arithmetic runs on vectors):
// out[i * os][l] from in[i * is][l], rows of L floats.
template <int L>
inline void input_1d(const float (*d)[L], int is, float (*o)[L], int os) {  // B^T d: six to six
  for (int l = 0; l < L; ++l) {
    const float d0 = d[0][l], d1 = d[is][l], d2 = d[2 * is][l], d3 = d[3 * is][l], d4 = d[4 * is][l],
                d5 = d[5 * is][l];
    o[0][l] = 4.0f * d0 - 5.0f * d2 + d4;
    o[os][l] = -4.0f * (d1 + d2) + d3 + d4;
    o[2 * os][l] = 4.0f * (d1 - d2) - d3 + d4;
    o[3 * os][l] = -2.0f * (d1 - d3) - d2 + d4;
    o[4 * os][l] = 2.0f * (d1 - d3) - d2 + d4;
    o[5 * os][l] = 4.0f * d1 - 5.0f * d3 + d5;
  }
}

template <int L>
inline void filter_1d(const float (*g)[L], int is, float (*o)[L], int os) {  // G g: three to six
  for (int l = 0; l < L; ++l) {
    const float g0 = g[0][l], g1 = g[is][l], g2 = g[2 * is][l];
    o[0][l] = 0.25f * g0;
    o[os][l] = -(g0 + g1 + g2) * (1.0f / 6.0f);
    o[2 * os][l] = -(g0 - g1 + g2) * (1.0f / 6.0f);
    o[3 * os][l] = g0 * (1.0f / 24.0f) + g1 * (1.0f / 12.0f) + g2 * (1.0f / 6.0f);
    o[4 * os][l] = g0 * (1.0f / 24.0f) - g1 * (1.0f / 12.0f) + g2 * (1.0f / 6.0f);
    o[5 * os][l] = g2;
  }
}

// U = G g G^T for 16 filters: g[9][16] (3x3 taps by filter), u[36][16]
SDRT_CLONES void filter_block(const float (*g)[kLanes], float (*u)[kLanes]) {
  float t[18][kLanes];  // G g: 6 rows x 3 columns
  for (int j = 0; j < 3; ++j) filter_1d<kLanes>(g + j, 3, t + j, 3);
  for (int i = 0; i < 6; ++i) filter_1d<kLanes>(t + 3 * i, 1, u + 6 * i, 1);
}

// V = B^T d B for eight patches: d[36][8] (6x6 pixels by patch), v[36][8]
SDRT_CLONES void input_block(const float (*d)[8], float (*v)[8]) {
  float t[36][8];  // B^T d
  for (int q = 0; q < 6; ++q) input_1d<8>(d + q, 6, t + q, 6);
  for (int r = 0; r < 6; ++r) input_1d<8>(t + 6 * r, 1, v + 6 * r, 1);
}

// The output transform of one tile for 16 channels (`lanes` of them real): o[pixel][lane] =
// (A^T m A)[pixel] + bias, m at point xi and lane l being m[xi * plane + l]. Written with the
// lanes innermost, so that the transform runs on vectors of channels.
SDRT_CLONES void output_block(const float* m, int64_t plane, const float* bias, int64_t lanes,
                              float (*o)[kLanes]) {
  float mm[36][kLanes] = {}, t1[24][kLanes];
  for (int xi = 0; xi < 36; ++xi)
    for (int64_t l = 0; l < lanes; ++l) mm[xi][l] = m[xi * plane + l];
  for (int q = 0; q < 6; ++q)  // columns: A^T m (rows r of t1: 6 * r + q)
    for (int l = 0; l < kLanes; ++l) {
      const float m1 = mm[6 + q][l], m2 = mm[12 + q][l], m3 = mm[18 + q][l], m4 = mm[24 + q][l];
      const float a = m1 + m2, b = m1 - m2, c = m3 + m4, d = m3 - m4;
      t1[q][l] = mm[q][l] + a + c;
      t1[6 + q][l] = b + 2.0f * d;
      t1[12 + q][l] = a + 4.0f * c;
      t1[18 + q][l] = b + 8.0f * d + mm[30 + q][l];
    }
  for (int r = 0; r < 4; ++r)  // rows: (A^T m) A
    for (int l = 0; l < kLanes; ++l) {
      const float add = bias && l < lanes ? bias[l] : 0.0f;
      const float* t = &t1[6 * r][0];
      const float m1 = t[1 * kLanes + l], m2 = t[2 * kLanes + l], m3 = t[3 * kLanes + l], m4 = t[4 * kLanes + l];
      const float a = m1 + m2, b = m1 - m2, c = m3 + m4, d = m3 - m4;
      o[4 * r][l] = t[l] + a + c + add;
      o[4 * r + 1][l] = b + 2.0f * d + add;
      o[4 * r + 2][l] = a + 4.0f * c + add;
      o[4 * r + 3][l] = b + 8.0f * d + t[5 * kLanes + l] + add;
    }
}

// c[6][ldc] (16 columns) = sum over `depth` of a[i][0..6) x b[i][0..16) (+ c itself with `add`): a
// packed [depth][6], b [depth][16]. Portable form; compilers vectorise the 16 columns.
void product_portable(const float* a, const float* b, float* c, int64_t ldc, int64_t depth, bool add) {
  float acc[kTiles][kLanes] = {};
  if (add)
    for (int r = 0; r < kTiles; ++r) std::memcpy(acc[r], c + r * ldc, sizeof acc[r]);
  for (int64_t i = 0; i < depth; ++i, a += kTiles, b += kLanes)
    for (int r = 0; r < kTiles; ++r)
      for (int j = 0; j < kLanes; ++j) acc[r][j] += a[r] * b[j];
  for (int r = 0; r < kTiles; ++r) std::memcpy(c + r * ldc, acc[r], sizeof acc[r]);
}

#if SDRT_X86
// The same in AVX2 FMA registers: 12 accumulators (6 rows x 2 vectors of 8), per step two loads
// of b, six broadcasts of a, twelve FMAs. Written out by hand: with the accumulators in an array
// and loops over the rows GCC 12 keeps them on the stack (2.5x slower, measured)
__attribute__((target("avx2,fma"))) void product_avx2(const float* a, const float* b, float* c, int64_t ldc,
                                                       int64_t depth, bool add) {
  __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps(), c10 = _mm256_setzero_ps(),
         c11 = _mm256_setzero_ps(), c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps(),
         c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps(), c40 = _mm256_setzero_ps(),
         c41 = _mm256_setzero_ps(), c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
  if (add) {
    c00 = _mm256_loadu_ps(c);
    c01 = _mm256_loadu_ps(c + 8);
    c10 = _mm256_loadu_ps(c + ldc);
    c11 = _mm256_loadu_ps(c + ldc + 8);
    c20 = _mm256_loadu_ps(c + 2 * ldc);
    c21 = _mm256_loadu_ps(c + 2 * ldc + 8);
    c30 = _mm256_loadu_ps(c + 3 * ldc);
    c31 = _mm256_loadu_ps(c + 3 * ldc + 8);
    c40 = _mm256_loadu_ps(c + 4 * ldc);
    c41 = _mm256_loadu_ps(c + 4 * ldc + 8);
    c50 = _mm256_loadu_ps(c + 5 * ldc);
    c51 = _mm256_loadu_ps(c + 5 * ldc + 8);
  }
  for (int64_t i = 0; i < depth; ++i, a += kTiles, b += kLanes) {
    const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
    __m256 x = _mm256_broadcast_ss(a);
    c00 = _mm256_fmadd_ps(x, b0, c00);
    c01 = _mm256_fmadd_ps(x, b1, c01);
    x = _mm256_broadcast_ss(a + 1);
    c10 = _mm256_fmadd_ps(x, b0, c10);
    c11 = _mm256_fmadd_ps(x, b1, c11);
    x = _mm256_broadcast_ss(a + 2);
    c20 = _mm256_fmadd_ps(x, b0, c20);
    c21 = _mm256_fmadd_ps(x, b1, c21);
    x = _mm256_broadcast_ss(a + 3);
    c30 = _mm256_fmadd_ps(x, b0, c30);
    c31 = _mm256_fmadd_ps(x, b1, c31);
    x = _mm256_broadcast_ss(a + 4);
    c40 = _mm256_fmadd_ps(x, b0, c40);
    c41 = _mm256_fmadd_ps(x, b1, c41);
    x = _mm256_broadcast_ss(a + 5);
    c50 = _mm256_fmadd_ps(x, b0, c50);
    c51 = _mm256_fmadd_ps(x, b1, c51);
  }
  _mm256_storeu_ps(c, c00);
  _mm256_storeu_ps(c + 8, c01);
  _mm256_storeu_ps(c + ldc, c10);
  _mm256_storeu_ps(c + ldc + 8, c11);
  _mm256_storeu_ps(c + 2 * ldc, c20);
  _mm256_storeu_ps(c + 2 * ldc + 8, c21);
  _mm256_storeu_ps(c + 3 * ldc, c30);
  _mm256_storeu_ps(c + 3 * ldc + 8, c31);
  _mm256_storeu_ps(c + 4 * ldc, c40);
  _mm256_storeu_ps(c + 4 * ldc + 8, c41);
  _mm256_storeu_ps(c + 5 * ldc, c50);
  _mm256_storeu_ps(c + 5 * ldc + 8, c51);
}
#endif

}  // namespace

bool conv3x3_avx2_supported() { return SDRT_X86 && cpu_has_avx2_fma(); }

Conv3x3Job::Conv3x3Job(const Conv3x3Shape& shape, const float* x, const float* w, const float* bias, float* y,
                       std::vector<float>& scratch, bool portable)
    : s_(shape), x_(x), w_(w), bias_(bias), y_(y), avx2_(!portable && conv3x3_avx2_supported()) {
  tiles_h_ = (s_.h + 3) / 4;
  tiles_w_ = (s_.w + 3) / 4;
  tiles_ = s_.n * tiles_h_ * tiles_w_;
  kblocks_ = (s_.k + kLanes - 1) / kLanes;
  kpad_ = kblocks_ * kLanes;
  const int64_t widest = std::max(s_.c, kpad_);
  chunk_tiles_ = std::max<int64_t>(kTiles, kChunkBytes / (36 * 4 * widest) / kTiles * kTiles);
  chunk_tiles_ = std::min(chunk_tiles_, (tiles_ + kTiles - 1) / kTiles * kTiles);
  chunk_tiles_ = std::max<int64_t>(chunk_tiles_, kTiles);
  panels_per_task_ = kPanelsPerTask;
  const int64_t u = 36 * kpad_ * s_.c, v = 36 * chunk_tiles_ * s_.c, m = 36 * chunk_tiles_ * kpad_;
  if (scratch.size() < static_cast<size_t>(u + v + m)) scratch.resize(static_cast<size_t>(u + v + m));
  u_ = scratch.data();  // every element is written before it is read: no clearing
  v_ = u_ + u;
  m_ = v_ + v;
}

int64_t Conv3x3Job::chunk_panels(int64_t chunk) const {
  const int64_t first = chunk * chunk_tiles_;
  return (std::min(chunk_tiles_, tiles_ - first) + kTiles - 1) / kTiles;
}

void Conv3x3Job::filter_task(int64_t kb) {
  const int64_t c = s_.c, lanes = std::min(kLanes, s_.k - kb * kLanes);
  for (int64_t ci = 0; ci < c; ++ci) {
    float g[9][kLanes] = {}, u[36][kLanes];  // padding lanes: zero filters
    for (int64_t lane = 0; lane < lanes; ++lane) {
      const float* taps = w_ + ((kb * kLanes + lane) * c + ci) * 9;
      for (int i = 0; i < 9; ++i) g[i][lane] = taps[i];
    }
    filter_block(g, u);
    for (int xi = 0; xi < 36; ++xi) std::memcpy(u_ + ((xi * kblocks_ + kb) * c + ci) * kLanes, u[xi], sizeof u[xi]);
  }
}

void Conv3x3Job::input_task(int64_t chunk, int64_t panel) {
  const int64_t c = s_.c, h = s_.h, w = s_.w, panels = chunk_tiles_ / kTiles;
  const int64_t per_image = tiles_h_ * tiles_w_;
  int64_t corner[kTiles];  // each tile's image and patch corner (padding 1); -1: a padding tile
  int64_t origin_y[kTiles], origin_x[kTiles];
  bool inside[kTiles];
  for (int64_t j = 0; j < kTiles; ++j) {
    const int64_t t = chunk * chunk_tiles_ + panel * kTiles + j;
    corner[j] = t < tiles_ ? t / per_image : -1;
    origin_y[j] = (t % per_image) / tiles_w_ * 4 - 1;
    origin_x[j] = t % tiles_w_ * 4 - 1;
    inside[j] = origin_y[j] >= 0 && origin_x[j] >= 0 && origin_y[j] + 6 <= h && origin_x[j] + 6 <= w;
  }
  for (int64_t ci = 0; ci < c; ++ci) {
    float d[36][8] = {}, v[36][8];  // pixel by tile; padding tiles (and lanes 6, 7) stay zero
    for (int64_t j = 0; j < kTiles; ++j) {
      if (corner[j] < 0) continue;
      const float* plane = x_ + (corner[j] * c + ci) * h * w;
      const int64_t y0 = origin_y[j], x0 = origin_x[j];
      for (int r = 0; r < 6; ++r)
        for (int q = 0; q < 6; ++q) {
          const int64_t yy = y0 + r, xx = x0 + q;
          d[6 * r + q][j] = inside[j] || (yy >= 0 && yy < h && xx >= 0 && xx < w) ? plane[yy * w + xx] : 0.0f;
        }
    }
    input_block(d, v);
    for (int xi = 0; xi < 36; ++xi)
      std::memcpy(v_ + ((xi * panels + panel) * c + ci) * kTiles, v[xi], kTiles * sizeof(float));
  }
}

int64_t Conv3x3Job::product_tasks(int64_t chunk) const {
  const int64_t groups = (chunk_panels(chunk) + kPanelsPerTask - 1) / kPanelsPerTask;
  return 36 * ((kblocks_ + kBlocksPerTask - 1) / kBlocksPerTask) * groups;
}

// One task: the products of 12 panels of six tiles by 4 blocks of 16 filters at one of the 36
// points, over the input channels in passes of kDepth
void Conv3x3Job::product_task(int64_t chunk, int64_t task) {
  const int64_t groups = (chunk_panels(chunk) + kPanelsPerTask - 1) / kPanelsPerTask;
  const int64_t kgroups = (kblocks_ + kBlocksPerTask - 1) / kBlocksPerTask;
  const int64_t group = task % groups, kg = (task / groups) % kgroups, xi = task / groups / kgroups;
  const int64_t c = s_.c, panels = chunk_tiles_ / kTiles;
  const int64_t p_end = std::min(chunk_panels(chunk), (group + 1) * kPanelsPerTask);
  const int64_t kb_end = std::min(kblocks_, (kg + 1) * kBlocksPerTask);
  for (int64_t d0 = 0; d0 < c; d0 += kDepth) {
    const int64_t depth = std::min(kDepth, c - d0);
    for (int64_t p = group * kPanelsPerTask; p < p_end; ++p) {
      const float* a = v_ + ((xi * panels + p) * c + d0) * kTiles;
      for (int64_t kb = kg * kBlocksPerTask; kb < kb_end; ++kb) {
        const float* b = u_ + ((xi * kblocks_ + kb) * c + d0) * kLanes;
        float* out = m_ + (xi * chunk_tiles_ + p * kTiles) * kpad_ + kb * kLanes;
#if SDRT_X86
        if (avx2_) {
          product_avx2(a, b, out, kpad_, depth, d0 > 0);
          continue;
        }
#endif
        product_portable(a, b, out, kpad_, depth, d0 > 0);
      }
    }
  }
}

void Conv3x3Job::output_task(int64_t chunk, int64_t panel) {
  const int64_t h = s_.h, w = s_.w, k = s_.k, per_image = tiles_h_ * tiles_w_;
  const int64_t plane = chunk_tiles_ * kpad_;
  for (int64_t j = 0; j < kTiles; ++j) {
    const int64_t local = panel * kTiles + j, t = chunk * chunk_tiles_ + local;
    if (t >= tiles_) break;
    const int64_t img = t / per_image, ty = (t % per_image) / tiles_w_, tx = t % tiles_w_;
    const int64_t rows = std::min<int64_t>(4, h - ty * 4), cols = std::min<int64_t>(4, w - tx * 4);
    const float* m = m_ + local * kpad_;  // point xi, channel ch at m[xi * plane + ch]
    for (int64_t ch0 = 0; ch0 < k; ch0 += kLanes) {  // 16 channels at a time, the inner loops over them
      float o[16][kLanes];
      output_block(m + ch0, plane, bias_ ? bias_ + ch0 : nullptr, std::min(kLanes, k - ch0), o);
      for (int64_t lane = 0; lane < std::min(kLanes, k - ch0); ++lane) {
        float* out = y_ + ((img * k + ch0 + lane) * h + ty * 4) * w + tx * 4;
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t q = 0; q < cols; ++q) out[r * w + q] = o[r * 4 + q][lane];
      }
    }
  }
}

}  // namespace sdrt

// The ctypes entry point (tests, and a reference for the op): one thread; `portable` forces the
// portable product kernel. Returns 1 when the AVX2 kernel ran, 0 for the portable one, -1 on
// bad arguments, -2 out of memory.
extern "C" SDRT_API int32_t sdrt_conv3x3_f32(const float* x, const float* w, const float* bias, float* y,
                                             int64_t n, int64_t c, int64_t h, int64_t width, int64_t k,
                                             int32_t portable) {
  sdrt::Conv3x3Shape shape{n, c, h, width, k};
  if (!x || !w || !y || !shape.valid()) return -1;
  try {
    std::vector<float> scratch;
    sdrt::Conv3x3Job job(shape, x, w, bias, y, scratch, portable != 0);
    for (int64_t t = 0; t < job.filter_tasks(); ++t) job.filter_task(t);
    for (int64_t chunk = 0; chunk < job.chunks(); ++chunk) {
      for (int64_t t = 0; t < job.input_tasks(chunk); ++t) job.input_task(chunk, t);
      for (int64_t t = 0; t < job.product_tasks(chunk); ++t) job.product_task(chunk, t);
      for (int64_t t = 0; t < job.output_tasks(chunk); ++t) job.output_task(chunk, t);
    }
    return job.avx2() ? 1 : 0;
  } catch (const std::bad_alloc&) {
    return -2;
  }
}
