"""coarsen, block_scores, frc_scores, select_blocks and kv_compact_ against cabattn.reference.

Float ops: the kernel's error against the float64 reference is at most twice the error of the
reference run at the kernel's precision (tests/helpers.py); outputs are poisoned before every
call. Selection: identical layouts on tie-free scores. Head dim 64: one the CUDA kernels take.
"""
import re

import pytest
import torch
from helpers import (assert_within_reference_error, dtypes_for, poison_uninitialized,  # noqa: F401
                     qkv, reference_dtype)

from cabattn import ops, reference
from emulation import emulated, xfail_if_emulated

pytestmark = pytest.mark.usefixtures("poison_uninitialized")
DIM = 64


def gqa_inputs(device, dtype, batch, kv_heads, ratio, length, scale=1.0):
    q, k, _ = qkv(batch, kv_heads * ratio, kv_heads, length, DIM, dtype=dtype, device=device,
                  scale=scale)
    return q, k


def assert_matches_reference(got, call, inputs, device):
    """The kernel's output `got` against call(*inputs) in float64 and at the kernel's
    precision."""
    precision = reference_dtype(inputs[0].dtype, got.dtype, device)
    assert_within_reference_error(got, call(*(t.double() for t in inputs)),
                                  call(*(t.to(precision) for t in inputs)).to(got.dtype))


# ---------------------------------------------------------------------------------- coarsen

@pytest.mark.parametrize("block_size,length", [(16, 70), (32, 64), (128, 130)])
@pytest.mark.parametrize("mode", [reference.MAX_L2, reference.MEAN])
def test_coarsen_matches_reference(device, block_size, length, mode):
    for dtype in dtypes_for(device):
        x = torch.randn(2, 3, length, 24, dtype=torch.float64).to(device=device, dtype=dtype)
        out = ops.coarsen(x, block_size, mode)
        assert out.dtype == dtype and out.shape == (2, 3, reference.num_blocks(length, block_size), 24)
        if mode == reference.MAX_L2:  # a copied token: exact
            torch.testing.assert_close(out, reference.coarsen(x, block_size, mode), rtol=0, atol=0)
        else:
            assert_matches_reference(out, lambda t: reference.coarsen(t, block_size, mode), (x,),
                                     device)


def test_coarsen_mean_of_128_tokens_within_reference_error(device):
    """A mean of 128 tokens far from zero: summed one token at a time in float32 it loses more
    than twice what the reference's pairwise float32 sum loses; the kernels sum in double."""
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = (torch.randn(2, 3, 300, 128, dtype=torch.float64) + 3).to(device=device, dtype=dtype)
        out = ops.coarsen(x, 128, reference.MEAN)
        assert_matches_reference(out, lambda t: reference.coarsen(t, 128, reference.MEAN), (x,),
                                 device)


def test_coarsen_max_l2_ties_go_to_first_token(device):
    x = torch.randn(1, 1, 32, DIM, device=device)
    x[0, 0, 5:10] *= 100  # far above the rest; 6..8 scaled back below them
    x[0, 0, 6:9] *= 1e-3
    x[0, 0, 9] = -x[0, 0, 5]  # the same squares in the same order: exactly equal norms
    out = ops.coarsen(x, 16, reference.MAX_L2)
    torch.testing.assert_close(out[0, 0, 0], x[0, 0, 5], rtol=0, atol=0)


# ----------------------------------------------------------------------------- block_scores

@pytest.mark.parametrize("batch,kv_heads,ratio,length,block_size",
                         [(2, 2, 1, 100, 16), (1, 1, 3, 300, 32), (2, 1, 4, 200, 64),
                          (1, 1, 2, 1100, 128)])
