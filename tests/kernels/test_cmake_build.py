"""CMakeLists.txt builds the operators against libtorch (no Python) and tools/ncu_driver runs
block_sparse_attention through the dispatcher: the CPU variant, in a temporary build folder.

The driver's --check compares the all-blocks layout with ATen's causal SDPA in float64, so a
build that registers the operator but computes it wrongly fails too. This is the slowest test
file (one CMake build of the CPU sources, 2 parallel jobs).
"""
import shutil
import subprocess

import pytest
import torch.utils
from helpers import REPO

pytestmark = pytest.mark.slow  # (pyproject.toml: markers)



def test_cmake_cpu_build_runs_the_driver(tmp_path):
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    build = tmp_path / "build"
    configure = [cmake, "-S", str(REPO), "-B", str(build), "-DCABATTN_CUDA=OFF",
                 # Unoptimised: this checks the build and the registration, not speed.
                 "-DCMAKE_BUILD_TYPE=None", "-DCMAKE_CXX_FLAGS=-O0",
                 f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    subprocess.run(configure, check=True, capture_output=True, text=True)
    built = subprocess.run([cmake, "--build", str(build), "--parallel", "2", "--target",
                            "ncu_driver"], capture_output=True, text=True)
    assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-4000:]

    # 200 tokens: blocks of 64 with a partial last one; 2 kept blocks per row, then all.
    run = subprocess.run([str(build / "ncu_driver"), "cpu", "200", "64", "2", "--check"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "block_sparse_attention cpu" in run.stdout and "finite" in run.stdout
    assert "relative error" in run.stdout
