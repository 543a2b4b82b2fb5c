"""Builds vqfast and its compiled extension ``vqfast._C`` (csrc/).

``pip install --no-build-isolation -e .`` compiles csrc/ against the torch already installed, with
ninja: the C++ CPU kernels always, the CUDA kernels (csrc/cuda/) when that torch was built with CUDA
and nvcc is found. ``VQFAST_CPU_ARCH`` picks the CPU vector width: ``native`` (default: the widest of
AVX512 / AVX2 this machine has), ``avx512``, ``avx2`` or ``generic`` (portable, no -m flags).
``VQFAST_NO_CUDA=1`` leaves the CUDA kernels out even with a CUDA torch.
"""

import glob
import os
import platform

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _arch_args() -> list[str]:
    """at::vec picks its implementation from CPU_CAPABILITY_* macros; torch's own build compiles
    each kernel once per capability and dispatches at run time. The extension is built on the
    machine it runs on, so it is compiled once, for the widest vector unit this CPU has."""
    choice = os.environ.get("VQFAST_CPU_ARCH", "native").lower()
    if platform.machine().lower() not in ("x86_64", "amd64") or choice == "generic":
        return []
    flags = _cpu_flags()
    avx512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c"}
    avx2 = {"avx2", "fma", "f16c"}
    if choice == "avx512" or (choice == "native" and avx512 <= flags):
        bf16 = ["-mavx512bf16"] if "avx512_bf16" in flags else []
        return ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c", *bf16,
                "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    if choice == "avx2" or (choice == "native" and avx2 <= flags):
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return []


def _extensions():
    import torch
    from torch.utils import cpp_extension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-fvisibility=hidden", *_arch_args()]
    define_macros = []
    extension = cpp_extension.CppExtension
    with_cuda = (
        torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and os.environ.get("VQFAST_NO_CUDA", "0") in ("", "0")
    )
    extra = {"cxx": cxx}
    if with_cuda:
        extension = cpp_extension.CUDAExtension
        sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*_launch.cpp"))
        define_macros.append(("VQFAST_WITH_CUDA", None))
        extra["nvcc"] = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
    return [
        extension(
            "vqfast._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
        )
    ], cpp_extension.BuildExtension.with_options(use_ninja=True)


ext_modules, build_ext = _extensions()
setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
