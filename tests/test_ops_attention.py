"""block_sparse_attention and attention_with_scores against cabattn.reference.

The kernel's error against the float64 reference is at most twice the error of the reference
run in the kernel's own precision (KERNELS.md); outputs are poisoned first by the allocator
fill below so an unwritten element shows as NaN.
"""
import pytest
import torch

from cabattn import ops, reference
from emulation import emulated, runs_cuda_kernels, xfail_if_emulated

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
FLOOR = 2 ** -23  # float32 rounding of the float32 outputs (lse, mass)


def dtypes_for(device):
    return [d for d in DTYPES if not (d == torch.float64 and runs_cuda_kernels(device))]


def assert_error_within(kernel, ref_same_precision, exact, floor=FLOOR):
    assert not torch.isnan(kernel).any(), "unwritten (NaN) elements"
    kernel_err = (kernel.double() - exact.double()).abs().max().item()
    ref_err = (ref_same_precision.double() - exact.double()).abs().max().item()
    assert kernel_err <= 2 * ref_err + floor * max(1.0, exact.abs().max().item()), (
        kernel_err, ref_err)


def inputs(device, dtype, batch, kv_heads, ratio, lq, lk, dim):
    q = torch.randn(batch, kv_heads * ratio, lq, dim, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, lk, dim, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, lk, dim, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)]


def random_layout(batch, heads, length, block_size, keep, device, seed=0):
    """A layout keeping `keep` blocks per row (fewer where fewer exist), diagonal included."""
    m = reference.num_blocks(length, block_size)
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(batch, heads, m, m, generator=g)
    rows = torch.arange(m)
    n = torch.clamp(rows + 1, max=keep).int() - 1
    zeros = torch.zeros(m, dtype=torch.int32)
    count, index = reference.select_blocks(scores, None, zeros, zeros, n, zeros, 0, keep)
    return count.to(device), index.to(device)


@pytest.fixture(autouse=True)
def _poison_cpu_allocations():
    """Fresh CPU tensors from torch.empty come filled with NaN while a test runs."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("ratio", [1, 3, 4])
@pytest.mark.parametrize("length,block_size,dim,keep", [
    (200, 16, 64, 1), (200, 16, 64, 5), (130, 32, 128, 100), (96, 64, 32, 2)])
def test_block_sparse_attention_matches_reference(device, ratio, length, block_size, dim, keep):
    for dtype in dtypes_for(device):
        if dim not in (64, 128) and runs_cuda_kernels(device):
            continue
        q, k, v = inputs(device, dtype, 2, 2, ratio, length, length, dim)
        count, index = random_layout(2, 2 * ratio, length, block_size, keep, device)
        scale = dim ** -0.5
        out, lse = ops.block_sparse_attention(q, k, v, count, index, block_size, scale)
        same = reference.block_sparse_attention(q, k, v, count, index, block_size, scale)
        exact = reference.block_sparse_attention(q.double(), k.double(), v.double(), count,
                                                 index, block_size, scale)
        assert out.dtype == dtype and lse.dtype == torch.float32
        assert_error_within(out, same[0], exact[0])
        assert_error_within(lse, same[1], exact[1])


def test_all_blocks_is_causal_sdpa(device):
    q, k, v = inputs(device, torch.float32, 1, 3, 3, 300, 300, 64)
    count, index = random_layout(1, 9, 300, 16, 1000, device)
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
        same = reference.attention_with_scores(q, k, v, 0.125)
        exact = reference.attention_with_scores(q.double(), k.double(), v.double(), 0.125)
        assert mass.shape == (2, 2, lk) and mass.dtype == torch.float32
        for got, ref_same, ref_exact in zip((out, lse, mass), same, exact):
            assert_error_within(got, ref_same, ref_exact)
        # every query distributes probability 1 over the keys it sees
        torch.testing.assert_close(mass.double().sum(-1), torch.full((2, 2), float(lq * ratio),
                                   dtype=torch.float64, device=device), rtol=1e-4, atol=1e-4)


def test_opcheck(device):
    if emulated():
        pytest.skip("opcheck checks the registration of torch.ops.cabattn; the emulated "
                    "operators are test-only (their schemas: test_emulation.py)")
    q, k, v = inputs(device, torch.float32, 1, 2, 2, 70, 70, 64)
    count, index = random_layout(1, 4, 70, 16, 2, device)
    torch.library.opcheck(torch.ops.cabattn.block_sparse_attention,
                          (q, k, v, count, index, 16, 0.125))
    torch.library.opcheck(torch.ops.cabattn.attention_with_scores, (q[:, :, -5:].contiguous(),
                                                                     k, v, 0.125))


def test_bad_inputs_say_what_is_wrong(device, request):
    xfail_if_emulated(request, "finding 2: block_sparse_attention.cu checks only the layout's "
                      "shapes, so a future block index does not raise")
    q, k, v = inputs(device, torch.float32, 1, 2, 2, 64, 64, 64)
    count, index = random_layout(1, 4, 64, 16, 2, device)
    cases = [
        ((q[0], k, v, count, index, 16, 0.1), "q must be 4-D"),
        ((q, k[:, :1].expand(1, 3, 64, 64).contiguous(), v, count, index, 16, 0.1),
         "must be a multiple of kv_heads"),
        ((q.int(), k, v, count, index, 16, 0.1), "supported: float32, float16, bfloat16"),
        ((q.transpose(2, 3), k, v, count, index, 16, 0.1), "must be contiguous"),
        ((q, k, v, count, index, 24, 0.1), "valid: 16, 32, 64, 128"),
    ]
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
