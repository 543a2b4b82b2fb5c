// Layout and index helpers shared by the CPU kernels (csrc/cpu/) and the CUDA launchers and kernels
// (csrc/cuda/): tensors described by sizes and strides, read in place, never copied. No torch headers,
// so that nvcc compiles it into the kernels; the templates take anything with sizes() and strides().
#pragma once

#include <cstdint>
#include <type_traits>

#ifdef __CUDACC__
#define VQFAST_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define VQFAST_HOST_DEVICE inline
#endif

namespace vqfast {

VQFAST_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The most dimensions a tensor may keep once merged (Strided); more fail merge_dims.
constexpr int kMaxDims = 6;

// Elements in the row-major order of a tensor's sizes, as memory offsets. Dimensions of size 1 are
// dropped and neighbours whose strides step evenly are merged, so that contiguous, channels_last,
// transposed and expanded (stride 0) tensors usually come down to one or two dimensions.
struct Strided {
  int ndim = 0;                // merged dimensions, outermost first
  int64_t size[kMaxDims]{};    // their sizes
  int64_t stride[kMaxDims]{};  // their strides, in elements
  int64_t numel = 1;           // elements in all (0 when any size is 0)
  VQFAST_HOST_DEVICE int64_t offset(int64_t i) const {
    int64_t off = 0;
    for (int d = ndim - 1; d > 0; --d) {
      off += (i % size[d]) * stride[d];
      i /= size[d];
    }
    return ndim > 0 ? off + i * stride[0] : 0;
  }
};

// Fills `out` with the dimensions of (sizes, strides) other than `skip` (-1: none) merged; false when
// more than kMaxDims remain.
inline bool merge_dims(const int64_t* sizes, const int64_t* strides, int64_t ndim, int64_t skip, Strided& out) {
  out = Strided{};
  for (int64_t i = 0; i < ndim; ++i) {
    if (i == skip) continue;
    out.numel *= sizes[i];
    if (sizes[i] == 1) continue;
    if (out.ndim > 0 && out.stride[out.ndim - 1] == strides[i] * sizes[i]) {
      out.size[out.ndim - 1] *= sizes[i];
      out.stride[out.ndim - 1] = strides[i];
    } else if (out.ndim == kMaxDims) {
      return false;
    } else {
      out.size[out.ndim] = sizes[i];
      out.stride[out.ndim++] = strides[i];
    }
  }
  return true;
}

template <typename Tensor>
bool merge_dims(const Tensor& t, int64_t skip, Strided& out) {
  return merge_dims(t.sizes().data(), t.strides().data(), t.dim(), skip, out);
}

// A tensor seen as rows of D elements along one dimension: row r (the other dimensions in row-major
// order) starts at offset(r) and its elements are d_stride apart. NCHW latents with dim=1 are N * H * W
// rows ((N, H*W): two merged dimensions) of C elements H * W apart.
struct Rows {
  Strided rows;      // the dimensions other than the rows' own
  int64_t d_stride;  // between a row's elements
  VQFAST_HOST_DEVICE int64_t count() const { return rows.numel; }
  VQFAST_HOST_DEVICE int64_t offset(int64_t r) const { return rows.offset(r); }
};

template <typename Tensor>
bool rows_of(const Tensor& t, int64_t dim, Rows& out) {
  out.d_stride = t.stride(dim);
  return merge_dims(t, dim, out.rows);
}

// A group-norm operand (N, C, *spatial) with its spatial dimensions merged into one of S elements:
// element (n, c, s) is at n * n_stride + c * c_stride + s * s_stride. Channels-first kernels read
// runs along s (s_stride == 1), channels-last ones along c (c_stride == 1).
struct NormStrides {
  int64_t n_stride, c_stride, s_stride;
};

// False when the spatial dimensions do not merge into one. Size-1 dimensions get the stride their
// kernels' family asks for, so a (N, 1, H, W) or (N, C, 1, 1) tensor fits either family.
template <typename Tensor>
bool norm_strides(const Tensor& t, NormStrides& out) {
  Strided spatial;
  if (!merge_dims(t.sizes().data() + 2, t.strides().data() + 2, t.dim() - 2, -1, spatial) || spatial.ndim > 1) {
    return false;
  }
  out.n_stride = t.stride(0);
  out.c_stride = t.size(1) == 1 ? 1 : t.stride(1);
  out.s_stride = spatial.ndim == 0 ? 1 : spatial.stride[0];
  return true;
}

// Whether the kernels of a family can read it: channels-first (runs along s) or channels-last (along c).
VQFAST_HOST_DEVICE bool channels_first_fits(const NormStrides& t) { return t.s_stride == 1; }
VQFAST_HOST_DEVICE bool channels_last_fits(const NormStrides& t) { return t.c_stride == 1; }

// Calls f(a_tag, b_tag), the tags std::integral_constant<bool, ...>: two run-time flags made template
// arguments of the kernels (the group norms' SiLU and spatial scale/shift).
template <typename F>
void with_flags(bool a, bool b, F&& f) {
  auto with_b = [&](auto a_tag) {
    if (b) {
      f(a_tag, std::true_type{});
    } else {
      f(a_tag, std::false_type{});
    }
  };
  if (a) {
    with_b(std::true_type{});
  } else {
    with_b(std::false_type{});
  }
}

}  // namespace vqfast
