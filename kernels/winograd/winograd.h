// 3x3 convolution by Winograd's minimal filtering F(4x4, 3x3), the CPU kernel of ai.sdrt.Conv3x3
// (and of the ctypes entry point): y = conv(x, w, padding 1, stride 1) + bias, NCHW, float32.
//
// Each 4x4 block of output pixels (a tile) is computed from the 6x6 input patch around it: the
// patch and the 3x3 filter are taken to a 6x6 transform domain (V = B^T d B, U = G g G^T), where
// the convolution is an element-wise product summed over input channels -- 36 independent
// matrix products M[xi] = V[xi] (tiles x channels in) . U[xi] (channels in x channels out) --
// and the result is taken back (Y = A^T M A). That is 36 multiply-adds per tile and channel pair
// where the direct convolution does 16 x 9 = 144: 4x fewer. The transforms cost O(channels x
// tiles) and O(channels in x channels out) (the filters are transformed on every call: the op
// keeps no copy of the weights, so merged LoRA weights and refits need nothing), against the
// products' O(channels in x channels out x tiles).
//
// The products run a register-blocked kernel (6 tiles x 16 output channels in AVX2 FMA
// registers; a portable loop elsewhere); tiles go through in chunks so that the transformed
// input and the products stay a few MB.
#pragma once
#include <cstdint>
#include <vector>

namespace sdrt {

struct Conv3x3Shape {
  int64_t n = 0, c = 0, h = 0, w = 0, k = 0;  // batch, channels in, height, width, channels out
  bool valid() const { return n >= 0 && c > 0 && h >= 0 && w >= 0 && k > 0; }
};

// One call's work, in phases: filter_task for every task in [0, filter_tasks()); then for every
// chunk in [0, chunks()): input_task over [0, input_tasks(chunk)), product_task over
// [0, product_tasks(chunk)), output_task over [0, output_tasks(chunk)). The tasks of one phase
// are independent (any order, any thread); the phases run in this order.
class Conv3x3Job {
 public:
  // `scratch` holds the transformed filters, tiles and products (grown when too small; reusing
  // one across calls saves the allocation); `portable` forces the portable product kernel
  Conv3x3Job(const Conv3x3Shape& shape, const float* x, const float* w, const float* bias, float* y,
             std::vector<float>& scratch, bool portable = false);
  int64_t filter_tasks() const { return kblocks_; }
  void filter_task(int64_t task);
  int64_t chunks() const { return (tiles_ + chunk_tiles_ - 1) / chunk_tiles_; }
  int64_t input_tasks(int64_t chunk) const { return chunk_panels(chunk); }
  void input_task(int64_t chunk, int64_t task);
  int64_t product_tasks(int64_t chunk) const;
  void product_task(int64_t chunk, int64_t task);
  int64_t output_tasks(int64_t chunk) const { return chunk_panels(chunk); }
  void output_task(int64_t chunk, int64_t task);
  bool avx2() const { return avx2_; }

 private:
  Conv3x3Shape s_;
  const float *x_, *w_, *bias_;
  float* y_;
  bool avx2_;
  int64_t tiles_h_, tiles_w_, tiles_;  // tiles per image row / column, in all
  int64_t kblocks_, kpad_;             // 16-channel blocks of the output channels
  int64_t chunk_tiles_;                // tiles per chunk: a multiple of 6
  int64_t panels_per_task_;            // 6-tile panels per product task
  float* u_;  // [36][kblocks][c][16]: transformed filters, packed for the products
  float* v_;  // [36][chunk panels][c][6]: transformed input of one chunk
  float* m_;  // [36][chunk tiles][kpad]: products of one chunk
  int64_t chunk_panels(int64_t chunk) const;
};

// True when this CPU runs the AVX2/FMA product kernel.
bool conv3x3_avx2_supported();

}  // namespace sdrt
