"""Structural checks of the tensor-core kernels without a GPU (docs/operators.md): every
fp16/bf16 instantiation in csrc/cuda/*_tc.cu (head dims 64, 128, 256, with and without the logit
soft-cap), compiled for sm_90 as setup.py compiles it,
runs its matrix products on the tensor cores (HMMA in the SASS, fed by ldmatrix and cp.async)
and keeps everything in registers (ptxas: no spill stores or loads, no stack frame, no local
memory instructions). bench/sass_report.py prints the same data with occupancy."""
import importlib.util
import os

import pytest
from helpers import REPO

pytestmark = pytest.mark.slow  # (pyproject.toml: markers)

spec = importlib.util.spec_from_file_location("sass_report",
                                              os.path.join(REPO, "bench", "sass_report.py"))
sass_report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sass_report)

# (dtype, head dim, warps, softcap) the launcher's static switches instantiate for each source.
EXPECTED = {f"{dtype}-{d}-{w}-{softcap}" for dtype in ("fp16", "bf16") for d in (64, 128, 256)
            for w in (1, 2, 4, 8) for softcap in (False, True)}


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    if sass_report.cuda_home() is None:
        pytest.skip("nvcc not found (CUDA_HOME or /usr/local/cuda): cannot compile the kernels")
    if sass_report.cuobjdump() is None:
        pytest.skip("cuobjdump not found (CUDA toolkit or the triton wheel): cannot read SASS")
    workdir = str(tmp_path_factory.mktemp("sass"))
    return {os.path.basename(src): sass_report.compile_and_read(src, 90, workdir)
            for src in sass_report.TENSOR_CORE_SOURCES}


# HMMAs per warp and key tile: Q K^T is (d/16) k-slices x (keys/8) n-tiles; attention adds as
# many for P V.
PRODUCTS_PER_TILE = {"block_sparse_attention_tc.cu": 2, "block_scores_tc.cu": 1}


def test_every_tensor_core_source_is_checked():
    names = {os.path.basename(src) for src in sass_report.TENSOR_CORE_SOURCES}
    assert names == set(PRODUCTS_PER_TILE)


@pytest.mark.parametrize("source", sorted(PRODUCTS_PER_TILE))
def test_tensor_core_kernels_use_hmma_and_never_spill(kernels, source):
    found = {}
    for kernel, usage in kernels[source].items():
        traits = sass_report.traits_of(kernel)
        if traits is not None:
            found["-".join(map(str, traits))] = (kernel, usage)
    assert set(found) == EXPECTED, f"instantiations: {sorted(found)}"
    for name, (kernel, u) in found.items():
        dtype, head_dim, warps, softcap = sass_report.traits_of(kernel)
        keys = sass_report.keys_per_tile(head_dim, warps)
        per_tile = PRODUCTS_PER_TILE[source] * (head_dim // 16) * (keys // 8)
        assert u["HMMA"] >= per_tile and u["HMMA"] % per_tile == 0, (name, u)
        assert u["LDSM"] > 0 and u["LDGSTS"] > 0, (name, u)
        assert u["spill_stores"] == 0 and u["spill_loads"] == 0 and u["stack"] == 0, (name, u)
        assert u["LDL"] == 0 and u["STL"] == 0, (name, u)
        assert u["registers"] <= 255, (name, u)
