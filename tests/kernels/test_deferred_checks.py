"""ops.deferred_checks (docs/operators.md): inside it, the CUDA kernels that validate index inputs
on the device flag a bad value into a persistent status that is read back once, when it is left, not
after every call, so a forward has no host synchronisation of theirs (CUDA-graph capturable). The
protocols read it back once per forward. The CPU kernels check eagerly, inside it too. Runs on the
CPU, on the emulated CUDA kernels (`emu`) and, when present, on CUDA."""
import collections

import pytest
import torch
from helpers import random_layout, tiny_llama

import cabattn
from cabattn import ops, reference
from emulation import emulate_cuda_kernels, runs_cuda_kernels


def _calls(device):
    """op -> (a call with a value only the kernel can see is bad, a good call, the CPU's words)"""
    q = torch.randn(1, 2, 64, 64, device=device)
    count, index = random_layout(1, 2, reference.num_blocks(64, 16), 2, device)
    future = index.clone()
    future[0, 0, 1, 0] = 3  # row 1 may only list blocks 0..1
    scores = torch.randn(1, 2, 4, 4, device=device)
    one = torch.ones(4, dtype=torch.int32, device=device)
    zero = torch.zeros_like(one)
    x = torch.randn(1, 2, 10, 4, device=device)
    good_keep = torch.tensor([[[0, 3, 5]] * 2], device=device)
    return {
        "block_sparse_attention": (
            lambda: ops.block_sparse_attention(q, q, q, count, future, 16, 0.1),
            lambda: ops.block_sparse_attention(q, q, q, count, index, 16, 0.1),
            "block_index"),
        "select_blocks": (
            lambda: ops.select_blocks(scores, None, one * 3, zero, zero, zero, 1, 2),
            lambda: ops.select_blocks(scores, None, one, zero, zero, zero, 1, 2),
            "max_count"),
        "kv_compact_": (
            lambda: ops.kv_compact_(x, good_keep.index_fill(2, torch.tensor([2], device=device),
                                                            10)),
            lambda: ops.kv_compact_(x, good_keep),
            "out of range"),
    }


@pytest.mark.parametrize("op", ["block_sparse_attention", "select_blocks", "kv_compact_"])
def test_a_bad_value_is_reported_when_the_checks_are_read(device, op):
    bad, good, words = _calls(device)[op]
    if not runs_cuda_kernels(device):  # the CPU kernels check before computing
        with ops.deferred_checks():
            with pytest.raises(RuntimeError, match=words):
                bad()
        return
    reached = False
    with pytest.raises(RuntimeError, match=f"cabattn::{op}: the CUDA kernel flagged a bad "
                                           "input during deferred checks"):
        with ops.deferred_checks():
            bad()  # no read-back here: nothing raises yet
            with ops.deferred_checks():
                good()
            reached = True  # a nested exit leaves the reading to the outermost
    assert reached
    with ops.deferred_checks():  # the status was cleared when it was read
        good()
    with pytest.raises(RuntimeError, match=words):  # outside: the CPU's words, at the call
        bad()


def test_a_failed_forward_leaves_no_stale_flag(device):
    bad, good, _ = _calls(device)["select_blocks"]
    with pytest.raises(ZeroDivisionError):
        with ops.deferred_checks():
            if runs_cuda_kernels(device):
                bad()
            1 / 0
    with ops.deferred_checks():
        good()


class _CountingOps:
    """torch.ops.<library> with a count of the calls of each operator."""

    def __init__(self, inner):
        self.inner, self.calls = inner, collections.Counter()

    def __getattr__(self, name):
        target = getattr(self.inner, name)

        def call(*args, **kwargs):
            self.calls[name] += 1
            return target(*args, **kwargs)
        return call


@pytest.mark.parametrize("protocol,options", [("mask", {}), ("kv", {"kv_chunk": 8})])
def test_protocols_read_the_checks_once_per_forward(monkeypatch, single_thread, protocol,
                                                    options):
    """On the emulated CUDA kernels, a forward of a 2-layer model (head dim 64) runs the checked
    kernels in every layer (and chunk) and reads their status back once; the loss is the one
    the eager checks give."""
    model = tiny_llama(vocab_size=64, hidden_size=128, heads=2, kv_heads=1, positions=128,
                       intermediate_size=128)
    ids = torch.randint(0, 64, (1, 48), generator=torch.Generator().manual_seed(1))
    emulate_cuda_kernels(monkeypatch)
    counting = _CountingOps(ops._ops)
    monkeypatch.setattr(ops, "_ops", counting)

    def loss():
        with cabattn.apply(model, "h2o", 0.5, protocol=protocol, block_size=16, k_min=16,
                           **options), torch.no_grad():
            return model(ids, labels=ids).loss

    deferred = loss()
    checked = counting.calls["block_sparse_attention" if protocol == "mask" else "kv_compact_"]
    assert checked >= 2, counting.calls  # one per layer, at least
    assert counting.calls["raise_deferred_checks"] == 1, counting.calls
    monkeypatch.setattr(ops, "deferred_checks", _eager)
    torch.testing.assert_close(loss(), deferred, rtol=0, atol=0)


class _eager:
    """ops.deferred_checks switched off: every call reads its own check back."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