def test_block_scores_matches_reference(device, batch, kv_heads, ratio, length, block_size,
                                       request):
    if length == 1100:
        # At the bar: 2.4x in the build that found it; a rebuild whose inlining moved the host
        # compiler's FMA contraction measured Sblk 0.97x and Gblk 2.42x in norm, which the bar's
        # units of slack let pass.
        xfail_if_emulated(request, "found by the emulation: block_scores.cu's float32 error is "
                          "at 2x the float32 reference's at L=1100, block_size=128",
                          strict=False)
    for dtype in dtypes_for(device):
        q, k = gqa_inputs(device, dtype, batch, kv_heads, ratio, length, scale=1.5)
        scale = 0.3
        sblk, gblk = ops.block_scores(q, k, block_size, scale)
        assert sblk.dtype == gblk.dtype == torch.float32
        for i, got in enumerate((sblk, gblk)):
            assert_matches_reference(
                got, lambda *t: reference.block_scores(*t, block_size, scale)[i], (q, k), device)
        # Every query row's probabilities sum to one; blocks above the diagonal stay zero.
        sizes = torch.clamp(length - torch.arange(sblk.shape[-1]) * block_size, max=block_size)
        torch.testing.assert_close(sblk.sum(-1).double().cpu(),
                                   sizes.double().expand(sblk.shape[:-1]), rtol=1e-4, atol=0)
        assert not sblk.triu(1).any() and not gblk.triu(1).any()


# ------------------------------------------------------------------------------- frc_scores

@pytest.mark.parametrize("formula", [reference.ADDITIVE, reference.MULTIPLICATIVE])
@pytest.mark.parametrize("normalization", [reference.ROW_MINMAX, reference.GLOBAL_MINMAX])
@pytest.mark.parametrize("batch,kv_heads,ratio,blocks", [(2, 2, 1, 9), (1, 1, 3, 17), (2, 1, 4, 33)])
def test_frc_scores_matches_reference(device, formula, normalization, batch, kv_heads, ratio,
                                      blocks):
    for dtype in dtypes_for(device):
        qc, kc = gqa_inputs(device, dtype, batch, kv_heads, ratio, blocks)
        f = ops.frc_scores(qc, kc, 0.25, 0.3, formula, normalization)
        assert f.dtype == torch.float32
        assert_matches_reference(
            f, lambda *t: reference.frc_scores(*t, 0.25, 0.3, formula, normalization), (qc, kc),
            device)
        assert not f.triu(1).any()


# ---------------------------------------------------------------------------- select_blocks

def tie_free_scores(batch, heads, blocks, device, dtype=torch.float32):
    """Distinct values, exactly representable in every float dtype (integers below 2^8)."""
    perm = torch.stack([torch.randperm(blocks) for _ in range(batch * heads * blocks)])
    return perm.view(batch, heads, blocks, blocks).to(device=device, dtype=dtype)


def counts(values, device):
    return torch.as_tensor(values, dtype=torch.int32, device=device)


def random_plan(blocks, shift, device):
    """Per-row counts and the max_count that fits them (mixing overlaps and clamping)."""
    n_recent = torch.randint(0, 4, (blocks,))
    n_sink = torch.randint(0, 3, (blocks,))
    n_score1 = torch.randint(0, 5, (blocks,))
    n_score2 = torch.randint(0, 5, (blocks,))
    max_count = int(min(blocks, (n_recent + n_sink + n_score1 + n_score2).max() + 1))
    return [counts(c, device) for c in (n_recent, n_sink, n_score1, n_score2)], shift, max_count


@pytest.mark.parametrize("shift", [0, 1])
@pytest.mark.parametrize("batch,heads,blocks", [(2, 3, 7), (1, 4, 40)])
def test_select_blocks_matches_reference(device, shift, batch, heads, blocks):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        s1 = tie_free_scores(batch, heads, blocks, device, dtype)
        s2 = tie_free_scores(batch, heads, blocks, device, dtype)
        (n_recent, n_sink, n1, n2), shift, max_count = random_plan(blocks, shift, device)
        got = ops.select_blocks(s1, s2, n_recent, n_sink, n1, n2, shift, max_count)
        want = reference.select_blocks(s1, s2, n_recent, n_sink, n1, n2, shift, max_count)
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


