// GroupNorm (+ SiLU) on float32, the CPU kernel shared by the ctypes entry point and the
// ONNX Runtime custom op.
#pragma once
#include <cstdint>

namespace sdrt {

struct GroupNormShape {
  int64_t n = 0, c = 0, hw = 0, groups = 0;
  bool channels_last = false;
  bool valid() const { return n >= 0 && c > 0 && hw >= 0 && groups > 0 && c % groups == 0; }
};

// Normalises one (batch item, group) pair: statistics over its c/groups channels x hw pixels,
// then the per-channel affine and, with `silu`, x * sigmoid(x). `task` runs over
// [0, n * groups) for NCHW; over [0, n) for NHWC, where a task covers every group of one item.
void group_norm_task(const GroupNormShape& s, const float* x, const float* gamma, const float* beta, float* y,
                     float eps, bool silu, int64_t task);

// Number of independent tasks of group_norm_task for a shape.
inline int64_t group_norm_tasks(const GroupNormShape& s) { return s.channels_last ? s.n : s.n * s.groups; }

}  // namespace sdrt
