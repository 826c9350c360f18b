"""CUDA kernels against the CPU kernels and the float64 reference, on the same fresh random
inputs: every operator, float16/bfloat16/float32 at head_dim 64 and 128, GQA ratios 1, 3, 4,
lengths that are not a multiple of the block size. Outputs are poisoned before every call.

The per-operator tests in test_ops_*.py run on CUDA too (the `device` fixture, opcheck
included); this file adds what needs both devices at once. Every test runs on the GPU when one
is present, and always on the CUDA kernels emulated on the CPU (`emu`: CPU tensors,
torch.ops.cabattn_emu, smaller shapes; tests/emulation.py). Every float output is held to
tests/helpers.py's bar: at most 2x the error of the PyTorch reference at the kernel's precision,
element-wise and in norm.
"""
import pytest
import torch
from helpers import (HALF_TYPES, assert_within_reference_error, poison_uninitialized,  # noqa: F401
                     qkv as make_qkv, random_layout, reference_dtype)

from cabattn import ops, reference
from emulation import CUDA_TARGETS, cuda_target

pytestmark = pytest.mark.usefixtures("poison_uninitialized")

ALL_TYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(params=CUDA_TARGETS)
def gpu(request):
    """Where the CUDA kernels run: .device of their tensors, .ops the cabattn.ops functions."""
    return cuda_target(request.param)


def qkv(gpu, batch, q_heads, kv_heads, length, dim, dtype, k_length=None):
    return make_qkv(batch, q_heads, kv_heads, length, dim, dtype=dtype, device=gpu.device,
                    k_length=k_length)


def assert_matches_reference(got, call, inputs, index, name, ulps=None):
    """Output `index` of a kernel against call(*inputs)[index] in float64 and at the kernel's
    precision."""
    precision = reference_dtype(inputs[0].dtype, got.dtype, "cuda")
    exact = call(*(t.double() if t.is_floating_point() else t for t in inputs))[index]
    same = call(*(t.to(precision) if t.is_floating_point() else t for t in inputs))[index]
    assert_within_reference_error(got, exact, same.to(got.dtype), name, ulps)


@pytest.mark.parametrize("dtype", ALL_TYPES)
@pytest.mark.parametrize("mode", [ops.MAX_L2, ops.MEAN])
@pytest.mark.parametrize("block_size", [16, 128])
def test_coarsen_matches_cpu(gpu, dtype, mode, block_size):
    x = torch.randn(2, 3, 333, 128, device=gpu.device, dtype=dtype)
    x[0, 0, 4] *= 10  # the largest token of block 0 ...
    x[0, 0, 5] = -x[0, 0, 4]  # ... tied with a different vector: the first index must win
    got = gpu.ops.coarsen(x, block_size, mode)
    want = ops.coarsen(x.cpu(), block_size, mode)
    if mode == ops.MAX_L2:
        assert torch.equal(got.cpu(), want)
        torch.testing.assert_close(got[0, 0, 0], x[0, 0, 4], rtol=0, atol=0)
    else:
        assert_matches_reference(got, lambda t: (reference.coarsen(t, block_size, mode),), (x,),
                                 0, "mean")


@pytest.mark.parametrize("dtype", ALL_TYPES)
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("block_size,heads", [(16, (4, 4)), (32, (6, 2)), (64, (8, 2)),
                                              (128, (3, 1))])
