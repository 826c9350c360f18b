"""What the attention operators honour of models beyond Llama (docs/operators.md, Model
features): the logit soft-cap (softcap, Gemma 2), attention_with_scores' sliding window (window)
and head dim 256 (Gemma 3: 4 query heads on 1 KV head of 256).

Every case runs on the CPU kernels, on the CUDA kernels emulated on the CPU (`emu`) and, when
one is present, on a GPU, against cabattn.reference under docs/operators.md's correctness bar,
outputs poisoned first; the reference itself is held to transformers' own definition (Gemma 2's
eager attention and transformers.masking_utils' sliding-window mask). Inputs are N(0, 1) and the
scale 1/sqrt(d), so the logits are about N(0, 1): a soft-cap of 0.5-2 changes every output far
beyond the bar, and a kernel that skipped it fails.
"""
import math
import types

import pytest
import torch
from helpers import (assert_outputs_match_reference, dtypes_for, poison_uninitialized,  # noqa: F401
                     qkv, random_layout)

from cabattn import ops, reference
from emulation import emulated, runs_cuda_kernels

pytestmark = pytest.mark.usefixtures("poison_uninitialized")


def aws_ulps(lq, lk, dtype):
    """Units of slack of attention_with_scores' outputs. mass (a key's probabilities summed over
    the chunk and the group): 8, and 32 where a short chunk against a long cache splits its keys
    on the CUDA kernels (each split's probabilities are rescaled by exp(lse_split - lse);
    cabattn.selfcheck measured up to 20 units there). out in float64 (the bar's 16 units, the
    whole bar there): 32 from 400 keys on, whose two key chunks of the CPU kernel summed up to 19
    units (the largest of 77K outputs, 100 queries against 500 keys, with or without a window)."""
    ulps = {"mass": 32 if lk >= 8 * lq else 8}
    if dtype == torch.float64 and lk >= 400:
        ulps["out"] = 32
    return ulps


# --------------------------------------------------------------- the reference's definition

@pytest.mark.parametrize("lq,lk,window,softcap", [
    (9, 9, 4, 1.5),    # a whole window scored at once (c = n), capped
    (5, 20, 7, 0.0),   # a chunk after a cache, windowed
    (1, 30, 10, 2.0),  # one decode step
    (12, 12, 0, 0.8),  # soft-cap alone
    (6, 16, 1, 0.0)])  # a window of 1: each query sees itself only
