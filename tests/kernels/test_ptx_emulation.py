"""The tensor-core code on the CPU, built with the host compiler (no GPU, no nvcc):
- tests/cpp/ptx_emulation_test.cpp: csrc/cuda/ptx.cuh's emulated mma.sync m16n8k16 (f16/bf16),
  ldmatrix x4 / x4.trans, cp.async and pack2 follow the PTX ISA fragment tables (applied
  independently in the test) and give a naive matmul's result;
- tests/cpp/flash_tc_emulation_test.cpp: the fp16/bf16 block_sparse_attention and block_scores
  kernels of csrc/cuda/flash_tc.cuh, run through those wrappers, match a float64 reference.
The threads of a block run as std::threads (tests/cpp/block_threads.h)."""
import os
import shutil
import subprocess

import pytest
import torch.utils.cpp_extension as cpp_extension
from helpers import REPO

pytestmark = pytest.mark.slow  # (pyproject.toml: markers)



@pytest.mark.parametrize("program", ["ptx_emulation_test", "flash_tc_emulation_test"])
def test_tensor_core_code_runs_emulated(tmp_path, program):
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        pytest.skip("no host C++ compiler (g++ or $CXX) to build the emulation test")
    binary = tmp_path / program
    includes = [f"-I{os.path.join(REPO, 'csrc')}"]
    includes += [f"-I{d}" for d in cpp_extension.include_paths()]
    build = subprocess.run(
        [compiler, "-std=c++20", "-O2", "-pthread", *includes,
         os.path.join(REPO, "tests", "cpp", program + ".cpp"), "-o", str(binary)],
        capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout[-4000:]