def test_block_scores_match_reference(gpu, dtype, dim, block_size, heads):
    q, k, _ = qkv(gpu, 2, heads[0], heads[1], 300, dim, dtype)
    scale = reference.default_scale(dim)
    sblk, gblk = gpu.ops.block_scores(q, k, block_size, scale)
    cpu_s, cpu_g = ops.block_scores(q.cpu(), k.cpu(), block_size, scale)
    # Inputs are exact in every dtype; the kernels accumulate in float32.
    for i, (got, cpu, name) in enumerate(((sblk, cpu_s, "Sblk"), (gblk, cpu_g, "Gblk"))):
        assert_matches_reference(got, lambda *t: reference.block_scores(*t, block_size, scale),
                                 (q, k), i, name)
        torch.testing.assert_close(got.cpu(), cpu, rtol=1e-5, atol=1e-6)
    # Each row's probabilities sum to 1: a query block's sums add up to its row count.
    rows = torch.full((sblk.shape[2],), float(block_size))
    rows[-1] = 300 - block_size * (sblk.shape[2] - 1)
    torch.testing.assert_close(sblk.sum(-1).cpu(), rows.expand_as(sblk.sum(-1).cpu()),
                               rtol=1e-4, atol=1e-4)


def exact_block_score_rows(q, k, block_size, scale, rows):
    """Sblk[..., I, :] and Gblk[..., I, :] for the query blocks I in `rows`, in float64 from
    those blocks' queries only (reference.block_scores would build the whole L x L matrix)."""
    length = q.shape[2]
    blocks = reference.num_blocks(length, block_size)
    k = k.double().cpu().repeat_interleave(q.shape[1] // k.shape[1], 1)
    sums, maxes = [], []
    for I in rows:
        first, end = I * block_size, min((I + 1) * block_size, length)
        logits = q[:, :, first:end].double().cpu() @ k[:, :, :end].transpose(-1, -2) * scale
        causal = torch.arange(end)[None, :] <= torch.arange(first, end)[:, None]
        p = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
        p = torch.nn.functional.pad(p, (0, blocks * block_size - end))
        p = p.view(*p.shape[:3], blocks, block_size)
        sums.append(p.sum((2, 4)))
        maxes.append(p.amax((2, 4)))
    return torch.stack(sums, 2), torch.stack(maxes, 2)


@pytest.mark.gpu  # L = 8K-32K is too long to emulate
@pytest.mark.parametrize("blocks", [520, 2000])
def test_block_scores_many_blocks(blocks):
    """Past 512 key blocks a query block's per-block statistics take several shared-memory
    windows (two QK^T passes); shared memory no longer grows with the number of blocks, so
    2000 blocks of 16 (L = 32K) run where 1,488 used to exceed an H100's 227 KB."""
    block_size, length = 16, blocks * 16 - 5
    q, k, _ = qkv(cuda_target("cuda"), 1, 2, 1, length, 64, torch.bfloat16)
    sblk, gblk = ops.block_scores(q, k, block_size, 0.125)
    rows = [0, 1, 511, 512, blocks - 2, blocks - 1]
    want_s, want_g = exact_block_score_rows(q, k, block_size, 0.125, rows)
    torch.testing.assert_close(sblk[:, :, rows].cpu(), want_s.float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gblk[:, :, rows].cpu(), want_g.float(), rtol=1e-4, atol=1e-6)
    sizes = torch.clamp(length - torch.arange(blocks) * block_size, max=block_size)
    torch.testing.assert_close(sblk.sum(-1).cpu(), sizes.float().expand(1, 2, blocks),
                               rtol=1e-4, atol=0)
    assert not sblk.triu(1).any() and not gblk.triu(1).any()


@pytest.mark.parametrize("formula", [ops.ADDITIVE, ops.MULTIPLICATIVE])
@pytest.mark.parametrize("normalization", [ops.ROW_MINMAX, ops.GLOBAL_MINMAX])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frc_scores_match_cpu_and_reference(gpu, formula, normalization, dtype):
    qc = torch.randn(2, 4, 37, 128, device=gpu.device, dtype=dtype)
    kc = torch.randn(2, 1, 37, 128, device=gpu.device, dtype=dtype)
    got = gpu.ops.frc_scores(qc, kc, 0.088, 0.3, formula, normalization)
    cpu = ops.frc_scores(qc.cpu(), kc.cpu(), 0.088, 0.3, formula, normalization)
    assert_matches_reference(
        got, lambda *t: (reference.frc_scores(*t, 0.088, 0.3, formula, normalization),),
        (qc, kc), 0, "frc")
    torch.testing.assert_close(got.cpu(), cpu, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shift", [0, 1])
@pytest.mark.parametrize("blocks", [1, 7, 64, 300])
@pytest.mark.parametrize("score_dtype", [torch.float32, torch.float64])
def test_select_blocks_matches_cpu(gpu, shift, blocks, score_dtype):
    blocks = min(blocks, 130) if gpu.emulated else blocks  # still two warps of ballots
    score1 = torch.randn(2, 3, blocks, blocks, dtype=score_dtype)
    score2 = torch.randn(2, 3, blocks, blocks, dtype=score_dtype)
    rows = torch.arange(blocks, dtype=torch.int32)
    budget = torch.clamp(rows + 1, max=max(1, blocks // 3))
    rule = torch.clamp(budget - shift, min=0)
    n_recent = torch.clamp(rule, max=2)
    n_sink = torch.clamp(rule - n_recent, max=1)
    n_score1 = (rule - n_recent - n_sink) // 2
    n_score2 = rule - n_recent - n_sink - n_score1
    counts = (n_recent, n_sink, n_score1, n_score2)
    max_count = int(budget.max()) + 1
    got = gpu.ops.select_blocks(score1.to(gpu.device), score2.to(gpu.device),
                                *[c.to(gpu.device) for c in counts], shift, max_count)
    want = ops.select_blocks(score1, score2, *counts, shift, max_count)
    ref = reference.select_blocks(score1, score2, *counts, shift, max_count)
    for g, w, r in zip(got, want, ref):
        assert torch.equal(g.cpu(), w) and torch.equal(g.cpu(), r)


def test_select_blocks_rejects_an_overfull_row(gpu):
    score = torch.randn(1, 1, 8, 8, device=gpu.device)
    n = torch.full((8,), 4, dtype=torch.int32, device=gpu.device)
    zero = torch.zeros(8, dtype=torch.int32, device=gpu.device)
    with pytest.raises(RuntimeError, match="max_count"):
        gpu.ops.select_blocks(score, None, n, zero, zero, zero, 1, 2)


@pytest.mark.parametrize("dtype", ALL_TYPES)
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("block_size,heads,budget", [
    (16, (4, 4), 1), (32, (6, 2), 3), (64, (8, 2), 100), (128, (4, 1), 2)])
def test_block_sparse_attention_within_reference_error(gpu, dtype, dim, block_size, heads,
                                                       budget):
    length = 333 if block_size < 128 else (200 if gpu.emulated else 700)
    q, k, v = qkv(gpu, 2, heads[0], heads[1], length, dim, dtype)
    blocks = reference.num_blocks(length, block_size)
    count, index = random_layout(2, heads[0], blocks, budget, device=gpu.device)
    scale = reference.default_scale(dim)
    out, lse = gpu.ops.block_sparse_attention(q, k, v, count, index, block_size, scale)
    assert out.dtype == dtype and lse.dtype == torch.float32
    for i, (got, name) in enumerate(((out, "out"), (lse, "lse"))):
        assert_matches_reference(
            got, lambda *t: reference.block_sparse_attention(*t, block_size, scale),
            (q, k, v, count, index), i, name)
    cpu_out, cpu_lse = ops.block_sparse_attention(q.cpu(), k.cpu(), v.cpu(), count.cpu(),
                                                  index.cpu(), block_size, scale)
    torch.testing.assert_close(lse.cpu(), cpu_lse, rtol=1e-5, atol=1e-5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.cpu().float(), cpu_out.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_block_sparse_attention_all_blocks_is_dense(gpu, dtype):
    length = 300 if gpu.emulated else 1000
    q, k, v = qkv(gpu, 1, 8, 2, length, 128, dtype)
    blocks = reference.num_blocks(length, 64)
    count, index = random_layout(1, 8, blocks, blocks, device=gpu.device)
    out, _ = gpu.ops.block_sparse_attention(q, k, v, count, index, 64, 0.1)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double().repeat_interleave(4, 1), v.double().repeat_interleave(4, 1),
        is_causal=True, scale=0.1)
    same = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), is_causal=True, scale=0.1)
    assert_within_reference_error(out, dense, same, "all-blocks out")


@pytest.mark.parametrize("dtype", ALL_TYPES)
@pytest.mark.parametrize("dim", [64, 128])
# Short chunks against long caches split their keys across thread blocks (split-K: 8 splits
# at (8, 2), 1, 1000; 4 at (4, 1), 16, 700, and 2 at (6, 2), 37, 200 and (8, 2), 128, 300,
# whose first rows see none of the last split's keys); the others run unsplit.
@pytest.mark.parametrize("heads,q_len,k_len", [((4, 4), 1, 1), ((6, 2), 37, 200),
                                               ((8, 2), 128, 300), ((3, 1), 70, 70),
                                               ((8, 2), 1, 1000), ((4, 1), 16, 700)])
def test_attention_with_scores_within_reference_error(gpu, dtype, dim, heads, q_len, k_len):
    q, k, v = qkv(gpu, 2, heads[0], heads[1], q_len, dim, dtype, k_length=k_len)
    scale = reference.default_scale(dim)
    out, lse, mass = gpu.ops.attention_with_scores(q, k, v, scale)
    # mass adds up to Lq x group probabilities per key: a few float32 units (test_ops_attention)
    for i, (got, name, ulps) in enumerate(((out, "out", None), (lse, "lse", None),
                                           (mass, "mass", 8))):
        assert_matches_reference(got, lambda *t: reference.attention_with_scores(*t, scale),
                                 (q, k, v), i, name, ulps)
    # Every query's probabilities sum to 1 over the keys and heads of its group.
    torch.testing.assert_close(mass.sum(-1).cpu(),
                               torch.full(mass.shape[:2], float(q_len * heads[0] // heads[1]),
                                          dtype=torch.float32), rtol=1e-4, atol=1e-4)
    cpu = ops.attention_with_scores(q.cpu(), k.cpu(), v.cpu(), scale)
    torch.testing.assert_close(mass.cpu(), cpu[2], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape,dtype", [((2, 3, 500, 128), torch.bfloat16),
                                         ((2, 3, 500, 64), torch.float32),
                                         ((2, 3, 500), torch.float32),
                                         ((1, 2, 99, 3), torch.float16)])
def test_kv_compact_matches_cpu(gpu, shape, dtype):
    x = torch.randn(shape, device=gpu.device).to(dtype)
    kept = shape[2] // 3
    keep = torch.rand(shape[0], shape[1], shape[2]).argsort(-1)[..., :kept].sort(-1).values
    got, cpu = x.clone(), x.cpu().clone()  # x.cpu() is x itself on the emulated target
    gpu.ops.kv_compact_(got, keep.to(gpu.device))
    ops.kv_compact_(cpu, keep)
    assert torch.equal(got.cpu(), cpu)
    want = x.cpu().clone()
    reference.kv_compact_(want, keep)
    assert torch.equal(got.cpu(), want)


def test_cuda_errors_name_the_bad_value(gpu):
    q, k, v = qkv(gpu, 1, 2, 2, 64, 96, torch.bfloat16)
    count, index = random_layout(1, 2, 4, 2)
    with pytest.raises(RuntimeError, match="head_dim 96"):
        gpu.ops.block_sparse_attention(q, k, v, count.to(gpu.device), index.to(gpu.device), 16,
                                       0.1)
    if gpu.device == "cuda":
        with pytest.raises(RuntimeError, match="is on"):
            ops.block_sparse_attention(q, k, v, count, index, 16, 0.1)
