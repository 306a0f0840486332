"""Builds mixlora_ext._C with ninja.

CUDA kernels are built when PyTorch is a CUDA build and a CUDA toolkit (nvcc) is found; never
because a GPU happens to be visible. Overrides:
  MIXLORA_CUDA=0            build the CPU kernels only
  MIXLORA_CUDA=1            require the CUDA kernels (fail if they cannot be built)
  TORCH_CUDA_ARCH_LIST      architectures, default "8.0;9.0a"
  MAX_JOBS                  parallel compile jobs (ninja)
"""
import glob
import os
import sys

import torch
from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0a"


def _want_cuda():
    forced = os.environ.get("MIXLORA_CUDA", "").strip()
    has_toolkit = cpp_extension.CUDA_HOME is not None
    if forced == "0":
        return False, "MIXLORA_CUDA=0"
    if torch.version.cuda is None:
        reason = f"PyTorch {torch.__version__} is a CPU build"
    elif not has_toolkit:
        reason = "no CUDA toolkit (nvcc) was found; set CUDA_HOME"
    else:
        return True, f"PyTorch {torch.__version__} (CUDA {torch.version.cuda}), nvcc in {cpp_extension.CUDA_HOME}"
    if forced == "1":
        raise RuntimeError(f"MIXLORA_CUDA=1 but the CUDA kernels cannot be built: {reason}")
    return False, reason


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", pattern)))


# Link the C++ runtime as a shared library, named before the driver's own -lstdc++: on the
# device image (Ubuntu, gcc 13, torch 2.11) the extension came out with libstdc++'s code inside
# it, and the first integer streamed into an error message (TORCH_CHECK) crashed the process
# with a segmentation fault in that copy's locale code (bench/NOTES.md v7). Harmless where the
# link was already dynamic.
LINK_ARGS = ["-fopenmp"] + (["-l:libstdc++.so.6"] if sys.platform.startswith("linux") else [])


def _extension():
    use_cuda, reason = _want_cuda()
    # *_cpu.cpp: CPU kernels; *_composite.cpp: ops composed of the others, for every backend.
    sources = _sources("registration.cpp") + _sources("*/*_cpu.cpp") + _sources("*/*_composite.cpp")
    cxx_flags = ["-O3", "-fopenmp"]  # the C++ standard is the one torch asks for
    define_macros = [("Py_LIMITED_API", "0x03090000")]
    if not use_cuda:
        print(f"mixlora_ext: building CPU kernels only ({reason})", flush=True)
        return cpp_extension.CppExtension(
            "mixlora_ext._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=LINK_ARGS,
            define_macros=define_macros, py_limited_api=True,
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    print(f"mixlora_ext: building CPU and CUDA kernels for {os.environ['TORCH_CUDA_ARCH_LIST']} ({reason})", flush=True)
    cuda_version = int(torch.version.cuda.split(".")[0]) * 1000 + int(torch.version.cuda.split(".")[1]) * 10
    define_macros += [("MIXLORA_WITH_CUDA", None), ("MIXLORA_CUDA_VERSION", str(cuda_version))]
    sources += _sources("*/*_cuda.cpp") + _sources("*/*_kernels.cu")
    return cpp_extension.CUDAExtension(
        "mixlora_ext._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
        extra_link_args=LINK_ARGS, define_macros=define_macros, py_limited_api=True,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