def test_reference_is_transformers_gemma2_attention(lq, lk, window, softcap):
    """reference.attention_with_scores is transformers' eager Gemma 2 attention (soft-cap
    before the mask) under the causal mask and, for a window, masking_utils'
    sliding_window_overlay (kv_idx > q_idx - window), with the chunk's queries at positions
    Lk - Lq .. Lk - 1; its mass is transformers' attention weights summed over the chunk's
    queries and the group's heads."""
    from transformers.masking_utils import (and_masks, causal_mask_function,
                                            sliding_window_overlay)
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward
    q, k, v = qkv(2, 4, 2, lq, 32, dtype=torch.float64, k_length=lk)
    rule = (and_masks(causal_mask_function, sliding_window_overlay(window)) if window
            else causal_mask_function)
    allowed = rule(0, 0, torch.arange(lk - lq, lk)[:, None], torch.arange(lk)[None, :])
    mask = torch.zeros(lq, lk, dtype=torch.float64).masked_fill(~allowed, float("-inf"))
    module = types.SimpleNamespace(num_key_value_groups=2, head_dim=32, training=False)
    want, weights = eager_attention_forward(module, q, k, v, mask, scaling=0.25,
                                            softcap=softcap or None)
    out, lse, mass = reference.attention_with_scores(q, k, v, 0.25, softcap, window)
    # transformers takes the softmax in float32 (then back to float64): float32 rounding apart
    torch.testing.assert_close(out, want.transpose(1, 2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mass.double(), weights.sum(2).view(2, 2, 2, lk).sum(2),
                               rtol=1e-5, atol=1e-6)
    if window:  # keys before the first query's window get nothing
        assert not mass[..., :max(0, lk - lq - window + 1)].any()


# A query sees keys 1 and 2 of k = (0, 1, 2) (d = 1, q = 1, scale 1, window 2, query at position
# 2); soft-capped at 1 their logits are tanh(1) = 0.761594156 and tanh(2) = 0.964027580, so
# p = (1, e^0.202433424) / (1 + e^0.202433424) = (1, 1.224378568) / 2.224378568
# = (0.449564, 0.550436), and with v = (10, 20, 30) the output is 20 p1 + 30 p2 = 25.504362 and
# lse = 0.761594156 + ln(2.224378568) = 0.761594156 + 0.799477581 = 1.561072.
def test_softcap_and_window_worked_by_hand(device):
    q = torch.ones(1, 1, 1, 1, device=device)
    k = torch.tensor([0.0, 1.0, 2.0], device=device).view(1, 1, 3, 1)
    v = (torch.tensor([10.0, 20.0, 30.0], device=device) * 1).view(1, 1, 3, 1)
    if runs_cuda_kernels(device):  # they take head dims 64, 128, 256: pad with zeros
        q, k, v = (torch.nn.functional.pad(t, (0, 63)).contiguous() for t in (q, k, v))
    for out, lse, mass in (ops.attention_with_scores(q, k, v, 1.0, 1.0, 2),
                           reference.attention_with_scores(q, k, v, 1.0, 1.0, 2)):
        torch.testing.assert_close(out[0, 0, 0, 0].item(), 25.504362, rtol=0, atol=2e-5)
        torch.testing.assert_close(lse.item(), 1.561072, rtol=0, atol=2e-6)
        torch.testing.assert_close(mass[0, 0].tolist(), [0.0, 0.449564, 0.550436], rtol=0,
                                   atol=2e-6)


# ------------------------------------------------------------------- attention_with_scores

# (Hq, Hkv), Lq, Lk, head dim, window, softcap. Windows smaller than, equal to and larger than
# Lk; chunks c = 1, c < n, c = n; GQA 3 and MQA 4:1; on the CUDA kernels, a decode step against
# 300 keys through a window of 200 splits its keys in 2 (a window of 50 in 1), 1 against 1000
# keys in 8; query tiles of 64 (130 queries: 3) and the CPU's query blocks of 64.
AWS_CASES = [
    ((4, 1), 1, 300, 256, 200, 0.0),
    ((4, 1), 1, 300, 64, 50, 1.5),
    ((8, 2), 1, 1000, 64, 0, 2.0),
    ((6, 2), 37, 200, 128, 16, 1.0),
    ((3, 1), 130, 130, 64, 33, 0.7),
    ((4, 1), 90, 90, 256, 90, 1.0),
    ((4, 4), 20, 60, 64, 1, 0.0),
    ((3, 1), 100, 700, 128, 419, 0.0),
    ((2, 1), 40, 100, 64, 1000, 0.5),
]


@pytest.mark.parametrize("heads,lq,lk,dim,window,softcap", AWS_CASES)
def test_attention_with_scores_softcap_and_window(device, heads, lq, lk, dim, window, softcap):
    for dtype in dtypes_for(device):
        q, k, v = qkv(2, heads[0], heads[1], lq, dim, dtype=dtype, device=device, k_length=lk)
        scale = dim ** -0.5
        got = ops.attention_with_scores(q, k, v, scale, softcap, window)
        assert_outputs_match_reference(
            got, lambda *t: reference.attention_with_scores(*t, scale, softcap, window),
            (q, k, v), device, ["out", "lse", "mass"], aws_ulps(lq, lk, dtype))
        mass = got[2].double()
        # every query distributes probability 1 over the keys it sees ...
        torch.testing.assert_close(mass.sum(-1), torch.full_like(mass[..., 0], lq * heads[0] /
                                                                 heads[1]), rtol=1e-4, atol=1e-4)
        # ... and the keys before the first query's window get none
        if window:
            assert not mass[..., :max(0, lk - lq - window + 1)].any()


@pytest.mark.parametrize("lq,lk", [(1, 300), (37, 200), (130, 130)])
def test_a_window_of_every_key_is_no_window(device, lq, lk):
    """A window that reaches the first key for every query (window >= Lk) masks nothing: the
    outputs are bit for bit those without a window (the kernels read the same keys in the same
    order)."""
    q, k, v = qkv(1, 4, 1, lq, 64, device=device, k_length=lk)
    plain = ops.attention_with_scores(q, k, v, 0.125)
    for window in (lk, lk + 1, 10 ** 6):
        for got, want in zip(ops.attention_with_scores(q, k, v, 0.125, 0.0, window), plain):
            assert torch.equal(got, want), window


# ------------------------------------------------------------ block_sparse_attention, scores

# (Hq, Hkv), L, block size, head dim, blocks kept per row, softcap: partial last blocks, one
# block, a few and every block, GQA 1 and MQA 4:1, every block size's CUDA-core tile and
# tensor-core warps (block 128: 8 warps) at head dim 256.
BSA_CASES = [
    ((4, 1), 200, 64, 256, 2, 1.0),
    ((4, 1), 200, 128, 256, 1, 0.7),
    ((4, 1), 150, 16, 256, 100, 0.0),
    ((2, 2), 200, 16, 64, 1, 1.5),
    ((4, 1), 130, 32, 128, 3, 0.5),
    ((4, 1), 300, 128, 64, 100, 2.0),
]


@pytest.mark.parametrize("heads,length,block_size,dim,keep,softcap", BSA_CASES)
def test_block_sparse_attention_softcap(device, heads, length, block_size, dim, keep, softcap):
    for dtype in dtypes_for(device):
        q, k, v = qkv(2, heads[0], heads[1], length, dim, dtype=dtype, device=device)
        count, index = random_layout(2, heads[0], reference.num_blocks(length, block_size), keep,
                                     device)
        scale = dim ** -0.5
        got = ops.block_sparse_attention(q, k, v, count, index, block_size, scale, softcap)
        assert_outputs_match_reference(
            got, lambda *t: reference.block_sparse_attention(*t, block_size, scale, softcap),
            (q, k, v, count, index), device, ["out", "lse"])


@pytest.mark.parametrize("heads,length,block_size,dim,softcap", [
    ((4, 1), 200, 16, 256, 1.0), ((4, 1), 150, 64, 256, 0.0), ((3, 1), 300, 32, 64, 1.5),
    ((2, 2), 200, 128, 128, 0.5), ((4, 1), 150, 128, 256, 0.5)])
def test_block_scores_softcap(device, heads, length, block_size, dim, softcap):
    for dtype in dtypes_for(device):
        q, k, _ = qkv(2, heads[0], heads[1], length, dim, dtype=dtype, device=device)
        scale = dim ** -0.5
        got = ops.block_scores(q, k, block_size, scale, softcap)
        assert_outputs_match_reference(
            got, lambda *t: reference.block_scores(*t, block_size, scale, softcap), (q, k),
            device, ["Sblk", "Gblk"])
        # each row's soft-capped probabilities still sum to one
        sizes = torch.clamp(length - torch.arange(got[0].shape[-1]) * block_size, max=block_size)
        torch.testing.assert_close(got[0].sum(-1).double().cpu(),
                                   sizes.double().expand(got[0].shape[:-1]), rtol=1e-4, atol=0)


# ---------------------------------------------------------------------------- head dim 256

def test_selection_operators_take_head_dim_256(device):
    """coarsen, frc_scores and kv_compact_ at Gemma 3's head dim (the attention operators'
    cases above run it too)."""
    for dtype in dtypes_for(device):
        x = torch.randn(2, 4, 150, 256, dtype=torch.float64).to(device=device, dtype=dtype)
        for mode in (ops.MAX_L2, ops.MEAN):
            got = ops.coarsen(x, 32, mode)
            if mode == ops.MAX_L2:  # a copied token
                assert torch.equal(got, reference.coarsen(x, 32, mode))
            else:
                assert_outputs_match_reference((got,), lambda t: (reference.coarsen(t, 32, mode),),
                                               (x,), device, ["mean"])
        qc, kc = ops.coarsen(x, 16, ops.MEAN), ops.coarsen(x[:, :1].contiguous(), 16, ops.MEAN)
        got = ops.frc_scores(qc, kc, 0.0625, 0.3)
        assert_outputs_match_reference((got,), lambda *t: (reference.frc_scores(*t, 0.0625, 0.3),),
                                       (qc, kc), device, ["curvature"])
        keep = torch.rand(2, 4, 150).argsort(-1)[..., :50].sort(-1).values.to(device)
        got, want = x.clone(), x.clone()
        ops.kv_compact_(got, keep)
        reference.kv_compact_(want, keep)
        assert torch.equal(got, want)


# ------------------------------------------------------------------------ checks, schemas

def test_bad_softcap_or_window_raise_as_on_cpu(raises_as_on_cpu):
    """A soft-cap that is negative or not finite, or a negative window, is refused before any
    work with the same words on every device."""
    q, k, v = qkv(1, 4, 1, 40, 64)
    count, index = random_layout(1, 4, reference.num_blocks(40, 16), 2)
    for softcap in (-1.0, math.inf, math.nan):
        for call, args in ((ops.block_scores, (q, k, 16, 0.125, softcap)),
                           (ops.block_sparse_attention, (q, k, v, count, index, 16, 0.125,
                                                         softcap)),
                           (ops.attention_with_scores, (q, k, v, 0.125, softcap))):
            assert "softcap must be 0 (no soft-capping)" in raises_as_on_cpu(call, *args)
    message = raises_as_on_cpu(ops.attention_with_scores, q, k, v, 0.125, 0.0, -3)
    assert "window must be 0 (no sliding window)" in message and "-3" in message
    for bad in (lambda: reference.attention_with_scores(q, k, v, 0.125, -1.0),
                lambda: reference.attention_with_scores(q, k, v, 0.125, 0.0, -3)):
        with pytest.raises(ValueError, match="must be"):
            bad()


def test_opcheck_with_softcap_and_window(device):
    if emulated():
        pytest.skip("opcheck checks the registration of torch.ops.cabattn; the emulated "
                    "operators are test-only (their schemas: test_emulation.py)")
    q, k, v = qkv(1, 4, 1, 70, 64, device=device)
    count, index = random_layout(1, 4, reference.num_blocks(70, 16), 2, device)
    torch.library.opcheck(torch.ops.cabattn.block_scores, (q, k, 16, 0.125, 1.5))
    torch.library.opcheck(torch.ops.cabattn.block_sparse_attention,
                          (q, k, v, count, index, 16, 0.125, 1.5))
    torch.library.opcheck(torch.ops.cabattn.attention_with_scores,
                          (q[:, :, -5:].contiguous(), k, v, 0.125, 1.5, 20))
