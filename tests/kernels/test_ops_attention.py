"""block_sparse_attention and attention_with_scores against cabattn.reference.

The kernel's error against the float64 reference is at most twice the error of the reference
run at the kernel's precision (docs/operators.md; tests/helpers.py says which); outputs are
poisoned before every call so an unwritten element shows as NaN.
"""
import pytest
import torch
from helpers import (assert_outputs_match_reference, assert_within_reference_error,
                     dtypes_for, poison_uninitialized, qkv, random_layout)  # noqa: F401

from cabattn import ops, reference
from emulation import emulated, runs_cuda_kernels, xfail_if_emulated

pytestmark = pytest.mark.usefixtures("poison_uninitialized")


def inputs(device, dtype, batch, kv_heads, ratio, lq, lk, dim):
    return qkv(batch, kv_heads * ratio, kv_heads, lq, dim, dtype=dtype, device=device,
               k_length=lk)


# The kernels add a key's mass over the chunk's queries and the group's heads in order, the
# reference pairwise: measured up to 4 float32 units of the largest mass (390 terms).
ULPS = {"mass": 8}


def assert_matches_reference(got, call, inputs, device, names):
    assert_outputs_match_reference(got, call, inputs, device, names, ULPS)


@pytest.mark.parametrize("ratio", [1, 3, 4])
@pytest.mark.parametrize("length,block_size,dim,keep", [
    (200, 16, 64, 1), (200, 16, 64, 5), (130, 32, 128, 100), (96, 64, 32, 2),
    (70, 16, 40, 3)])  # head dim 40: the CPU's PV past its 16-column slabs
def test_block_sparse_attention_matches_reference(device, ratio, length, block_size, dim, keep):
    for dtype in dtypes_for(device):
        if dim not in (64, 128) and runs_cuda_kernels(device):
            continue
        q, k, v = inputs(device, dtype, 2, 2, ratio, length, length, dim)
        blocks = reference.num_blocks(length, block_size)
        count, index = random_layout(2, 2 * ratio, blocks, keep, device)
        scale = dim ** -0.5
        out, lse = ops.block_sparse_attention(q, k, v, count, index, block_size, scale)
        assert out.dtype == dtype and lse.dtype == torch.float32
        assert_matches_reference(
            (out, lse), lambda *t: reference.block_sparse_attention(*t, block_size, scale),
            (q, k, v, count, index), device, ["out", "lse"])


def test_all_blocks_is_causal_sdpa(device):
    q, k, v = inputs(device, torch.float32, 1, 3, 3, 300, 300, 64)
    count, index = random_layout(1, 9, reference.num_blocks(300, 16), 1000, device)
    out, _ = ops.block_sparse_attention(q, k, v, count, index, 16, 0.125)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), is_causal=True, scale=0.125)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("lq,lk", [(1, 300), (1, 1), (37, 150), (130, 130)])
@pytest.mark.parametrize("ratio", [1, 3])
def test_attention_with_scores_matches_reference(device, lq, lk, ratio):
    for dtype in dtypes_for(device):
        q, k, v = inputs(device, dtype, 2, 2, ratio, lq, lk, 64)
        out, lse, mass = ops.attention_with_scores(q, k, v, 0.125)
        assert mass.shape == (2, 2, lk) and mass.dtype == torch.float32
        assert_matches_reference((out, lse, mass),
                                 lambda *t: reference.attention_with_scores(*t, 0.125),
                                 (q, k, v), device, ["out", "lse", "mass"])
        # every query distributes probability 1 over the keys it sees
        torch.testing.assert_close(mass.double().sum(-1), torch.full((2, 2), float(lq * ratio),
                                   dtype=torch.float64, device=device), rtol=1e-4, atol=1e-4)


def test_opcheck(device):
    if emulated():
        pytest.skip("opcheck checks the registration of torch.ops.cabattn; the emulated "
                    "operators are test-only (their schemas: test_emulation.py)")
    q, k, v = inputs(device, torch.float32, 1, 2, 2, 70, 70, 64)
    count, index = random_layout(1, 4, reference.num_blocks(70, 16), 2, device)
    torch.library.opcheck(torch.ops.cabattn.block_sparse_attention,
                          (q, k, v, count, index, 16, 0.125))
    torch.library.opcheck(torch.ops.cabattn.attention_with_scores, (q[:, :, -5:].contiguous(),
                                                                     k, v, 0.125))


def test_bad_layouts_raise_as_on_cpu(device, raises_as_on_cpu):
    """A layout the kernels cannot honour raises the CPU's error on every device, and a later
    call still works (no device-side assert poisons the process)."""
    q, k, v = inputs("cpu", torch.float32, 1, 2, 2, 64, 64, 64)
    count, index = random_layout(1, 4, reference.num_blocks(64, 16), 2, "cpu")
    future, duplicate, empty, overfull, negative = (t.clone() for t in (index,) * 5)
    future[0, 0, 1, 0] = 3            # row 1 may only list blocks 0..1
    duplicate[0, 1, 2, :2] = 2        # [2, 2]: counted twice
    empty_count = count.clone()
    empty_count[0, 2, 3] = 0          # every row keeps at least its diagonal
    overfull_count = count.clone()
    overfull_count[0, 3, 3] = 3       # more than max_count = 2
    negative[0, 3, 2, 0] = -1
    for layout in [(count, future), (count, duplicate), (empty_count, empty),
                   (overfull_count, overfull), (count, negative)]:
        message = raises_as_on_cpu(ops.block_sparse_attention, q, k, v, *layout, 16, 0.1)
        assert "block_count" in message or "block_index" in message, message
    q, k, v, count, index = (t.to(device) for t in (q, k, v, count, index))
    out, lse = ops.block_sparse_attention(q, k, v, count, index, 16, 0.1)
    exact = reference.block_sparse_attention(q.double(), k.double(), v.double(), count, index,
                                             16, 0.1)
    assert_within_reference_error(
        out, exact[0], reference.block_sparse_attention(q, k, v, count, index, 16, 0.1)[0])


def test_bad_inputs_say_what_is_wrong(device):
    q, k, v = inputs(device, torch.float32, 1, 2, 2, 64, 64, 64)
    count, index = random_layout(1, 4, reference.num_blocks(64, 16), 2, device)
    cases = [
        ((q[0], k, v, count, index, 16, 0.1), "q must be 4-D"),
        ((q, k[:, :1].expand(1, 3, 64, 64).contiguous(), v, count, index, 16, 0.1),
         "must be a multiple of kv_heads"),
        ((q.int(), k, v, count, index, 16, 0.1), "supported: float32, float16, bfloat16"),
        ((q.transpose(2, 3), k, v, count, index, 16, 0.1), "must be contiguous"),
        ((q, k, v, count, index, 24, 0.1), "valid: 16, 32, 64, 128"),
    ]
    if device == "cpu":  # layout values: the CUDA kernel checks shapes only (no host copy)
        bad_index = index.clone()
        bad_index[0, 0, 1, 0] = 3  # a future block
        cases.append(((q, k, v, count, bad_index, 16, 0.1), "block_index"))
    if device == "cuda":
        cases.append(((q.cpu(), k, v, count, index, 16, 0.1), "device"))
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            ops.block_sparse_attention(*args)
    with pytest.raises(RuntimeError, match="multiple of kv_heads"):
        ops.attention_with_scores(q[:, :3].contiguous(), k, v, 0.1)
