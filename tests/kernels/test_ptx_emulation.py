"""The tensor-core code on the CPU, built with the host compiler (no GPU, no nvcc) against the
emulation layer (csrc/emu: cuda_emu.h and its runtime.cpp, as setup.py builds cabattn._emu):
- tests/cpp/ptx_emulation_test.cpp: csrc/cuda/ptx.cuh's emulated mma.sync m16n8k16 (f16/bf16),
  ldmatrix x4 / x4.trans, cp.async and pack2 follow the PTX ISA fragment tables (applied
  independently in the test) and give a naive matmul's result;
- tests/cpp/flash_tc_emulation_test.cpp: the fp16/bf16 block_sparse_attention and block_scores
  kernels of csrc/cuda/flash_tc.cuh, run through those wrappers, match a float64 reference."""
import os
import shutil
import subprocess

import pytest
import torch.utils.cpp_extension as cpp_extension
from helpers import REPO

pytestmark = pytest.mark.slow  # (pyproject.toml: markers)

# setup.py's flags of the emulated build (emulated_extension), without OpenMP: one block at a
# time.
EMU_FLAGS = ["-std=c++20", "-O2", "-DCABATTN_EMU", "-fno-strict-aliasing",
             "-fno-extern-tls-init", "-Wno-unknown-pragmas"]


@pytest.fixture(scope="module")
def emulation_runtime(tmp_path_factory):
    """The compiler, its flags and csrc/emu/runtime.cpp compiled once for both programs."""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        pytest.skip("no host C++ compiler (g++ or $CXX) to build the emulation test")
    flags = EMU_FLAGS + [f"-I{os.path.join(REPO, 'csrc')}"]
    flags += [f"-I{d}" for d in cpp_extension.include_paths()]
    runtime = tmp_path_factory.mktemp("emu") / "runtime.o"
    build = subprocess.run(
        [compiler, *flags, "-c", os.path.join(REPO, "csrc", "emu", "runtime.cpp"), "-o",
         str(runtime)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-4000:]
    return compiler, flags, runtime


@pytest.mark.parametrize("program", ["ptx_emulation_test", "flash_tc_emulation_test"])
def test_tensor_core_code_runs_emulated(tmp_path, emulation_runtime, program):
    compiler, flags, runtime = emulation_runtime
    binary = tmp_path / program
    libraries = cpp_extension.library_paths()
    build = subprocess.run(
        [compiler, *flags, os.path.join(REPO, "tests", "cpp", program + ".cpp"), str(runtime),
         "-o", str(binary), *[f"-L{d}" for d in libraries],
         *[f"-Wl,-rpath,{d}" for d in libraries], "-lc10", "-ltorch_cpu"],
        capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), \
        run.stdout[-4000:] + run.stderr[-4000:]
