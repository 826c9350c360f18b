"""The Python face of the compiled operators: the only module that calls torch.ops.cabattn.

Each function documents its contract; cabattn.reference holds the plain-PyTorch definition the
kernels are tested against. The C++ side validates devices, dtypes, shapes and contiguity and
raises errors that name the bad argument. The fake implementations let torch.compile trace
through the operators without running them.
"""
import contextlib

import torch

from . import _C  # noqa: F401  (loading the library registers the operators)
from .checks import choice
from .reference import (ADDITIVE, GLOBAL_MINMAX, MAX_L2, MEAN, MULTIPLICATIVE, ROW_MINMAX,
                        num_blocks)

# The kernel operators, one function each below (cabattn.emu copies their schemas).
KERNELS = ("coarsen", "block_scores", "frc_scores", "select_blocks", "block_sparse_attention",
           "attention_with_scores", "kv_compact_")
__all__ = [*KERNELS, "deferred_checks", "running", "use_kernels", "has_kernels_for", "KERNEL_PATHS",
           "KERNEL_PATH_OPTION", "cpu_isa", "supported_cpu_isas", "MAX_L2", "MEAN", "ADDITIVE",
           "MULTIPLICATIVE", "ROW_MINMAX", "GLOBAL_MINMAX"]

_ops = torch.ops.cabattn

# Where the operators run: the compiled extension (the default) or the reference path, plain
# PyTorch and FlexAttention (cabattn.reference_path; docs/selfcheck.md, "The reference path").
# One option of both protocols, declared once here.
KERNEL_PATHS = ("extension", "reference")
KERNEL_PATH_OPTION = choice(
    "kernels", "extension", "where the operators run: extension (the compiled kernels, "
    "self-checked on a GPU before the first cell) or reference (plain PyTorch and "
    "FlexAttention; slower, independent; docs/selfcheck.md)", KERNEL_PATHS)


@contextlib.contextmanager
def running(kernels):
    """Within it, every function of this module calls `kernels`: a namespace of the operators
    with torch.ops.cabattn's schemas (cabattn.reference_path; cabattn.emu.OPS, the CUDA kernels
    emulated on the CPU, for tests and the CPU self-check). Restored on exit, also after an
    exception."""
    global _ops
    saved, _ops = _ops, kernels
    try:
        yield
    finally:
        _ops = saved


@contextlib.contextmanager
def use_kernels(path: str):
    """Within it, the operators run on `path`: "extension" (whatever runs now: the compiled
    kernels, unless an enclosing context chose otherwise) or "reference"."""
    KERNEL_PATH_OPTION.require(path)
    if path == "extension":
        yield
        return
    from . import reference_path
    with running(reference_path):
        yield


