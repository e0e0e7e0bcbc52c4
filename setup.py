"""Builds minqlora._C: the C++ CPU kernels always, the CUDA kernels when torch has CUDA and nvcc is found.

MINQLORA_CUDA=0 forces a CPU-only build. TORCH_CUDA_ARCH_LIST picks GPU targets (default: the GPU present);
Hopper gets sm_90a so kernels may use its own instructions. Install with
`pip install --no-build-isolation -e .` so the build uses the torch already installed.
"""

import glob
import os
import subprocess

import torch
from setuptools import setup
from torch.utils import cpp_extension

here = os.path.dirname(os.path.abspath(__file__))
want_cuda = os.environ.get("MINQLORA_CUDA", "1") != "0"
with_cuda = want_cuda and cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None


def shared_cxx_runtime() -> list[str]:
    """Link the C++ runtime as the shared libstdc++.so.6 the process already has loaded. A toolchain that ships
    only a static libstdc++ (seen on the GPU machine: /opt/gcc's g++ 13) otherwise links a private copy into _C,
    whose locale is never initialized: the first number TORCH_CHECK formats into an error message segfaulted."""
    cxx = os.environ.get("CXX", "c++")
    try:
        found = subprocess.run([cxx, "-print-file-name=libstdc++.so"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return []
    return [] if os.path.isabs(found) else ["-l:libstdc++.so.6"]


sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
# -ffp-contract=off: no fused multiply-add, so float32 results round exactly like the reference in quant.py.
cxx = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=off", "-DPy_LIMITED_API=0x03090000"]
extra = {"cxx": cxx}
ext_cls = cpp_extension.CppExtension
if with_cuda:
    sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    ext_cls = cpp_extension.CUDAExtension
    # --fmad=false for the same reason as -ffp-contract=off; kernels that want FMAs ask for them explicitly.
    extra["nvcc"] = ["-O3", "-std=c++17", "--fmad=false", "-lineinfo", "--expt-relaxed-constexpr"]
    if "TORCH_CUDA_ARCH_LIST" not in os.environ:
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            arch = f"{major}.{minor}" + ("a" if (major, minor) == (9, 0) else "")
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch

setup(
    ext_modules=[ext_cls("minqlora._C", sources, extra_compile_args=extra,
                         extra_link_args=["-fopenmp", *shared_cxx_runtime()], py_limited_api=True)],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
