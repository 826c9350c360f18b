"""The CPU kernels on every vector ISA path (docs/cpu_kernels.md): each operator that runs the
register micro-kernel and the row passes (block_sparse_attention, attention_with_scores,
block_scores) is forced onto each path this machine supports with CABATTN_CPU_ISA, in a
subprocess (the variable is read once per process), and held to the reference and to the other
paths. A path the CPU lacks is skipped with the reason, and asking for it must fail."""
import os
import subprocess
import sys

import pytest
import torch
from helpers import (REPO, assert_within_reference_error, qkv, random_layout, reference_dtype,
                     subprocess_env)

from cabattn import ops, reference

PATHS = ("avx512", "avx2", "baseline")  # every path of an x86-64 GCC build, best first
SUPPORTED = ops.supported_cpu_isas()

# Runs the cases (op name, args) on the path CABATTN_CPU_ISA names; outputs come back poisoned
# where unwritten, as in the operator tests (helpers.poison_uninitialized).
WORKER = """
import sys
import torch
from cabattn import ops
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True, warn_only=True)
torch.utils.deterministic.fill_uninitialized_memory = True
cases = torch.load(sys.argv[1])
outputs = [getattr(ops, name)(*args) for name, args in cases]
torch.save({"isa": ops.cpu_isa(), "outputs": outputs}, sys.argv[2])
"""


def run_worker(isa, *args, check=True):
    done = subprocess.run([sys.executable, "-c", WORKER, *args], cwd=REPO,
                          env=subprocess_env(CABATTN_CPU_ISA=isa), capture_output=True, text=True,
                          timeout=600)
    if check:
        assert done.returncode == 0, f"CABATTN_CPU_ISA={isa}: {done.stderr[-2000:]}"
    return done


# softcap (0: none) and window (0: none) are the operators' last arguments (docs/operators.md,
# Model features): the soft-cap runs the path's vector tanh, the window its row ranges.
def attention_case(dtype, ratio, length, block_size, dim, keep, seed, softcap=0.0):
    q, k, v = qkv(1, 2 * ratio, 2, length, dim, dtype=dtype,
                  generator=torch.Generator().manual_seed(seed))
    count, index = random_layout(1, 2 * ratio, reference.num_blocks(length, block_size), keep,
                                 seed=seed)
    return "block_sparse_attention", (q, k, v, count, index, block_size, dim ** -0.5, softcap)


def scores_case(dtype, ratio, lq, lk, dim, seed, softcap=0.0, window=0):
    q, k, v = qkv(1, 2 * ratio, 2, lq, dim, dtype=dtype, k_length=lk,
                  generator=torch.Generator().manual_seed(seed))
    return "attention_with_scores", (q, k, v, dim ** -0.5, softcap, window)


def block_scores_case(dtype, ratio, length, block_size, dim, seed, softcap=0.0):
    q, k, _ = qkv(1, 2 * ratio, 2, length, dim, dtype=dtype,
                  generator=torch.Generator().manual_seed(seed))
    return "block_scores", (q, k, block_size, dim ** -0.5, softcap)


# Every remainder of the tile heights (rows mod 6: 1 to 5; mod 3: 1, 2) and of the key-panel
# groups (QK^T: runs of 1 to several 16-key panels; P V: head dims of 2, 3, 4, 5 and 8 slabs of
# 16 columns, and 40: two slabs and 8 columns one by one), several key chunks per row, GQA,
# and each input dtype (float64 runs the tables' float64 GEMM; half types compute in float32).
CASES = [
    attention_case(torch.float32, 3, 197, 16, 64, 5, 1),  # blocks of 16 rows and a last of 5
    attention_case(torch.float32, 1, 130, 32, 128, 100, 2),  # 32 and 2 rows
    attention_case(torch.float32, 2, 65, 16, 40, 3, 3),  # a last block of 1 row
    attention_case(torch.float32, 1, 1100, 128, 48, 9, 4),  # up to 3 key chunks per block
    attention_case(torch.bfloat16, 3, 300, 64, 80, 3, 5),
    attention_case(torch.float64, 3, 200, 16, 64, 5, 6),
    scores_case(torch.float32, 3, 1, 300, 64, 7),  # decode: 3 rows
    scores_case(torch.float32, 3, 37, 700, 64, 8),  # 111 rows, 2 key chunks
    scores_case(torch.float16, 1, 17, 100, 40, 9),  # 17 rows
    scores_case(torch.float64, 3, 5, 50, 64, 10),
    block_scores_case(torch.float32, 3, 300, 16, 64, 11),  # row tiles of 128 and 44
    block_scores_case(torch.float32, 1, 1097, 64, 40, 12),  # 2 key chunks, a last tile of 73
    block_scores_case(torch.bfloat16, 1, 199, 128, 32, 13),  # 128 and 71
    block_scores_case(torch.float64, 3, 100, 32, 64, 14),
    # Soft-capped logits (every remainder of a vector: 197 keys, head dims 40 and 256) and
    # sliding windows: a decode step, a chunk whose window starts inside a key panel and spans
    # two key chunks, a whole window (Lq = Lk), float64's plain loops.
    attention_case(torch.float32, 3, 197, 16, 64, 5, 15, softcap=1.5),
    attention_case(torch.bfloat16, 4, 150, 32, 256, 3, 16, softcap=0.7),
    scores_case(torch.float32, 3, 1, 300, 64, 17, softcap=2.0, window=70),
    scores_case(torch.float32, 3, 100, 700, 40, 18, window=419),
    scores_case(torch.float16, 4, 90, 90, 256, 19, softcap=1.0, window=33),
    scores_case(torch.float64, 3, 20, 50, 64, 20, softcap=0.5, window=7),
    block_scores_case(torch.float32, 3, 197, 16, 64, 21, softcap=1.5),
    block_scores_case(torch.float64, 1, 100, 32, 40, 22, softcap=0.5),
]
NAMES = {"block_sparse_attention": ["out", "lse"], "attention_with_scores": ["out", "lse", "mass"],
         "block_scores": ["sblk", "gblk"]}
