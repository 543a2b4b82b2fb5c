// Launchers of the CUDA kernels (csrc/cuda/*.cu): raw pointers, sizes and a cudaStream_t, no torch
// headers, so that nvcc compile-checks the kernels without torch; csrc/cuda/<op>_launch.cpp turn tensors
// into these calls. Sizes and offsets are int64 throughout.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace vqfast {
namespace cuda {

enum class DType { Float, Half, BFloat16 };

// A tensor seen as rows along a dimension, as vqfast::Rows (csrc/cpu/rows.h).
struct RowsView {
  int64_t outer, inner, outer_stride, inner_stride, d_stride;
};

// A (K, D) codebook with its strides.
struct CodebookView {
  const void* data;
  int64_t K, D, stride0, stride1;
};

// nearest_code splits the codebook among `splits` blocks per row block when rows alone would leave
// the GPU idle; the launcher then needs partial results of rows * splits floats and int64s.
int64_t nearest_code_splits(int64_t rows, int64_t K);
cudaError_t nearest_code(DType dtype, const void* z, RowsView zr, CodebookView cb, int64_t splits,
                         float* part_dist, int64_t* part_index, int64_t* out, cudaStream_t stream);

// codebook_gather: out (contiguous, code dimension at the position `rows` describes) = codebook[index].
cudaError_t codebook_gather(DType dtype, const int64_t* index, CodebookView cb, void* out, RowsView rows,
                            cudaStream_t stream);

// Scatter-add of rows into a (K, D) float32 gradient. Deterministic form: rows ordered by code
// (order, a stable sort of the codes) and each code's segment [start[k], start[k + 1]) summed in order
// by one thread per element; atomic form: atomicAdd, in any order. `out` (float32) is zeroed first
// by the caller for the atomic form only.
cudaError_t codebook_gather_backward(DType dtype, const void* grad, RowsView rows, int64_t D, const int64_t* index,
                                     const int64_t* order, const int64_t* start, int64_t K, float* out,
                                     cudaStream_t stream);

// vector_quantize forward after the search: z_q = z + (q - z) in z's dtype and the loss from float32
// row sums reduced in a fixed order (part: one double per block of rows, vector_quantize_blocks()).
int64_t vector_quantize_blocks(int64_t rows);
cudaError_t vector_quantize(DType dtype, const void* z, RowsView zr, CodebookView cb, const int64_t* index,
                            void* z_q, RowsView qr, double* part, float w_z, float w_q, void* loss,
                            cudaStream_t stream);
// grad_z in z's dtype; grad_codebook as float32 into cb_grad by the deterministic form of
// codebook_gather_backward when order/start are given, else by atomics (cb_grad zeroed by the caller).
cudaError_t vector_quantize_backward(DType dtype, const void* grad_z_q, RowsView gr, const void* z, RowsView zr,
                                     CodebookView cb, const int64_t* index, const int64_t* order,
                                     const int64_t* start, float scale, float w_z, float w_q, void* grad_z,
                                     RowsView gzr, float* cb_grad, cudaStream_t stream);

// group_norm_act: x (N, C, S) read as NCHW-contiguous or channels-last, float32 statistics. Each group's
// reduction is split over several blocks (group_norm_splits) so batch-1 shapes fill the GPU; partial
// results combine in a fixed order (deterministic). work: group_norm_work_floats(shape) floats.
struct NormShape {
  int64_t N, C, S, G;
  bool channels_last;
};
// spatial_norm_act (MoVQ's SpatialNorm) when given: the affine output times scale plus shift, both
// (N, C, s) float32 read at source[p] (s entries) for spatial position p, the nearest upsampling. Its
// backward sums into grad_scale / grad_shift (float32, every element written) deterministically: for
// each small position j, the positions p with source[p] == j in order (order: a stable sort of source;
// start: s + 1 segment bounds).
struct SpatialArgs {
  const float* scale;
  const float* shift;
  const int64_t* source;
  int64_t s;
  const int64_t* order;
  const int64_t* start;
  float* grad_scale;
  float* grad_shift;
};
int64_t group_norm_splits(const NormShape& shape);
int64_t group_norm_work_floats(const NormShape& shape);
cudaError_t group_norm_act(DType dtype, const void* x, NormShape shape, const float* weight, const float* bias,
                           const SpatialArgs* spatial, float eps, bool silu, void* y, float* mean, float* rstd,
                           float* work, cudaStream_t stream);
// grad_x in x's dtype and layout; grad_weight and grad_bias (C) in float32, whether or not the op had them.
cudaError_t group_norm_act_backward(DType dtype, const void* grad, const void* x, NormShape shape, const float* weight,
                                    const float* bias, const SpatialArgs* spatial, const float* mean,
                                    const float* rstd, bool silu, void* grad_x, float* grad_weight, float* grad_bias,
                                    float* work, cudaStream_t stream);

}  // namespace cuda
}  // namespace vqfast