@pytest.mark.parametrize("shift", [0, 1])
def test_select_blocks_budget_extremes(device, shift):
    """Budget of 1 block (the diagonal only) and of all causal blocks (every j <= I)."""
    blocks = 11
    s1 = tie_free_scores(2, 3, blocks, device)
    zeros = counts([0] * blocks, device)
    count, index = ops.select_blocks(s1, None, zeros, zeros, zeros, zeros, shift, 1)
    assert (count == 1).all()
    assert (index[..., 0] == torch.arange(blocks, device=device, dtype=torch.int32)).all()

    everything = counts([blocks] * blocks, device)
    count, index = ops.select_blocks(s1, None, zeros, zeros, everything, zeros, shift, blocks)
    rows = torch.arange(blocks, device=device)
    assert (count == (rows + 1).int()).all()
    want = torch.where(rows[None, :] <= rows[:, None], rows[None, :], -1).int()
    assert (index == want).all()


def test_select_blocks_nan_ranks_lowest(device):
    blocks = 6
    s1 = tie_free_scores(1, 2, blocks, device)
    s1[0, 0, 4, 1] = float("nan")
    s1[0, 0, 4, 2] = float("-inf")
    zeros = counts([0] * blocks, device)
    n1 = counts([0, 0, 0, 0, 4, 0], device)
    args = (s1, None, zeros, zeros, n1, zeros, 0, 5)
    got, want = ops.select_blocks(*args), reference.select_blocks(*args)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
    # Row 4 (shift 0) keeps its diagonal plus 4 of 0..3: the NaN column comes last.
    assert got[1][0, 0, 4].tolist() == [0, 1, 2, 3, 4]
    # With 3 picks the finite 0 and 3 go first; NaN (column 1) then ties with -inf (column 2)
    # and the lower index wins.
    n1 = counts([0, 0, 0, 0, 3, 0], device)
    got = ops.select_blocks(s1, None, zeros, zeros, n1, zeros, 0, 5)
    assert got[1][0, 0, 4].tolist() == [0, 1, 3, 4, -1]


@pytest.mark.parametrize("shift", [0, 1])
def test_select_blocks_nan_at_random_positions(device, shift):
    """One NaN per row at a random candidate column: it ranks lowest, as in the reference (a
    sort whose comparison treats NaN as unordered picks differently in about half the rows)."""
    blocks = 40
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        s1 = tie_free_scores(2, 3, blocks, "cpu", dtype)
        s2 = tie_free_scores(2, 3, blocks, "cpu", dtype)
        for scores in (s1, s2):
            columns = (torch.rand(2, 3, blocks) * (torch.arange(blocks) + 1)).long()
            scores.scatter_(-1, columns[..., None], float("nan"))
        (n_recent, n_sink, n1, n2), shift, max_count = random_plan(blocks, shift, "cpu")
        args = [t.to(device) for t in (s1, s2, n_recent, n_sink, n1, n2)]
        got = ops.select_blocks(*args, shift, max_count)
        want = reference.select_blocks(s1, s2, n_recent, n_sink, n1, n2, shift, max_count)
        torch.testing.assert_close(got[0].cpu(), want[0], rtol=0, atol=0)
        torch.testing.assert_close(got[1].cpu(), want[1], rtol=0, atol=0)


def test_select_blocks_rejects_overfull_row(device):
    s1 = tie_free_scores(1, 1, 5, device)
    three = counts([3] * 5, device)
    zeros = counts([0] * 5, device)
    with pytest.raises(RuntimeError, match="max_count=2"):
        ops.select_blocks(s1, None, three, zeros, zeros, zeros, 1, 2)
    with pytest.raises(RuntimeError, match="n_score2.*None"):
        ops.select_blocks(s1, None, zeros, zeros, zeros, three, 1, 5)


# ------------------------------------------------------------------------------ kv_compact_

def random_keep(batch, heads, length, kept, device):
    rows = [torch.randperm(length)[:kept].sort().values for _ in range(batch * heads)]
    return torch.stack(rows).view(batch, heads, kept).to(device)


@pytest.mark.parametrize("tail,dtype", [((16,), torch.float32), ((), torch.float16),
                                        ((2, 8), torch.bfloat16), ((5,), torch.int64),
                                        ((3,), torch.bool)])
