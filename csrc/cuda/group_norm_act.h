// group_norm_act on CUDA (group_norm_act.cu): raw pointers and a stream, no torch headers.
#pragma once

#include "common/layout.h"
#include "cuda/types.h"

#include <cuda_runtime_api.h>

namespace vqfast {
namespace cuda {

// x (N, C, S) in groups of C / G channels.
struct NormShape {
  int64_t N, C, S, G;  // batch, channels, spatial positions (merged), groups
  bool channels_last;  // elements visited channels fastest (every operand has c_stride 1), else positions
};

// The reductions' launch (group_norm_grid): each (n, c)'s positions are summed by `splits` blocks of
// `chunk` positions, a block taking `tile` channels at once, so that a warp reads consecutive addresses in
// either layout; the blocks' partial results are then merged in a fixed order (deterministic).
struct NormGrid {
  int64_t tile;    // channels per block: 32 when channels last (one per lane), else 1
  int64_t splits;  // blocks per (n, channel tile) (grid.y)
  int64_t chunk;   // positions per block, a multiple of the block's position rows
};
// About four blocks per SM where the shape allows, each reading at least 4096 elements.
NormGrid group_norm_grid(const NormShape& shape);

// MoVQ's SpatialNorm: the affine output times scale plus shift, both read at the latent's resolution.
struct SpatialArgs {
  const float* scale;     // (N, C, s) float32 contiguous, or null for the plain group norm
  const float* shift;     // as scale
  const int64_t* source;  // (S): the position of scale/shift that position p reads (nearest upsampling)
  int64_t s;              // positions of scale/shift
  // Backward only: grad_scale/grad_shift sum, for each small position j, the positions p with
  // source[p] == j in order (deterministic).
  const int64_t* order;  // the positions p sorted by source (stable)
  const int64_t* start;  // s + 1 segment bounds in order
  float* grad_scale;     // (N, C, s) float32, every element written
  float* grad_shift;     // as grad_scale
};

// An operand of the elementwise passes.
struct NormOperand {
  const void* data;     // its first element
  NormStrides strides;  // its (n, c, s) strides
};
// Elements a thread of the elementwise passes takes at once: 16 bytes' worth (one access per operand)
// when the inner dimension (channels when channels last, else positions) is a multiple of it and each
// operand's base is 16-byte aligned and its other strides multiples of it; else 1.
int group_norm_vector_width(DType dtype, const NormShape& shape, const NormOperand* operands, int count);

struct GroupNormFwdParams {
  DType dtype;            // of x and y
  NormShape shape;        // sizes, groups and visiting order
  const void* x;          // the input, read in place
  NormStrides x_strides;  // x's (n, c, s) strides
  void* y;                // the output, written in place
  NormStrides y_strides;  // y's strides
  const float* weight;    // (C) float32, or null (1)
  const float* bias;      // (C) float32, or null (0)
  SpatialArgs spatial;    // scale/shift, or scale null
  float eps;              // added to the variance
  bool silu;              // SiLU after the affine map, else none
  float* mean;            // (N, G) float32 output
  float* rstd;            // (N, G) float32 output
  float* work;            // group_norm_work_floats(shape, false) floats of scratch
};

struct GroupNormBwdParams {
  DType dtype;                 // of grad, x and grad_x
  NormShape shape;             // as the forward's
  const void* grad;            // the gradient of y, read in place
  NormStrides grad_strides;    // its strides
  const void* x;               // the forward's input
  NormStrides x_strides;       // its strides
  void* grad_x;                // written in place, x's dtype
  NormStrides grad_x_strides;  // its strides
  const float* weight;         // as the forward's
  const float* bias;           // as the forward's
  SpatialArgs spatial;         // as the forward's, with order/start/grad_scale/grad_shift
  const float* mean;           // (N, G) from the forward
  const float* rstd;           // (N, G) from the forward
  bool silu;                   // as the forward's
  float* grad_weight;          // (C) float32, whether or not the op had a weight
  float* grad_bias;            // (C) float32, whether or not the op had a bias
  float* work;                 // group_norm_work_floats(shape, true) floats of scratch
};

int64_t group_norm_work_floats(const NormShape& shape, bool backward);
cudaError_t group_norm_act(const GroupNormFwdParams& p, cudaStream_t stream);
cudaError_t group_norm_act_backward(const GroupNormBwdParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace vqfast
