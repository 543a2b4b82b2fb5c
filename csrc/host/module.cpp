// vqfast._C_cuda_host: csrc/cuda/ built with the host compiler (csrc/host/cuda_device.h runs the kernels),
// its launchers registered for CPU tensors under the operator namespace vqfast_cuda_host, whose schemas
// vqfast.cuda_host copies from vqfast_C (csrc/ops.cpp). setup.py compiles each csrc/cuda/*.cu and
// *_launch.cpp in a translation unit of its own that includes it after cuda_device.h.
// The module also tells the launch grids and vector widths the launchers choose on the emulated device
// (an H100's 132 SMs), for tests of their size and paths, and lowers the largest index of the 32-bit
// kernels so that tests reach the 64-bit ones.
#include <Python.h>

#include <vector>

#include "host/cuda_device.h"  // before common.cuh, as in the kernels' translation units
#include "cuda/codebook_gather.h"
#include "cuda/common.cuh"
#include "cuda/group_norm_act.h"
#include "cuda/nearest_code.h"
#include "cuda/scatter_rows.cuh"
#include "cuda/vector_quantize.h"

namespace {

// nearest_code_grid(rows, K) -> (row blocks, splits, codes per split): the search's grid.
PyObject* nearest_code_grid(PyObject*, PyObject* args) {
  long long rows = 0, K = 0;
  if (!PyArg_ParseTuple(args, "LL", &rows, &K)) return nullptr;
  const vqfast::cuda::NearestCodeGrid g = vqfast::cuda::nearest_code_grid(rows, K);
  return Py_BuildValue("(LLL)", static_cast<long long>(g.row_blocks), static_cast<long long>(g.splits),
                       static_cast<long long>(g.span));
}

// vector_quantize_blocks(rows, D) -> blocks of vector_quantize's forward pass (after the search).
PyObject* vector_quantize_blocks(PyObject*, PyObject* args) {
  long long rows = 0, D = 0;
  if (!PyArg_ParseTuple(args, "LL", &rows, &D)) return nullptr;
  return PyLong_FromLongLong(vqfast::cuda::vector_quantize_blocks(rows, D));
}

// group_norm_grid(N, C, S, G, channels_last) -> (tile, splits, chunk): the group norm reductions' grid.
PyObject* group_norm_grid(PyObject*, PyObject* args) {
  long long N = 0, C = 0, S = 0, G = 0;
  int channels_last = 0;
  if (!PyArg_ParseTuple(args, "LLLLp", &N, &C, &S, &G, &channels_last)) return nullptr;
  const vqfast::cuda::NormGrid g = vqfast::cuda::group_norm_grid({N, C, S, G, channels_last != 0});
  return Py_BuildValue("(LLL)", static_cast<long long>(g.tile), static_cast<long long>(g.splits),
                       static_cast<long long>(g.chunk));
}

// The dtype of elements of `bytes` bytes (float32 or float16; bfloat16 takes float16's paths).
vqfast::cuda::DType dtype_of_size(int bytes) {
  return bytes == 4 ? vqfast::cuda::DType::Float : vqfast::cuda::DType::Half;
}

// group_norm_vector_width(element bytes, N, C, S, G, channels_last, [(address, n_stride, c_stride,
// s_stride), ...]) -> elements per thread of the elementwise passes on those operands.
PyObject* group_norm_vector_width(PyObject*, PyObject* args) {
  long long N = 0, C = 0, S = 0, G = 0;
  int bytes = 0, channels_last = 0;
  PyObject* list = nullptr;
  if (!PyArg_ParseTuple(args, "iLLLLpO!", &bytes, &N, &C, &S, &G, &channels_last, &PyList_Type, &list)) return nullptr;
  std::vector<vqfast::cuda::NormOperand> operands;
  for (Py_ssize_t i = 0; i < PyList_Size(list); ++i) {
    unsigned long long address = 0;
    long long n = 0, c = 0, s = 0;
    if (!PyArg_ParseTuple(PyList_GetItem(list, i), "KLLL", &address, &n, &c, &s)) return nullptr;
    operands.push_back({reinterpret_cast<const void*>(address), {n, c, s}});
  }
  return PyLong_FromLong(vqfast::cuda::group_norm_vector_width(dtype_of_size(bytes), {N, C, S, G, channels_last != 0},
                                                               operands.data(), static_cast<int>(operands.size())));
}

// codebook_gather_vector_width(element bytes, K, D, stride0, stride1, codebook address, out address,
// rows after the code dimension) -> elements per thread of the gather.
PyObject* codebook_gather_vector_width(PyObject*, PyObject* args) {
  int bytes = 0;
  long long K = 0, D = 0, stride0 = 0, stride1 = 0, inner = 0;
  unsigned long long codebook = 0, out = 0;
  if (!PyArg_ParseTuple(args, "iLLLLKKL", &bytes, &K, &D, &stride0, &stride1, &codebook, &out, &inner)) {
    return nullptr;
  }
  vqfast::cuda::CodebookGatherParams p{};
  p.dtype = dtype_of_size(bytes);
  p.cb = {reinterpret_cast<const void*>(codebook), K, D, stride0, stride1};
  p.out = reinterpret_cast<void*>(out);
  p.out_rows.d_stride = inner;
  return PyLong_FromLong(vqfast::cuda::codebook_gather_vector_width(p));
}

// scatter_grid(N, K, D) -> (chunk blocks, combine blocks, atomic blocks) of the codebook gradient's scatter.
PyObject* scatter_grid(PyObject*, PyObject* args) {
  long long N = 0, K = 0, D = 0;
  if (!PyArg_ParseTuple(args, "LLL", &N, &K, &D)) return nullptr;
  const vqfast::cuda::ScatterGrid g = vqfast::cuda::scatter_grid(N, K, D);
  return Py_BuildValue("(LLL)", static_cast<long long>(g.chunk_blocks), static_cast<long long>(g.combine_blocks),
                       static_cast<long long>(g.atomic_blocks));
}

// set_index32_limit(limit) -> the previous limit: launches whose largest index or offset exceeds it run
// the int64_t kernels (common.cuh's with_index).
PyObject* set_index32_limit(PyObject*, PyObject* args) {
  long long limit = 0;
  if (!PyArg_ParseTuple(args, "L", &limit)) return nullptr;
  const long long previous = vqfast::cuda::index32_limit();
  vqfast::cuda::index32_limit() = limit;
  return PyLong_FromLongLong(previous);
}

PyMethodDef methods[] = {
    {"nearest_code_grid", nearest_code_grid, METH_VARARGS, "(row blocks, splits, codes per split) of the search"},
    {"vector_quantize_blocks", vector_quantize_blocks, METH_VARARGS, "blocks of vector_quantize's forward pass"},
    {"group_norm_grid", group_norm_grid, METH_VARARGS, "(tile, splits, chunk) of the group norm reductions"},
    {"group_norm_vector_width", group_norm_vector_width, METH_VARARGS,
     "elements per thread of group norm's elementwise passes"},
    {"codebook_gather_vector_width", codebook_gather_vector_width, METH_VARARGS,
     "elements per thread of codebook_gather"},
    {"scatter_grid", scatter_grid, METH_VARARGS, "(chunk, combine, atomic) blocks of the codebook gradient's scatter"},
    {"set_index32_limit", set_index32_limit, METH_VARARGS, "sets the largest index of the 32-bit kernels"},
    {nullptr, nullptr, 0, nullptr},
};
PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_cuda_host", "vqfast's CUDA kernels run on the host", -1, methods};

}  // namespace

extern "C" __attribute__((visibility("default"))) PyObject* PyInit__C_cuda_host() { return PyModule_Create(&module); }
