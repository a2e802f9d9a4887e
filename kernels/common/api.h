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

// Version of the kernels ABI; bumped when an entry point changes.
SDRT_API int32_t sdrt_kernels_abi_version(void);

// GroupNorm over x[n, c, h*w] (NCHW) or x[n, h*w, c] (NHWC), per-channel affine, then SiLU if
// `silu` is non-zero. Statistics in double per group. Returns 0, or -1 on bad arguments.
SDRT_API int32_t sdrt_group_norm_f32(const float* x, const float* gamma, const float* beta, float* y,
                                     int64_t n, int64_t c, int64_t hw, int64_t groups, float eps,
                                     int32_t channels_last, int32_t silu);

#ifdef __cplusplus
}
#endif