@pytest.mark.parametrize("kept", [1, 17, 40])
def test_kv_compact_in_place(device, tail, dtype, kept):
    length = 40
    x = torch.randint(-100, 100, (2, 3, length, *tail)).to(device=device, dtype=dtype)
    keep = random_keep(2, 3, length, kept, device)
    expected = x.clone()
    reference.kv_compact_(expected, keep)
    pointer = x.data_ptr()
    ops.kv_compact_(x, keep)
    assert x.data_ptr() == pointer
    torch.testing.assert_close(x, expected, rtol=0, atol=0)


def test_kv_compact_rejects_bad_keep(device, raises_as_on_cpu):
    """Bad indices raise the CPU's error and leave x as it was; a later call still works (a
    device-side assert would have poisoned every later CUDA call of the process)."""
    x = torch.randn(1, 2, 10, 4, device=device)
    good = torch.tensor([[[0, 3, 5]] * 2])
    duplicate = good.clone()
    duplicate[..., 1] = 0
    bad = {"out of range": good.clone().index_fill_(2, torch.tensor([2]), 10),
           "sorted ascending and unique": good.flip(-1).contiguous(),
           "must be torch.int64|must be Long": good.int(),
           "must match": good[:, :1].contiguous(),
           "holds only": torch.arange(11).expand(1, 2, 11).contiguous()}
    negative = good.clone()
    negative[0, 1, 0] = -1
    for message, keep in [*bad.items(), ("sorted ascending and unique", duplicate),
                          ("out of range \\[0, 10\\)", negative)]:
        before = x.clone()
        assert re.search(message, raises_as_on_cpu(ops.kv_compact_, x.cpu(), keep))
        with pytest.raises(RuntimeError, match=message):
            ops.kv_compact_(x, keep.to(device))
        assert torch.equal(x, before)
    want = x.clone()
    reference.kv_compact_(want, good.to(device))
    ops.kv_compact_(x, good.to(device))
    torch.testing.assert_close(x, want, rtol=0, atol=0)


# -------------------------------------------------------------------------- opcheck, errors

def test_opcheck(device):
    if emulated():
        pytest.skip("opcheck checks the registration of torch.ops.cabattn; the emulated "
                    "operators are test-only (their schemas: test_emulation.py)")
    q, k = gqa_inputs(device, torch.float32, 2, 1, 3, 40)
    torch.library.opcheck(torch.ops.cabattn.coarsen, (q, 16, 0))
    torch.library.opcheck(torch.ops.cabattn.block_scores, (q, k, 16, 0.25))
    qc, kc = ops.coarsen(q, 16), ops.coarsen(k, 16)
    torch.library.opcheck(torch.ops.cabattn.frc_scores, (qc, kc, 0.25, 0.3, 0, 0))
    s1 = tie_free_scores(2, 3, 3, device)
    n = counts([1, 1, 1], device)
    torch.library.opcheck(torch.ops.cabattn.select_blocks, (s1, s1, n, n, n, n, 1, 3))
    x = torch.randn(2, 1, 40, 16, device=device)
    torch.library.opcheck(torch.ops.cabattn.kv_compact_,
                          (x, random_keep(2, 1, 40, 9, device)))


def test_bad_values_raise_as_on_cpu(raises_as_on_cpu):
    """The checks of values the CUDA kernels flag on the device (counts, indices) and the
    argument checks raise the CPU's words, in the CPU's order."""
    q, k = gqa_inputs("cpu", torch.float32, 1, 2, 2, 40)
    raises_as_on_cpu(ops.block_scores, q, k[:, :, :30].contiguous(), 16, 0.25)  # same length
    raises_as_on_cpu(ops.block_scores, q, k, 16, -1.0)
    raises_as_on_cpu(ops.frc_scores, q, k, 0.25, 0.3, 5, 0)
    raises_as_on_cpu(ops.coarsen, q, 16, 2)
    s1 = tie_free_scores(1, 2, 5, "cpu")
    n = counts([1] * 5, "cpu")
    zeros = counts([0] * 5, "cpu")
    negative = counts([1, 1, -2, 1, 1], "cpu")
    for args in [(None, None, n, n, n, n, 1, 5),       # no score tensor
                 (s1, None, n, n, n, n, 2, 5),          # shift
                 (s1, None, n, n, n, n, 1, 0),          # max_count
                 (s1, None, n, negative, n, n, 1, 5),   # a negative count
                 (s1, None, n, n, zeros, negative, 1, 5),
                 (s1, None, zeros, zeros, zeros, n, 1, 5),  # picks by a missing score2
                 (None, s1, zeros, zeros, n, zeros, 1, 5),  # ... and score1
                 (s1, None, counts([3] * 5, "cpu"), zeros, zeros, zeros, 1, 2),  # overfull
                 (s1, s1.half(), n, n, n, n, 1, 5)]:
        raises_as_on_cpu(ops.select_blocks, *args)


