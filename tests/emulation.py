"""The operator tests' `emu` device: the CUDA kernels emulated on the CPU (cabattn.emu).

An `emu` test keeps CPU tensors while cabattn.ops calls torch.ops.cabattn_emu instead of
torch.ops.cabattn, so the same test body checks the CUDA kernel source without a GPU.
"""
import contextlib
import functools
import types

import pytest
import torch

from cabattn import ops

# Where tests that compare the CUDA kernels with the CPU ones run them (see cuda_target).
CUDA_TARGETS = [pytest.param("cuda", marks=pytest.mark.gpu), "emu"]


@contextlib.contextmanager
def _emulating():
    from cabattn import emu
    saved, ops._ops = ops._ops, emu.OPS
    try:
        yield
    finally:
        ops._ops = saved


@contextlib.contextmanager
def cpu_kernels():
    """cabattn.ops on the CPU kernels for a while, also inside an `emu` test."""
    saved, ops._ops = ops._ops, torch.ops.cabattn
    try:
        yield
    finally:
        ops._ops = saved


def _emulated(function):
    @functools.wraps(function)
    def call(*args, **kwargs):
        with _emulating():
            return function(*args, **kwargs)
    return call


def cuda_target(name: str):
    """The CUDA kernels on a GPU ("cuda") or emulated ("emu"): .device of their tensors, .ops
    the cabattn.ops functions running them (cabattn.ops itself keeps its CPU kernels), and
    .emulated (the emulation is slow: tests pick smaller shapes for it)."""
    if name == "cuda":
        return types.SimpleNamespace(device="cuda", ops=ops, emulated=False)
    functions = {n: _emulated(getattr(ops, n)) for n in ops.KERNELS}
    return types.SimpleNamespace(device="cpu", ops=types.SimpleNamespace(**functions),
                                 emulated=True)


def emulate_cuda_kernels(monkeypatch) -> str:
    """Routes cabattn.ops to the emulated CUDA kernels for one test; the tensors' device."""
    from cabattn import emu
    monkeypatch.setattr(ops, "_ops", emu.OPS)
    return "cpu"


def emulated() -> bool:
    """Whether cabattn.ops runs the emulated CUDA kernels now."""
    return ops._ops is not torch.ops.cabattn


def runs_cuda_kernels(device) -> bool:
    """Whether cabattn.ops on `device` tensors runs the CUDA kernels, on a GPU or emulated
    (they take float32/16/bf16 only, head_dim 64 and 128)."""
    return device == "cuda" or emulated()


def xfail_if_emulated(request, finding: str, strict: bool = True):
    """Marks an `emu` case that fails by a known finding (bench/RESULTS.md) as strictly expected to
    fail, until the kernel's fix lands (then the strict xfail turns into a failure). strict=False
    for a finding at the edge of the bar, which the host compiler's rounding can tip either way."""
    if emulated():
        request.applymarker(pytest.mark.xfail(strict=strict, reason=f"known finding: {finding}"))
