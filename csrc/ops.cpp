// vqfast._C: operator schemas (namespace vqfast_C) and the Python module that registers them.
//
// Importing vqfast._C loads this library, whose static initializers register the schemas below and
// the CPU (csrc/cpu/) and, when built against a CUDA torch, CUDA (csrc/cuda/*_launch.cpp) kernels.
// Each schema is the lowered signature of vqfast/ops/<op>.py (the contract: vqfast.ops), so
// vqfast/native registers torch.ops.vqfast_C.<op> as the backend's implementation as it is.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(vqfast_C, m) {
  m.def("nearest_code(Tensor z, Tensor codebook, int dim) -> Tensor");
  m.def("codebook_gather(Tensor indices, Tensor codebook, int dim) -> Tensor");
  m.def("codebook_gather_backward(Tensor grad, Tensor indices, int num_codes, int dim) -> Tensor");
  m.def(
      "vector_quantize(Tensor z, Tensor codebook, float w_z, float w_q, int dim)"
      " -> (Tensor z_q, Tensor loss, Tensor indices)");
  m.def(
      "vector_quantize_stats(Tensor z, Tensor codebook, float w_z, float w_q, int dim)"
      " -> (Tensor z_q, Tensor loss, Tensor indices, Tensor counts, Tensor sums)");
  m.def(
      "vector_quantize_backward(Tensor grad_z_q, Tensor grad_loss, Tensor z, Tensor codebook, Tensor indices,"
      " float w_z, float w_q, int dim) -> (Tensor grad_z, Tensor grad_codebook)");
  m.def(
      "group_norm_act(Tensor x, int num_groups, Tensor? weight, Tensor? bias, Tensor? scale, Tensor? shift,"
      " Tensor? source, float eps, bool silu) -> (Tensor y, Tensor mean, Tensor rstd)");
  m.def(
      "group_norm_act_backward(Tensor grad, Tensor x, Tensor? weight, Tensor? bias, Tensor? scale, Tensor? shift,"
      " Tensor? source, Tensor mean, Tensor rstd, bool silu)"
      " -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias, Tensor grad_scale, Tensor grad_shift)");
}

namespace {

PyObject* has_cuda(PyObject*, PyObject*) {
#ifdef VQFAST_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyObject* cpu_capability(PyObject*, PyObject*) {
#if defined(CPU_CAPABILITY_AVX512)
  return PyUnicode_FromString("AVX512");
#elif defined(CPU_CAPABILITY_AVX2)
  return PyUnicode_FromString("AVX2");
#else
  return PyUnicode_FromString("DEFAULT");
#endif
}

PyMethodDef methods[] = {
    {"has_cuda", has_cuda, METH_NOARGS, "Whether vqfast._C was built with its CUDA kernels."},
    {"cpu_capability", cpu_capability, METH_NOARGS, "The vector instruction set the CPU kernels use."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "vqfast's compiled kernels", -1, methods};

}  // namespace

extern "C" __attribute__((visibility("default"))) PyObject* PyInit__C() { return PyModule_Create(&module); }