def test_bad_inputs_name_argument_and_choices(device):
    q, k = gqa_inputs(device, torch.float32, 1, 2, 2, 40)
    checks = [
        (lambda: ops.coarsen(q[0], 16), "x must be 4-D"),
        (lambda: ops.coarsen(q.int(), 16), "supported: float32"),
        (lambda: ops.coarsen(q.transpose(2, 3), 16), "must be contiguous"),
        (lambda: ops.coarsen(q, 48), "valid: 16, 32, 64, 128"),
        (lambda: ops.coarsen(q, 16, 2), "valid: 0 \\(max_l2\\), 1 \\(mean\\)"),
        (lambda: ops.block_scores(q, k[:, :1].expand(1, 3, 40, DIM).contiguous(), 16, 0.25),
         "multiple of kv_heads"),
        (lambda: ops.block_scores(q, k.half(), 16, 0.25), "share one dtype"),
        (lambda: ops.block_scores(q, k[:, :, :30].contiguous(), 16, 0.25), r"\b40\b.*\b30\b"),
        (lambda: ops.block_scores(q, k, 100, 0.25), "valid: 16, 32, 64, 128"),
        (lambda: ops.block_scores(q.transpose(2, 3), k, 16, 0.25), "q must be contiguous"),
        (lambda: ops.frc_scores(q, k, 0.25, -1.0), "lam"),
        (lambda: ops.frc_scores(q, k, 0.25, 0.3, 5), "valid: 0 \\(additive\\)"),
        (lambda: ops.frc_scores(q, k, 0.25, 0.3, 0, 7), "valid: 0 \\(row_minmax\\)"),
    ]
    s1 = tie_free_scores(1, 2, 4, device)
    n = counts([1] * 4, device)
    checks += [
        (lambda: ops.select_blocks(None, None, n, n, n, n, 1, 4), "give .*score1.*score2"),
        (lambda: ops.select_blocks(s1, None, n, n, n, n, 2, 4), "valid: 1 \\(strict"),
        (lambda: ops.select_blocks(s1[0], None, n, n, n, n, 1, 4), "score1 must be 4-D"),
        (lambda: ops.select_blocks(s1.int(), None, n, n, n, n, 1, 4), "supported: float32"),
        (lambda: ops.select_blocks(s1, None, n.long(), n, n, n, 1, 4), "n_recent must be"),
        (lambda: ops.select_blocks(s1, None, n, n[:3].contiguous(), n, n, 1, 4),
         "n_sink has shape \\[3\\]"),
        (lambda: ops.select_blocks(s1[:, :, :3, :3].contiguous(), None, n, n, n, n, 1, 4),
         r"score1 must .*4, 4\]"),
    ]
    if device == "cpu":  # count values: the CUDA kernel checks shapes only (no host copy)
        checks.append((lambda: ops.select_blocks(s1, None, -n, n, n, n, 1, 4), "negative"))
    if torch.cuda.is_available():
        other = "cpu" if device == "cuda" else "cuda"
        checks += [
            (lambda: ops.block_scores(q, k.to(other), 16, 0.25), "move them to one device"),
            (lambda: ops.frc_scores(q, k.to(other), 0.25, 0.3), "move them to one device"),
            (lambda: ops.select_blocks(s1, None, n.to(other), n, n, n, 1, 4), "one device"),
            # x on the CPU, keep on CUDA: the CUDA kernel runs and says x is not a CUDA tensor
            (lambda: ops.kv_compact_(q, random_keep(1, 4, 40, 3, other)),
             "one device|must be a CUDA tensor"),
        ]
    for call, message in checks:
        with pytest.raises(RuntimeError, match=message):
            call()
