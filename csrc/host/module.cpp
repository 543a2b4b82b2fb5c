// vqfast._C_cuda_host: csrc/cuda/ built with the host compiler (csrc/host/cuda_device.h runs the kernels),
// its launchers registered for CPU tensors under the operator namespace vqfast_cuda_host, whose schemas
// vqfast.cuda_host copies from vqfast_C (csrc/ops.cpp). setup.py compiles each csrc/cuda/*.cu and
// *_launch.cpp in a translation unit of its own that includes it after cuda_device.h.
#include <Python.h>

namespace {
PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_cuda_host", "vqfast's CUDA kernels run on the host", -1, nullptr};
}  // namespace

extern "C" __attribute__((visibility("default"))) PyObject* PyInit__C_cuda_host() { return PyModule_Create(&module); }
