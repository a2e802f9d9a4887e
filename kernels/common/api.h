// sdrt kernels: C entry points (stable ABI for ctypes and for the ONNX Runtime op layer).
#pragma once
#include <stdint.h>

#if defined(_WIN32)
#define SDRT_API __declspec(dllexport)
#else
#define SDRT_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

// Version of the kernels ABI; bumped when an entry point is added or changes (2: attention, 3: conv3x3,
// 4: attention math 4, its AVX2 form).
SDRT_API int32_t sdrt_kernels_abi_version(void);

// GroupNorm over x[n, c, h*w] (NCHW) or x[n, h*w, c] (NHWC), per-channel affine, then SiLU if
// `silu` is non-zero. Statistics in double per group. Returns 0, or -1 on bad arguments.
SDRT_API int32_t sdrt_group_norm_f32(const float* x, const float* gamma, const float* beta, float* y,
                                     int64_t n, int64_t c, int64_t hw, int64_t groups, float eps,
                                     int32_t channels_last, int32_t silu);

// softmax(scale * q k^T) v per (item, head) over fused heads: q and out [b, s, heads*d], k and v
// [b, l, heads*d]; scale 0 means 1/sqrt(d). math: 0 bf16 where the CPU has AVX-512 BF16, else
// float32; 1 float32 (AVX-512, else AVX2/FMA, else portable); 2 bf16 if available; 3 the portable
// float32 code; 4 the AVX2/FMA float32 code (portable without AVX2). Returns the form that ran (1
// float32 AVX-512, 2 bf16, 3 portable float32, 4 float32 AVX2), -1 on bad arguments, -2 out of
// memory.
SDRT_API int32_t sdrt_attention_f32(const float* q, const float* k, const float* v, float* out, int64_t b,
                                    int64_t s, int64_t l, int64_t heads, int64_t d, float scale, int32_t math);

// 3x3 convolution, padding 1, stride 1, NCHW float32, by Winograd's F(4x4, 3x3): y [n, k, h, w] =
// conv(x [n, c, h, w], w [k, c, 3, 3]) + bias [k] (bias may be null). One thread; `portable`
// forces the portable product kernel. Returns 1 when the AVX2/FMA kernel ran, 0 the portable one,
// -1 on bad arguments, -2 out of memory.
SDRT_API int32_t sdrt_conv3x3_f32(const float* x, const float* w, const float* bias, float* y, int64_t n,
                                  int64_t c, int64_t h, int64_t width, int64_t k, int32_t portable);

#ifdef __cplusplus
}
#endif
