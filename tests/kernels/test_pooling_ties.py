"""max_l2 pooling is reproducible: its tolerance rule (docs/block_statistics.md, Coarsening).

In layer 0 a key or query is a function of its token alone and RoPE keeps its norm, so a block
holding a token twice has two norms equal up to rounding. The first largest norm would let the
rounding pick the representative; the rule picks the first token inside the input dtype's
tolerance of the largest. Checked on SmolLM2-135M's own q/k (pd-books window 0, L = 512, block
16; one forward of the model, twice), on the CPU kernel, the CUDA kernel (emulated) and the
reference, and on a synthetic pair of rounding-level different norms.
"""
import pytest
import torch
from emulation import cpu_kernels, emulating
from helpers import smollm2_attention_inputs

import cabattn
from cabattn import emu, ops, reference

LENGTH, BLOCK = 512, 16
LAYERS = (0, 1, 15)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def coarsen_on(implementation: str, x: torch.Tensor) -> torch.Tensor:
    if implementation == "cpu":
        return torch.ops.cabattn.coarsen(x, BLOCK, ops.MAX_L2)
    if implementation == "emu":
        return emu.OPS.coarsen(x, BLOCK, ops.MAX_L2)
    return reference.coarsen(x, BLOCK, ops.MAX_L2)


def picked(x: torch.Tensor, representatives: torch.Tensor) -> torch.Tensor:
    """The index inside its block of each representative [B, H, M] (the token it copies)."""
    b, h, length, d = x.shape
    blocks = x.view(b, h, length // BLOCK, BLOCK, d)
    same = (blocks == representatives[:, :, :, None, :]).all(-1)
    assert bool(same.any(-1).all()), "a representative is not one of its block's tokens"
    return same.byte().argmax(-1)


@pytest.fixture(scope="module")
def activations(single_thread):
    """Layer q/k of window 0, as computed and with RoPE's frequencies scaled by 1 + 3e-7."""
    ids, plain = smollm2_attention_inputs(LENGTH, 0, LAYERS)
    _, moved = smollm2_attention_inputs(LENGTH, 0, LAYERS, rope_scale=1 + 3e-7)
    return ids, plain, moved


def test_window_has_repeated_tokens_with_near_equal_norms(activations):
    """The case the rule exists for is in the data: blocks of layer 0 whose two largest key
    norms are a repeated token's, equal to 1e-6 relative."""
    ids, plain, _ = activations
    k = plain[0][1]
    norms = k.double().pow(2).sum(-1).view(k.shape[1], -1, BLOCK)
    top2 = norms.topk(2, dim=-1)
    tokens = ids[0].view(-1, BLOCK).expand(k.shape[1], -1, -1).gather(-1, top2.indices)
    close = (top2.values[..., 0] - top2.values[..., 1]) / top2.values[..., 0] < 1e-6
    assert int((close & (tokens[..., 0] == tokens[..., 1])).sum()) >= 5


@pytest.mark.parametrize("implementation", ["cpu", "emu", "reference"])
def test_float32_representatives_survive_a_rounding_level_change_of_the_model(
        activations, implementation):
    """RoPE scaled by 1 + 3e-7 moves every norm by ~1e-7 relative: no representative of
    layers 0, 1 and 15 moves (the first largest norm moved 5 of layer 0's on this window)."""
    _, plain, moved = activations
    for layer in LAYERS:
        for x, y in zip(plain[layer][:2], moved[layer][:2]):  # q, k
            before, after = picked(x, coarsen_on(implementation, x)), \
                picked(y, coarsen_on(implementation, y))
            assert torch.equal(before, after), \
                f"layer {layer}: {int((before != after).sum())} representatives moved"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_emu_and_reference_pick_the_same_tokens_and_layouts(activations, dtype):
    _, plain, _ = activations
    for layer in LAYERS:
        q, k = (t.to(dtype) for t in plain[layer][:2])
        for x in (q, k):
            cpu = coarsen_on("cpu", x)
            assert torch.equal(cpu, coarsen_on("emu", x)), f"layer {layer}: emu differs"
            assert torch.equal(cpu, coarsen_on("reference", x)), f"layer {layer}: reference"
        # cab_v3's layout reads the representatives and nothing else (cab_v4 adds the
        # oracle Gblk, whose kernels tests/test_ops_selection.py compares)
        with cpu_kernels():
            want = cabattn.select_blocks(q, k, "cab_v3", 0.9)
        with emulating():
            got = cabattn.select_blocks(q, k, "cab_v3", 0.9)
        assert torch.equal(want.block_count, got.block_count)
        assert torch.equal(want.block_index, got.block_index), \
            f"layer {layer}: the emulated CUDA kernels' layout differs"


@pytest.mark.parametrize("implementation", ["cpu", "emu", "reference"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_norms_a_rounding_apart_pick_the_first_token_in_either_order(implementation, dtype):
    """Token a and token b = a with one element one unit in the last place larger: norms a
    rounding apart. Whichever comes first in the block represents it (the first largest norm
    would pick b in both orders)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, generator=g, dtype=torch.float64).to(dtype)
    b = a.clone()
    largest = a.abs().argmax()
    b[largest] = (a[largest].double() * (1 + torch.finfo(dtype).eps)).to(dtype)
    assert b.double().norm() > a.double().norm()
    others = torch.randn(BLOCK - 2, 64, generator=g, dtype=torch.float64).to(dtype) * 0.1
    for first, second in ((a, b), (b, a)):
        x = torch.cat([others[:3], first[None], others[3:9], second[None], others[9:]])
        rep = coarsen_on(implementation, x[None, None].contiguous())
        assert torch.equal(rep[0, 0, 0], first), f"{implementation} picked the later token"