def has_kernels_for(device_type: str) -> bool:
    """Whether this build of the extension has kernels for `device_type` ("cpu", "cuda"): a
    build without nvcc has none for CUDA (setup.py says so when it builds)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("cabattn::block_sparse_attention",
                                                          device_type.upper())


def cpu_isa() -> str:
    """The vector ISA path the CPU kernels run in this process: "avx512", "avx2" or "baseline"
    (docs/cpu_kernels.md). The best one the CPU supports, unless the environment variable
    CABATTN_CPU_ISA (auto, avx512, avx2, baseline) forces one; it is read once, when this
    module is imported, and a name that is not a path, or a path the CPU lacks, raises then."""
    return _ops.cpu_isa()


def supported_cpu_isas() -> list:
    """The ISA paths this CPU and build can run, best first (docs/cpu_kernels.md)."""
    return list(_ops.supported_cpu_isas())


def coarsen(x: torch.Tensor, block_size: int, mode: int = MAX_L2) -> torch.Tensor:
    """Block representatives [B, H, M, d] of x [B, H, L, d] (max-L2 token or mean)."""
    return _ops.coarsen(x, block_size, mode)


def block_scores(q: torch.Tensor, k: torch.Tensor, block_size: int, scale: float,
                 softcap: float = 0.0):
    """(Sblk, Gblk) [B, Hq, M, M] float32: block sum and max of the causal softmax, one QK pass;
    of the logits soft-capped to softcap * tanh(logit / softcap) when softcap > 0 (0: none)."""
    return _ops.block_scores(q, k, block_size, scale, softcap)


def frc_scores(qc: torch.Tensor, kc: torch.Tensor, scale: float, lam: float,
               formula: int = ADDITIVE, normalization: int = ROW_MINMAX) -> torch.Tensor:
    """Block curvature F [B, Hq, M, M] float32 from coarse queries and keys
    (docs/block_statistics.md)."""
    return _ops.frc_scores(qc, kc, scale, lam, formula, normalization)


def select_blocks(score1, score2, n_recent, n_sink, n_score1, n_score2, shift: int,
                  max_count: int):
    """(block_count [B, H, M], block_index [B, H, M, max_count]) int32; see reference. The
    four counts are int32 [M], [H, M] (per-head budgets) or [B, H, M], all of one shape."""
    return _ops.select_blocks(score1, score2, n_recent, n_sink, n_score1, n_score2, shift,
                              max_count)


def block_sparse_attention(q, k, v, block_count, block_index, block_size: int, scale: float,
                           softcap: float = 0.0):
    """(out [B, Hq, L, d], lse [B, Hq, L] float32) attending only to the layout's key blocks;
    softcap > 0 soft-caps the logits (0: none)."""
    return _ops.block_sparse_attention(q, k, v, block_count, block_index, block_size, scale,
                                       softcap)


def attention_with_scores(q, k, v, scale: float, softcap: float = 0.0, window: int = 0):
    """(out, lse, mass [B, Hkv, Lk] float32) for a chunk of queries against cache + chunk;
    softcap > 0 soft-caps the logits, window > 0 lets each query see only itself and the
    window - 1 keys before it (0: none; see cabattn.reference)."""
    return _ops.attention_with_scores(q, k, v, scale, softcap, window)


def kv_compact_(x: torch.Tensor, keep: torch.Tensor) -> None:
    """In place x[b, h, :K] = x[b, h, keep[b, h]] for sorted unique int64 keep [B, H, K]."""
    _ops.kv_compact_(x, keep)


@contextlib.contextmanager
def deferred_checks():
    """Within it, the CUDA kernels that validate index inputs on the device (select_blocks'
    counts, block_sparse_attention's layout, kv_compact_'s keep) flag a bad value into a
    persistent device word instead of each reading a flag back: a forward inside it has no host
    synchronisation of theirs and can be captured in a CUDA graph. Leaving it reads the words
    once and raises a RuntimeError naming the operator (the same call outside it raises the
    error that names the bad value). Nested, the outermost exit checks. A no-op for the CPU
    kernels, which check before computing, and in a build without the CUDA kernels."""
    try:
        enable = _ops.deferred_checks
    except AttributeError:  # built without the CUDA kernels
        yield
        return
    previous = enable(True)
    try:
        yield
    finally:
        enable(previous)
    if not previous:
        _ops.raise_deferred_checks()


# CABATTN_CPU_ISA is read and checked here, before any work: a bad value raises at import.
cpu_isa()


@torch.library.register_fake("cabattn::coarsen")
def _(x, block_size, mode):
    b, h, length, d = x.shape
    return x.new_empty(b, h, num_blocks(length, block_size), d)


@torch.library.register_fake("cabattn::block_scores")
def _(q, k, block_size, scale, softcap=0.0):
    b, h, length, _ = q.shape
    m = num_blocks(length, block_size)
    shape = (b, h, m, m)
    return q.new_empty(shape, dtype=torch.float32), q.new_empty(shape, dtype=torch.float32)


@torch.library.register_fake("cabattn::frc_scores")
def _(qc, kc, scale, lam, formula, normalization):
    b, h, m, _ = qc.shape
    return qc.new_empty(b, h, m, m, dtype=torch.float32)


@torch.library.register_fake("cabattn::select_blocks")
def _(score1, score2, n_recent, n_sink, n_score1, n_score2, shift, max_count):
    ref = score1 if score1 is not None else score2
    b, h, m = ref.shape[0], ref.shape[1], n_recent.shape[-1]
    return (n_recent.new_empty(b, h, m, dtype=torch.int32),
            n_recent.new_empty(b, h, m, max_count, dtype=torch.int32))


@torch.library.register_fake("cabattn::block_sparse_attention")
def _(q, k, v, block_count, block_index, block_size, scale, softcap=0.0):
    b, h, length, _ = q.shape
    return torch.empty_like(q), q.new_empty(b, h, length, dtype=torch.float32)


@torch.library.register_fake("cabattn::attention_with_scores")
def _(q, k, v, scale, softcap=0.0, window=0):
    b, h, lq, _ = q.shape
    return (torch.empty_like(q), q.new_empty(b, h, lq, dtype=torch.float32),
            k.new_empty(b, k.shape[1], k.shape[2], dtype=torch.float32))


@torch.library.register_fake("cabattn::kv_compact_")
def _(x, keep):
    return None
