"""Builds cabattn._C: the CPU kernels always, the CUDA kernels when torch and nvcc support them.

    python setup.py build_ext --inplace      (or: pip install --no-build-isolation -e .)

CABATTN_CPU_ONLY=1 skips the CUDA sources for quick local rebuilds. TORCH_CUDA_ARCH_LIST picks
the GPU architectures (default: sm_80 and sm_90, plus PTX for newer cards).
"""
import glob
import os
import sys

# torch derives CUDA_HOME from `which nvcc` when unset; on machines where nvcc is a wrapper in
# /usr/local/bin that lands on /usr/local, which has no toolkit. Decide before torch looks.
if "CUDA_HOME" not in os.environ and os.path.isdir("/usr/local/cuda"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")

import torch  # noqa: E402
from setuptools import find_packages, setup  # noqa: E402
from torch.utils.cpp_extension import (CUDA_HOME, BuildExtension, CppExtension,  # noqa: E402
                                       CUDAExtension)

HERE = os.path.dirname(os.path.abspath(__file__))


def cuda_wanted() -> bool:
    if os.environ.get("CABATTN_CPU_ONLY", "0") == "1":
        print("cabattn: CABATTN_CPU_ONLY=1, building the CPU kernels only", file=sys.stderr)
        return False
    if torch.version.cuda is None or CUDA_HOME is None:
        print(f"cabattn: building the CPU kernels only (torch CUDA={torch.version.cuda}, "
              f"CUDA_HOME={CUDA_HOME})", file=sys.stderr)
        return False
    return True


def wheel_cuda_includes() -> list:
    """CUDA headers ATen includes (cublas_v2.h, cusparse.h) that a bare toolkit may lack but
    the torch wheel's nvidia packages ship."""
    found = []
    for site in sys.path:
        found += glob.glob(os.path.join(site, "nvidia", "cu*", "include"))
    return sorted(set(found))[:1]


def extension():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    # torch >= 2.10 headers require C++20. -fopenmp: at::parallel_for runs serially unless the
    # extension itself is compiled with OpenMP (ATen/ParallelOpenMP.h keys on _OPENMP).
    cxx = ["-O3", "-std=c++20", "-fopenmp"]
    link = ["-fopenmp"]
    if not cuda_wanted():
        return CppExtension("cabattn._C", sources, extra_compile_args={"cxx": cxx},
                            extra_link_args=link,
                            include_dirs=[os.path.join(HERE, "csrc")], py_limited_api=False)
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo",
            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__"]
    print(f"cabattn: building CPU and CUDA kernels for TORCH_CUDA_ARCH_LIST="
          f"{os.environ['TORCH_CUDA_ARCH_LIST']} with {CUDA_HOME}", file=sys.stderr)
    return CUDAExtension("cabattn._C", sources,
                         extra_compile_args={"cxx": cxx + ["-DCABATTN_WITH_CUDA"], "nvcc": nvcc},
                         extra_link_args=link,
                         include_dirs=[os.path.join(HERE, "csrc")] + wheel_cuda_includes())


setup(
    packages=find_packages(include=["cabattn", "cabattn.*", "eval", "eval.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
