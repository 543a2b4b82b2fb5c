// Tensor-side argument handling shared by the group_norm_act drivers (csrc/cpu/group_norm_act.cpp and
// csrc/cuda/group_norm_act_launch.cpp): sizes, the scale/shift/source of the spatial variant, and the
// kernel family that reads every operand in place. Torch headers: never included by a .cu file.
#pragma once

#include "common/layout.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstddef>
#include <optional>

namespace vqfast {

using OptTensor = std::optional<at::Tensor>;

inline bool given(const OptTensor& t) { return t.has_value() && t->defined(); }

// Product of the sizes from dimension 2 on: the spatial positions of a norm operand.
inline int64_t spatial_numel(const at::Tensor& t) {
  int64_t S = 1;
  for (int64_t i = 2; i < t.dim(); ++i) S *= t.size(i);
  return S;
}

// Checks scale, shift and source (all given or none; vqfast.ops.group_norm_act) against x; returns the
// positions of scale/shift (0 without them).
inline int64_t spatial_positions(const at::Tensor& x, const OptTensor& scale, const OptTensor& shift,
                                 const OptTensor& source) {
  TORCH_CHECK(given(scale) == given(shift) && given(scale) == given(source),
              "group_norm_act: scale, shift and source come together or not at all");
  if (!given(scale)) return 0;
  TORCH_CHECK(scale->scalar_type() == at::kFloat && scale->is_contiguous() && scale->dim() == x.dim() &&
                  scale->size(0) == x.size(0) && scale->size(1) == x.size(1) && shift->sizes() == scale->sizes() &&
                  shift->scalar_type() == at::kFloat && shift->is_contiguous() && scale->device() == x.device() &&
                  shift->device() == x.device(),
              "group_norm_act: scale and shift must be float32, contiguous, (N, C, *small) on x's device");
  TORCH_CHECK(source->scalar_type() == at::kLong && source->is_contiguous() && source->device() == x.device() &&
                  source->numel() == spatial_numel(x),
              "group_norm_act: source must be int64 with one entry per spatial position of x");
  return spatial_numel(*scale);
}

// weight / bias as float32 (C,) contiguous on x's device, or undefined.
inline at::Tensor float_param(const OptTensor& p, const at::Tensor& x) {
  if (!given(p)) return at::Tensor();
  TORCH_CHECK(p->numel() == x.size(1) && p->device() == x.device(),
              "group_norm_act: weight and bias must have C elements on x's device");
  return p->to(at::kFloat).contiguous();
}

inline const float* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<float>() : nullptr; }

// Fills each operand's strides; true when the channels-last kernels read them all in place, false when
// the channels-first ones do. vqfast.native declines the layouts that neither family reads.
template <size_t K>
bool channels_last(const at::Tensor* const (&operands)[K], NormStrides (&strides)[K]) {
  bool first = true, last = true;
  for (size_t i = 0; i < K; ++i) {
    TORCH_CHECK(norm_strides(*operands[i], strides[i]), "group_norm_act: the spatial dimensions (strides ",
                operands[i]->strides(), ") do not merge into one");
    first &= channels_first_fits(strides[i]), last &= channels_last_fits(strides[i]);
  }
  TORCH_CHECK(first || last, "group_norm_act: x (strides ", operands[0]->strides(),
              "), its output and gradient are not all channels-first or all channels-last");
  return !first;
}

}  // namespace vqfast
