// group_norm_act on the CPU: act((group_norm(x) * weight + bias) [* up(scale) + up(shift)]), forward and
// backward; the optional scale/shift make it MoVQ's SpatialNorm, read at the latent's resolution through
// `source` (nearest upsampling inside the kernel). Kernels in group_norm_kernel.h; here, tensors.
#include "common/group_norm_args.h"
#include "cpu/group_norm_kernel.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <tuple>

namespace vqfast {
namespace cpu {
namespace {

gn::Shape shape_of(const at::Tensor& x, int64_t G) { return {x.size(0), x.size(1), spatial_numel(x), G}; }

template <typename T>
gn::View<T> view(const at::Tensor& t, const NormStrides& st) {
  return {static_cast<T*>(t.data_ptr()), st};
}

// The kernels' view of scale, shift and source.
gn::Spatial spatial_args(const at::Tensor& x, const OptTensor& scale, const OptTensor& shift,
                         const OptTensor& source) {
  gn::Spatial sp;
  sp.s = spatial_positions(x, scale, shift, source);
  if (!given(scale)) return sp;
  sp.scale = scale->const_data_ptr<float>();
  sp.shift = shift->const_data_ptr<float>();
  sp.src = source->const_data_ptr<int64_t>();
  return sp;
}

// Calls f(T{}, silu_tag, spatial_tag) for x's dtype.
template <typename F>
void dispatch(const at::Tensor& x, const char* name, bool silu, bool spatial, F&& f) {
  dispatch_float(x.scalar_type(), name, [&](auto tag) {
    with_flags(silu, spatial, [&](auto silu_tag, auto spatial_tag) { f(tag, silu_tag, spatial_tag); });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_act(const at::Tensor& x, int64_t num_groups,
                                                              const OptTensor& weight, const OptTensor& bias,
                                                              const OptTensor& scale, const OptTensor& shift,
                                                              const OptTensor& source, double eps, bool silu) {
  TORCH_CHECK(x.device().is_cpu(), "group_norm_act: CPU tensors expected");
  TORCH_CHECK(x.dim() >= 2 && num_groups > 0 && x.size(1) % num_groups == 0,
              "group_norm_act: x must be (N, C, *spatial) with C divisible by num_groups");
  const gn::Shape sh = shape_of(x, num_groups);
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({sh.N, sh.G}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({sh.N, sh.G}, x.options().dtype(at::kFloat));
  const gn::Spatial sp = spatial_args(x, scale, shift, source);
  if (sh.N == 0 || sh.C == 0) return {y, mean, rstd};
  if (sh.S == 0) {  // as torch.native_group_norm: mean 0, rstd NaN
    mean.zero_();
    rstd.fill_(std::numeric_limits<float>::quiet_NaN());
    return {y, mean, rstd};
  }
  NormStrides st[2];
  const bool last = channels_last({&x, &y}, st);
  const at::Tensor w = float_param(weight, x), b = float_param(bias, x);
  dispatch(x, "group_norm_act", silu, given(scale), [&](auto tag, auto silu_tag, auto spatial_tag) {
    using T = decltype(tag);
    constexpr bool SILU = decltype(silu_tag)::value, SPATIAL = decltype(spatial_tag)::value;
    auto kernel = last ? gn::forward_cl<T, SILU, SPATIAL> : gn::forward_cf<T, SILU, SPATIAL>;
    kernel(view<const T>(x, st[0]), view<T>(y, st[1]), sh, ptr_or_null(w), ptr_or_null(b), static_cast<float>(eps),
           mean.data_ptr<float>(), rstd.data_ptr<float>(), sp);
  });
  return {y, mean, rstd};
}

// (grad_x, grad_weight, grad_bias, grad_scale, grad_shift); grad_scale/grad_shift are empty (0,) tensors
// without scale.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_act_backward(
    const at::Tensor& grad, const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& scale, const OptTensor& shift, const OptTensor& source, const at::Tensor& mean_in,
    const at::Tensor& rstd_in, bool silu) {
  TORCH_CHECK(x.device().is_cpu() && grad.device().is_cpu(), "group_norm_act_backward: CPU tensors expected");
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(),
              "group_norm_act_backward: grad must have x's shape and dtype");
  const gn::Shape sh = shape_of(x, mean_in.size(1));
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor gx = at::empty_like(x);
  at::Tensor gw = at::zeros({sh.C}, f32), gb = at::zeros({sh.C}, f32);
  gn::Spatial sp = spatial_args(x, scale, shift, source);
  const bool spatial = given(scale);
  at::Tensor g_scale = spatial ? at::zeros(scale->sizes(), f32) : at::empty({0}, f32);
  at::Tensor g_shift = spatial ? at::zeros(scale->sizes(), f32) : at::empty({0}, f32);
  sp.grad_scale = g_scale.data_ptr<float>();
  sp.grad_shift = g_shift.data_ptr<float>();
  if (sh.N == 0 || sh.C == 0 || sh.S == 0) return {gx, gw, gb, g_scale, g_shift};
  NormStrides st[3];
  const bool last = channels_last({&grad, &x, &gx}, st);
  const at::Tensor w = float_param(weight, x), b = float_param(bias, x);
  const at::Tensor mean = mean_in.to(at::kFloat).contiguous(), rstd = rstd_in.to(at::kFloat).contiguous();
  std::vector<double> pw(sh.N * sh.C), pb(sh.N * sh.C);  // per (n, c) partial sums
  dispatch(x, "group_norm_act_backward", silu, spatial, [&](auto tag, auto silu_tag, auto spatial_tag) {
    using T = decltype(tag);
    constexpr bool SILU = decltype(silu_tag)::value, SPATIAL = decltype(spatial_tag)::value;
    auto kernel = last ? gn::backward_cl<T, SILU, SPATIAL> : gn::backward_cf<T, SILU, SPATIAL>;
    kernel(view<const T>(grad, st[0]), view<const T>(x, st[1]), view<T>(gx, st[2]), sh, ptr_or_null(w),
           ptr_or_null(b), mean.const_data_ptr<float>(), rstd.const_data_ptr<float>(), pw.data(), pb.data(), sp);
  });
  float* gwp = gw.data_ptr<float>();
  float* gbp = gb.data_ptr<float>();
  for (int64_t c = 0; c < sh.C; ++c) {
    double sw = 0, sb = 0;
    for (int64_t n = 0; n < sh.N; ++n) sw += pw[n * sh.C + c], sb += pb[n * sh.C + c];
    gwp[c] = static_cast<float>(sw), gbp[c] = static_cast<float>(sb);
  }
  return {gx, gw, gb, g_scale, g_shift};
}

}  // namespace
}  // namespace cpu
}  // namespace vqfast

TORCH_LIBRARY_IMPL(vqfast_C, CPU, m) {
  m.impl("group_norm_act", &vqfast::cpu::group_norm_act);
  m.impl("group_norm_act_backward", &vqfast::cpu::group_norm_act_backward);
}
