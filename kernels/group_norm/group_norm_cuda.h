// GroupNorm (+ SiLU) on an NVIDIA GPU: the CUDA kernel behind the CUDA execution provider's
// ai.sdrt.GroupNorm (kernels/ort/custom_ops.cc built with SDRT_WITH_CUDA).
#pragma once
#include <cstdint>

#include "group_norm/group_norm.h"

namespace sdrt {

enum class GpuDtype : int { kFloat32 = 0, kFloat16 = 1 };

// y = GroupNorm(x) * gamma + beta (then SiLU with `silu`) for x, y in device memory, float32 or
// float16 (gamma and beta float32; statistics in float32 from values shifted by each group's
// first element), NCHW or NHWC, enqueued on `stream` (a cudaStream_t; null: the default stream).
// Returns 0, -1 for a shape GroupNorm cannot take, or the CUDA error code of the launch.
int group_norm_cuda(GpuDtype dtype, const void* x, const float* gamma, const float* beta, void* y,
                    const GroupNormShape& shape, float eps, bool silu, void* stream);

}  // namespace sdrt
