"""CUDA kernels against the CPU kernels and the float64 reference, on the same fresh random
inputs: every operator, float16/bfloat16/float32 at head_dim 64 and 128, GQA ratios 1, 3, 4,
lengths that are not a multiple of the block size, and torch.library.opcheck on CUDA.

The per-operator tests in test_ops_*.py run on CUDA too (the `device` fixture); this file adds
what needs both devices at once. Every test runs on the GPU when one is present, and always on
the CUDA kernels emulated on the CPU (`emu`: CPU tensors, torch.ops.cabattn_emu; tests/emulation.py). Attention outputs must be within 2x the error of the
same-precision PyTorch reference (plus 1e-6 for float32, whose errors are at rounding level).
"""
import pytest
import torch

from cabattn import ops, reference
from emulation import CUDA_TARGETS, cuda_target

HALF_TYPES = [torch.float16, torch.bfloat16]
ALL_TYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(params=CUDA_TARGETS)
def gpu(request):
    """Where the CUDA kernels run: .device of their tensors, .ops the cabattn.ops functions."""
    return cuda_target(request.param)


def qkv(gpu, batch, q_heads, kv_heads, length, dim, dtype, k_length=None):
    k_length = k_length or length
    q = torch.randn(batch, q_heads, length, dim, device=gpu.device, dtype=dtype)
    k = torch.randn(batch, kv_heads, k_length, dim, device=gpu.device, dtype=dtype)
    v = torch.randn(batch, kv_heads, k_length, dim, device=gpu.device, dtype=dtype)
    return q, k, v


def relative_error(got, want):
    got, want = got.double().cpu(), want.double().cpu()
    return ((got - want).norm() / want.norm()).item()


def assert_within_reference_error(got, want64, same_precision, name):
    """The kernel's error against float64 at most 2x that of the same-precision reference."""
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    kernel = relative_error(got, want64)
    ref = relative_error(same_precision, want64)
    assert kernel <= 2 * ref + 1e-6, f"{name}: error {kernel:.3e} > 2 x reference {ref:.3e}"


def random_layout(batch, heads, blocks, budget, generator=None):
    """A CSR layout keeping the diagonal plus random earlier blocks, min(I + 1, budget) per row."""
    scores = torch.rand(batch, heads, blocks, blocks, generator=generator)
    causal = torch.ones(blocks, blocks, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, -1.0)
    scores.diagonal(dim1=-2, dim2=-1).fill_(2.0)
    top = scores.topk(min(budget, blocks), dim=-1).indices
    count = torch.clamp(torch.arange(blocks) + 1, max=budget).int().expand(batch, heads, blocks)
    slots = torch.arange(top.shape[-1])
    index = torch.where(slots < count[..., None], top, blocks).sort(-1).values
    index = torch.where(index == blocks, -1, index)
    return count.contiguous(), index.int().contiguous()


