// GroupNorm (+ SiLU), CUDA. One thread block per (batch item, group): a first sweep gathers the
// group's sum and sum of squares, shifted by the group's first element so that large offsets do
// not cancel, reduced across the block in float; a second sweep applies the normalisation, the
// per-channel affine and SiLU. SD's GroupNorms hold 10-80 thousand elements per group, which a
// 512-thread block sweeps at memory speed; the group count times the batch gives the grid.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "group_norm/group_norm_cuda.h"

namespace sdrt {
namespace {

constexpr int kThreads = 512;

__device__ __forceinline__ float load(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load(const __half* p, int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ void store(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store(__half* p, int64_t i, float v) { p[i] = __float2half_rn(v); }

// Offset of element `k` of group `g` of item `n`: NCHW groups are contiguous runs of cpg * hw
// values; NHWC groups are cpg-wide column blocks of an [hw, c] matrix.
template <bool kChannelsLast>
__device__ __forceinline__ int64_t offset(int64_t n, int64_t g, int64_t k, int64_t c, int64_t hw, int64_t cpg,
                                          int64_t* channel) {
  if (kChannelsLast) {
    const int64_t pixel = k / cpg, j = k % cpg;
    *channel = g * cpg + j;
    return (n * hw + pixel) * c + *channel;
  }
  *channel = g * cpg + k / hw;
  return (n * c + g * cpg) * hw + k;
}

__device__ __forceinline__ float2 warp_sum(float2 v) {
  for (int lane = 16; lane > 0; lane >>= 1) {
    v.x += __shfl_xor_sync(0xffffffffu, v.x, lane);
    v.y += __shfl_xor_sync(0xffffffffu, v.y, lane);
  }
  return v;
}

template <typename T, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads) group_norm_kernel(const T* __restrict__ x, const float* __restrict__ gamma,
                                                              const float* __restrict__ beta, T* __restrict__ y,
                                                              int64_t c, int64_t hw, int64_t groups, float eps,
                                                              bool silu) {
  const int64_t n = blockIdx.x / groups, g = blockIdx.x % groups;
  const int64_t cpg = c / groups, count = cpg * hw;
  int64_t channel = 0;
  const float shift = load(x, offset<kChannelsLast>(n, g, 0, c, hw, cpg, &channel));

  float2 acc = make_float2(0.f, 0.f);
  for (int64_t k = threadIdx.x; k < count; k += blockDim.x) {
    const float d = load(x, offset<kChannelsLast>(n, g, k, c, hw, cpg, &channel)) - shift;
    acc.x += d;
    acc.y += d * d;
  }
  __shared__ float2 partial[kThreads / 32];
  __shared__ float stats[2];
  acc = warp_sum(acc);
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = acc;
  __syncthreads();
  if (threadIdx.x < 32) {
    acc = threadIdx.x < (blockDim.x >> 5) ? partial[threadIdx.x] : make_float2(0.f, 0.f);
    acc = warp_sum(acc);
    if (threadIdx.x == 0) {
      const float mean_d = acc.x / static_cast<float>(count);
      const float var = fmaxf(acc.y / static_cast<float>(count) - mean_d * mean_d, 0.f);
      stats[0] = shift + mean_d;
      stats[1] = rsqrtf(var + eps);
    }
  }
  __syncthreads();
  const float mean = stats[0], rstd = stats[1];
  for (int64_t k = threadIdx.x; k < count; k += blockDim.x) {
    const int64_t at = offset<kChannelsLast>(n, g, k, c, hw, cpg, &channel);
    float v = (load(x, at) - mean) * rstd * gamma[channel] + beta[channel];
    if (silu) v = v / (1.f + __expf(-v));
    store(y, at, v);
  }
}

template <typename T>
int launch(const void* x, const float* gamma, const float* beta, void* y, const GroupNormShape& s, float eps,
           bool silu, cudaStream_t stream) {
  const int64_t blocks = s.n * s.groups;
  if (blocks == 0 || s.hw == 0) return 0;
  if (blocks > 0x7fffffff) return -1;
  const T* in = static_cast<const T*>(x);
  T* out = static_cast<T*>(y);
  if (s.channels_last)
    group_norm_kernel<T, true><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(in, gamma, beta, out, s.c,
                                                                                        s.hw, s.groups, eps, silu);
  else
    group_norm_kernel<T, false><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(in, gamma, beta, out, s.c,
                                                                                         s.hw, s.groups, eps, silu);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int group_norm_cuda(GpuDtype dtype, const void* x, const float* gamma, const float* beta, void* y,
                    const GroupNormShape& shape, float eps, bool silu, void* stream) {
  if (!shape.valid()) return -1;
  auto s = static_cast<cudaStream_t>(stream);
  return dtype == GpuDtype::kFloat16 ? launch<__half>(x, gamma, beta, y, shape, eps, silu, s)
                                     : launch<float>(x, gamma, beta, y, shape, eps, silu, s);
}

}  // namespace sdrt
