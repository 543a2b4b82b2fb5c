// Tensor-level drivers of the GroupNorm kernels (group_norm_kernel.h): layouts, dtypes, outputs.
#pragma once

#include "cpu/group_norm_kernel.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include <limits>
#include <optional>
#include <tuple>

namespace vqfast {
namespace cpu {

enum class Layout { ChannelsFirst, ChannelsLast };

// The layout the kernels read x in; x itself when it already is one of them, else a contiguous copy.
inline std::pair<at::Tensor, Layout> kernel_layout(const at::Tensor& x) {
  if (x.is_contiguous()) return {x, Layout::ChannelsFirst};
  if (x.dim() >= 3 && x.movedim(1, -1).is_contiguous()) return {x, Layout::ChannelsLast};
  return {x.contiguous(), Layout::ChannelsFirst};
}

inline at::Tensor as_layout(const at::Tensor& t, Layout layout) {
  if (layout == Layout::ChannelsFirst) return t.contiguous();
  if (t.movedim(1, -1).is_contiguous()) return t;
  return t.movedim(1, -1).contiguous().movedim(-1, 1);
}

// An output shaped and laid out like `like` (torch.empty_like), and a tensor the kernel can write in
// `layout`: the same one unless empty_like chose another layout (x neither contiguous nor channels-last).
inline std::pair<at::Tensor, at::Tensor> output_like(const at::Tensor& like, const at::Tensor& kernel_in) {
  at::Tensor out = at::empty_like(like);
  if (out.strides() == kernel_in.strides()) return {out, out};
  return {out, at::empty_like(kernel_in)};
}

inline at::Tensor float_param(const std::optional<at::Tensor>& p) {
  return p.has_value() && p->defined() ? p->to(at::kFloat).contiguous() : at::Tensor();
}

inline const float* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<float>() : nullptr; }

inline gn::Shape shape_of(const at::Tensor& x, int64_t G) {
  const int64_t N = x.size(0), C = x.size(1);
  return {N, C, N * C ? x.numel() / (N * C) : 0, G};
}

template <bool SPATIAL>
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_forward(const at::Tensor& x_in, int64_t G,
                                                            const std::optional<at::Tensor>& weight,
                                                            const std::optional<at::Tensor>& bias, double eps,
                                                            bool silu, const gn::Spatial& sp) {
  TORCH_CHECK(x_in.dim() >= 2 && G > 0 && x_in.size(1) % G == 0, "group_norm_act: bad shape or num_groups");
  auto [x, layout] = kernel_layout(x_in);
  auto [y, y_kernel] = output_like(x_in, x);
  const gn::Shape sh = shape_of(x, G);
  at::Tensor mean = at::empty({sh.N, G}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({sh.N, G}, x.options().dtype(at::kFloat));
  if (sh.N == 0) return {y, mean, rstd};
  if (sh.S == 0) {  // as torch.native_group_norm: mean 0, rstd NaN
    mean.zero_();
    rstd.fill_(std::numeric_limits<float>::quiet_NaN());
    return {y, mean, rstd};
  }
  const at::Tensor w = float_param(weight), b = float_param(bias);
  dispatch_float(x.scalar_type(), "group_norm_act", [&](auto tag) {
    using T = decltype(tag);
    auto run = [&](auto silu_tag) {
      constexpr bool S = decltype(silu_tag)::value;
      if (layout == Layout::ChannelsFirst) {
        gn::forward_cf<T, S, SPATIAL>(x.const_data_ptr<T>(), y_kernel.data_ptr<T>(), sh, ptr_or_null(w),
                                      ptr_or_null(b), static_cast<float>(eps), mean.data_ptr<float>(),
                                      rstd.data_ptr<float>(), sp);
      } else {
        gn::forward_cl<T, S, SPATIAL>(x.const_data_ptr<T>(), y_kernel.data_ptr<T>(), sh, ptr_or_null(w),
                                      ptr_or_null(b), static_cast<float>(eps), mean.data_ptr<float>(),
                                      rstd.data_ptr<float>(), sp);
      }
    };
    if (silu) {
      run(std::true_type{});
    } else {
      run(std::false_type{});
    }
  });
  if (!y.is_same(y_kernel)) y.copy_(y_kernel);
  return {y, mean, rstd};
}

// (grad_x, grad_weight f32 (C), grad_bias f32 (C))
template <bool SPATIAL>
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_backward(const at::Tensor& grad, const at::Tensor& x_in,
                                                             const std::optional<at::Tensor>& weight,
                                                             const std::optional<at::Tensor>& bias,
                                                             const at::Tensor& mean_in, const at::Tensor& rstd_in,
                                                             bool silu, const gn::Spatial& sp) {
  auto [x, layout] = kernel_layout(x_in);
  const at::Tensor g = as_layout(grad.to(x.scalar_type()), layout);
  auto [gx, gx_kernel] = output_like(x_in, x);
  const int64_t G = mean_in.size(1);
  const gn::Shape sh = shape_of(x, G);
  at::Tensor gw = at::zeros({sh.C}, x.options().dtype(at::kFloat));
  at::Tensor gb = at::zeros({sh.C}, x.options().dtype(at::kFloat));
  if (sh.N == 0 || sh.S == 0) return {gx, gw, gb};
  const at::Tensor w = float_param(weight), b = float_param(bias);
  const at::Tensor mean = mean_in.to(at::kFloat).contiguous(), rstd = rstd_in.to(at::kFloat).contiguous();
  std::vector<double> pw(sh.N * sh.C), pb(sh.N * sh.C);
  dispatch_float(x.scalar_type(), "group_norm_act_backward", [&](auto tag) {
    using T = decltype(tag);
    auto run = [&](auto silu_tag) {
      constexpr bool S = decltype(silu_tag)::value;
      auto kernel = layout == Layout::ChannelsFirst ? gn::backward_cf<T, S, SPATIAL> : gn::backward_cl<T, S, SPATIAL>;
      kernel(g.const_data_ptr<T>(), x.const_data_ptr<T>(), gx_kernel.data_ptr<T>(), sh, ptr_or_null(w),
             ptr_or_null(b), mean.const_data_ptr<float>(), rstd.const_data_ptr<float>(), pw.data(), pb.data(), sp);
    };
    if (silu) {
      run(std::true_type{});
    } else {
      run(std::false_type{});
    }
  });
  if (!gx.is_same(gx_kernel)) gx.copy_(gx_kernel);
  float* gwp = gw.data_ptr<float>();
  float* gbp = gb.data_ptr<float>();
  for (int64_t c = 0; c < sh.C; ++c) {
    double sw = 0, sb = 0;
    for (int64_t n = 0; n < sh.N; ++n) sw += pw[n * sh.C + c], sb += pb[n * sh.C + c];
    gwp[c] = static_cast<float>(sw), gbp[c] = static_cast<float>(sb);
  }
  return {gx, gw, gb};
}

}  // namespace cpu
}  // namespace vqfast