ULPS = {"mass": 8}  # as in test_ops_attention: a key's mass sums hundreds of terms


def reference_call(name, args, dtype):
    cast = [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in args]
    return getattr(reference, name)(*cast)


@pytest.fixture(scope="module")
def path_outputs(tmp_path_factory):
    """{isa: outputs of CASES} for each supported path, computed once per module."""
    folder = tmp_path_factory.mktemp("cpu_isa")
    cases = folder / "cases.pt"
    torch.save(CASES, cases)
    results = {}
    for isa in SUPPORTED:
        out = folder / f"{isa}.pt"
        run_worker(isa, str(cases), str(out))
        results[isa] = torch.load(out)
    return results


def require(isa):
    if isa not in SUPPORTED:
        pytest.skip(f"this CPU cannot run the {isa} path (it supports {', '.join(SUPPORTED)})")


def test_default_path_is_the_best_supported():
    forced = os.environ.get("CABATTN_CPU_ISA", "auto")
    assert ops.cpu_isa() == (SUPPORTED[0] if forced == "auto" else forced)
    assert SUPPORTED[-1] == "baseline" and set(SUPPORTED) <= set(PATHS)


@pytest.mark.slow  # fresh interpreters (pyproject.toml: markers)
@pytest.mark.parametrize("isa", PATHS)
def test_path_matches_reference(isa, path_outputs):
    require(isa)
    assert path_outputs[isa]["isa"] == isa
    for (name, args), got in zip(CASES, path_outputs[isa]["outputs"]):
        exact = reference_call(name, args, torch.float64)
        same = {}
        for out, want, what, i in zip(got, exact, NAMES[name], range(len(got))):
            precision = reference_dtype(args[0].dtype, out.dtype, "cpu")
            if precision not in same:
                same[precision] = reference_call(name, args, precision)
            label = f"{isa} {name} {tuple(args[0].shape)} {args[0].dtype} {what}"
            assert_within_reference_error(out, want, same[precision][i].to(out.dtype), label,
                                          ULPS.get(what))


@pytest.mark.slow  # fresh interpreters (pyproject.toml: markers)
@pytest.mark.parametrize("isa", PATHS)
def test_paths_agree(isa, path_outputs):
    """Each path against the best one: the same sums in another order, so equal to rounding."""
    require(isa)
    if isa == SUPPORTED[0]:
        pytest.skip(f"{isa} is the path the others are compared with")
    for (name, args), got, want in zip(CASES, path_outputs[isa]["outputs"],
                                       path_outputs[SUPPORTED[0]]["outputs"]):
        for out, best, what in zip(got, want, NAMES[name]):
            # Half outputs are float32 results rounded once: at most a unit apart.
            units = 2 if out.dtype in (torch.float16, torch.bfloat16) else 16
            scale = best.double().abs().max().item()
            torch.testing.assert_close(
                out, best, rtol=0, atol=units * torch.finfo(out.dtype).eps * scale,
                msg=lambda m: f"{isa} vs {SUPPORTED[0]}, {name} {what}: {m}")


@pytest.mark.slow  # fresh interpreters (pyproject.toml: markers)
@pytest.mark.parametrize("isa", PATHS[:-1])  # baseline runs everywhere
def test_unsupported_path_is_refused(isa, tmp_path):
    if isa in SUPPORTED:
        pytest.skip(f"this CPU supports {isa}; the refusal is tested where it does not")
    done = run_worker(isa, "missing.pt", str(tmp_path / "out.pt"), check=False)
    assert done.returncode != 0
    assert f"CABATTN_CPU_ISA={isa}" in done.stderr and "valid" in done.stderr, done.stderr


@pytest.mark.slow  # fresh interpreters (pyproject.toml: markers)
def test_unknown_path_names_the_valid_ones(tmp_path):
    done = run_worker("avx1024", "missing.pt", str(tmp_path / "out.pt"), check=False)
    assert done.returncode != 0
    # Raised at import (cabattn.ops reads the variable), before the worker reads its cases.
    assert "CABATTN_CPU_ISA=avx1024 is not a CPU ISA path" in done.stderr, done.stderr
    valid = done.stderr.split("valid: ", 1)[1].split(" (", 1)[0].split(", ")
    assert valid[0] == "auto" and set(SUPPORTED) <= set(valid) <= {"auto", *PATHS}, done.stderr