@pytest.mark.parametrize("dtype", ALL_TYPES)
@pytest.mark.parametrize("mode", [ops.MAX_L2, ops.MEAN])
@pytest.mark.parametrize("block_size", [16, 128])
def test_coarsen_matches_cpu(gpu, dtype, mode, block_size):
    x = torch.randn(2, 3, 333, 128, device=gpu.device, dtype=dtype)
    x[0, 0, 4] *= 10  # the largest token of block 0 ...
    x[0, 0, 5] = x[0, 0, 4]  # ... tied with its neighbour: the first index must win
    got = gpu.ops.coarsen(x, block_size, mode)
    want = ops.coarsen(x.cpu(), block_size, mode)
    if mode == ops.MAX_L2:
        assert torch.equal(got.cpu(), want)
    else:
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got.cpu(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", ALL_TYPES)
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("block_size,heads", [(16, (4, 4)), (32, (6, 2)), (64, (8, 2)),
                                              (128, (3, 1))])
def test_block_scores_match_reference(gpu, dtype, dim, block_size, heads):
    q, k, _ = qkv(gpu, 2, heads[0], heads[1], 300, dim, dtype)
    scale = reference.default_scale(dim)
    sblk, gblk = gpu.ops.block_scores(q, k, block_size, scale)
    want_s, want_g = reference.block_scores(q.double(), k.double(), block_size, scale)
    cpu_s, cpu_g = ops.block_scores(q.cpu(), k.cpu(), block_size, scale)
    # Inputs are exact in every dtype; only the fp32 accumulation differs from float64.
    for got, want, cpu in ((sblk, want_s, cpu_s), (gblk, want_g, cpu_g)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.cpu(), want.float().cpu(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got.cpu(), cpu, rtol=1e-4, atol=1e-6)
    # Each row's probabilities sum to 1: a query block's sums add up to its row count.
    rows = torch.full((sblk.shape[2],), float(block_size))
    rows[-1] = 300 - block_size * (sblk.shape[2] - 1)
    torch.testing.assert_close(sblk.sum(-1).cpu(), rows.expand_as(sblk.sum(-1).cpu()),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("formula", [ops.ADDITIVE, ops.MULTIPLICATIVE])
@pytest.mark.parametrize("normalization", [ops.ROW_MINMAX, ops.GLOBAL_MINMAX])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frc_scores_match_cpu_and_reference(gpu, formula, normalization, dtype):
    qc = torch.randn(2, 4, 37, 128, device=gpu.device, dtype=dtype)
    kc = torch.randn(2, 1, 37, 128, device=gpu.device, dtype=dtype)
    got = gpu.ops.frc_scores(qc, kc, 0.088, 0.3, formula, normalization)
    want = reference.frc_scores(qc.cpu(), kc.cpu(), 0.088, 0.3, formula, normalization)
    cpu = ops.frc_scores(qc.cpu(), kc.cpu(), 0.088, 0.3, formula, normalization)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.cpu(), cpu, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shift", [0, 1])
@pytest.mark.parametrize("blocks", [1, 7, 64, 300])
@pytest.mark.parametrize("score_dtype", [torch.float32, torch.float64])
def test_select_blocks_matches_cpu(gpu, shift, blocks, score_dtype):
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
    length = 333 if block_size < 128 else 700
    q, k, v = qkv(gpu, 2, heads[0], heads[1], length, dim, dtype)
    blocks = reference.num_blocks(length, block_size)
    count, index = random_layout(2, heads[0], blocks, budget)
    count, index = count.to(gpu.device), index.to(gpu.device)
    scale = reference.default_scale(dim)
    out, lse = gpu.ops.block_sparse_attention(q, k, v, count, index, block_size, scale)
    want_out, want_lse = reference.block_sparse_attention(q.double(), k.double(), v.double(),
                                                          count, index, block_size, scale)
    same_out, _ = reference.block_sparse_attention(q, k, v, count, index, block_size, scale)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_within_reference_error(out, want_out, same_out, "out")
    torch.testing.assert_close(lse.cpu(), want_lse.float().cpu(), rtol=1e-5, atol=1e-5)
    cpu_out, cpu_lse = ops.block_sparse_attention(q.cpu(), k.cpu(), v.cpu(), count.cpu(),
                                                  index.cpu(), block_size, scale)
    torch.testing.assert_close(lse.cpu(), cpu_lse, rtol=1e-5, atol=1e-5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.cpu().float(), cpu_out.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_block_sparse_attention_all_blocks_is_dense(gpu, dtype):
    q, k, v = qkv(gpu, 1, 8, 2, 1000, 128, dtype)
    blocks = reference.num_blocks(1000, 64)
    count, index = random_layout(1, 8, blocks, blocks)
    out, _ = gpu.ops.block_sparse_attention(q, k, v, count.to(gpu.device), index.to(gpu.device),
                                            64, 0.1)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double().repeat_interleave(4, 1), v.double().repeat_interleave(4, 1),
        is_causal=True, scale=0.1)
    same = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), is_causal=True, scale=0.1)
    assert_within_reference_error(out, dense, same, "all-blocks out")


@pytest.mark.parametrize("dtype", ALL_TYPES)
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("heads,q_len,k_len", [((4, 4), 1, 1), ((6, 2), 37, 200),
                                               ((8, 2), 128, 300), ((3, 1), 70, 70)])
def test_attention_with_scores_within_reference_error(gpu, dtype, dim, heads, q_len, k_len):
    q, k, v = qkv(gpu, 2, heads[0], heads[1], q_len, dim, dtype, k_length=k_len)
    scale = reference.default_scale(dim)
    out, lse, mass = gpu.ops.attention_with_scores(q, k, v, scale)
    want = reference.attention_with_scores(q.double(), k.double(), v.double(), scale)
    same = reference.attention_with_scores(q, k, v, scale)
    assert_within_reference_error(out, want[0], same[0], "out")
    torch.testing.assert_close(lse.cpu(), want[1].float().cpu(), rtol=1e-5, atol=1e-5)
    # Every query's probabilities sum to 1 over the keys and heads of its group.
    torch.testing.assert_close(mass.sum(-1).cpu(),
                               torch.full(mass.shape[:2], float(q_len * heads[0] // heads[1]),
                                          dtype=torch.float32), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mass.cpu(), want[2].float().cpu(), rtol=1e-4, atol=1e-5)
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
    got, cpu = x.clone(), x.cpu()
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device present")
def test_opcheck_on_cuda():
    opcheck = torch.library.opcheck
    q, k, v = qkv(cuda_target("cuda"), 1, 4, 2, 100, 64, torch.bfloat16)
    count, index = random_layout(1, 4, 7, 3)
    opcheck(torch.ops.cabattn.coarsen.default, (q, 16, ops.MAX_L2))
    opcheck(torch.ops.cabattn.block_scores.default, (q, k, 16, 0.125))
    qc, kc = ops.coarsen(q, 16), ops.coarsen(k, 16)
    opcheck(torch.ops.cabattn.frc_scores.default, (qc, kc, 0.125, 0.3, ops.ADDITIVE,
                                                   ops.ROW_MINMAX))
    n = torch.ones(7, dtype=torch.int32, device="cuda")
    opcheck(torch.ops.cabattn.select_blocks.default,
            (torch.randn(1, 4, 7, 7, device="cuda"), None, n, n, n, n * 0, 1, 4))
    opcheck(torch.ops.cabattn.block_sparse_attention.default,
            (q, k, v, count.cuda(), index.cuda(), 16, 0.125))
    opcheck(torch.ops.cabattn.attention_with_scores.default, (q[:, :, -10:].contiguous(), k, v,
                                                              0.125))
    keep = torch.arange(0, 100, 2, device="cuda").expand(1, 2, -1).contiguous()
    opcheck(torch.ops.cabattn.kv_compact_.default, (k.clone(), keep))
