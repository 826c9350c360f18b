"""The emulated definitions of csrc/cuda/ptx.cuh (mma.sync m16n8k16 f16/bf16, ldmatrix x4 and
x4.trans, pack2) follow the PTX ISA fragment tables: tests/cpp/ptx_emulation_test.cpp applies
the tables independently, checks each wrapper against them and against a naive matmul, with
the 32 lanes of a warp as 32 threads. Built with the host compiler; no GPU involved."""
import os
import shutil
import subprocess

import pytest
import torch.utils.cpp_extension as cpp_extension

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_emulated_ptx_wrappers_follow_the_isa_fragment_layouts(tmp_path):
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        pytest.skip("no host C++ compiler (g++ or $CXX) to build the emulation test")
    binary = tmp_path / "ptx_emulation_test"
    includes = [f"-I{os.path.join(REPO, 'csrc')}"]
    includes += [f"-I{d}" for d in cpp_extension.include_paths()]
    build = subprocess.run(
        [compiler, "-std=c++20", "-O1", "-pthread", *includes,
         os.path.join(REPO, "tests", "cpp", "ptx_emulation_test.cpp"), "-o", str(binary)],
        capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout[-4000:]
