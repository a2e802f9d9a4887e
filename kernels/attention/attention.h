// Attention over fused heads, the CPU kernel of ai.sdrt.Attention (and of the ctypes entry point):
// out = softmax(scale * q k^T) v per (batch item, head), with q [b, s, h*d], k and v [b, l, h*d],
// out [b, s, h*d] -- com.microsoft.MultiHeadAttention's layout without masks or biases, which is
// what the UNet's self- and cross-attention need.
#pragma once
#include <cstdint>
#include <vector>

namespace sdrt {

struct AttentionShape {
  int64_t b = 0, s = 0, l = 0, heads = 0, d = 0;
  float scale = 0.0f;  // 0: 1/sqrt(d)
  bool valid() const { return b >= 0 && s >= 0 && l > 0 && heads > 0 && d > 0; }
  float softmax_scale() const;
};

// How the products are formed: bf16 operands with float32 sums (AVX-512 BF16's vdpbf16ps), or
// float32 throughout. kAuto and kBFloat16 take bf16 where the CPU has the instructions, float32
// elsewhere; kPortable and kFloat32Avx2 name the float32 forms of CPUs without AVX-512 (for tests
// on CPUs that have it; kFloat32Avx2 is portable where the CPU lacks AVX2/FMA).
enum class AttentionMath { kAuto = 0, kFloat32 = 1, kBFloat16 = 2, kPortable = 3, kFloat32Avx2 = 4 };

// The code that runs a call: 1 float32 (AVX-512 F), 2 bf16 (AVX-512 BF16), 3 portable float32,
// 4 float32 AVX2/FMA
enum class AttentionForm { kFloat32 = 1, kBFloat16 = 2, kPortable = 3, kFloat32Avx2 = 4 };

// True when this CPU runs the bf16 form (AVX-512 F/BW/DQ/VL and BF16).
bool attention_bf16_supported();

// One call's work: pack_task() for every task in [0, pack_tasks()) (K and V rearranged per
// (batch item, head)), then run_task() for every task in [0, tasks()); the tasks of each phase are
// independent (any order, any thread).
class AttentionJob {
 public:
  AttentionJob(const AttentionShape& shape, const float* q, const float* k, const float* v, float* out,
               AttentionMath math);
  AttentionForm form() const { return form_; }
  int64_t pack_tasks() const { return shape_.b * shape_.heads; }
  void pack_task(int64_t task);
  int64_t tasks() const;
  void run_task(int64_t task);

 private:
  using Form = AttentionForm;
  AttentionShape shape_;
  const float *q_, *k_, *v_;
  float* out_;
  float scale_;
  Form form_;
  int64_t row_tile_;  // query rows per task
  // AVX-512 packing (attention_avx512.inc): keys padded to 16, steps of the head size (a
  // dimension, or a bf16 pair), head size padded to 16; 32-bit units per head: K's, then V's.
  // AVX2 packing (attention_avx2.inc): keys padded to 16, head size padded to 8 in V
  int64_t lpad_ = 0, steps_ = 0, dpad_ = 0, k_units_ = 0, head_units_ = 0;
  std::vector<uint32_t> packed_;  // per (item, head): K then V (portable form: K transposed)
  void run_portable(int64_t bh, int64_t row0, int64_t rows);
  void run_avx2(int64_t bh, int64_t row0, int64_t rows);
};

}  // namespace sdrt
