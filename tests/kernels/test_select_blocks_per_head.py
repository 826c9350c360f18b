"""select_blocks with per-head counts ([H, M] or [B, H, M]: per-head budgets) against
cabattn.reference, on the CPU, emulated CUDA and CUDA; bad per-head counts are rejected with
the CPU's words."""
import pytest
import torch

from cabattn import ops, reference


def tie_free_scores(batch, heads, blocks, device, dtype=torch.float32):
    """Distinct values, exactly representable in every float dtype (integers below 2^8)."""
    perm = torch.stack([torch.randperm(blocks) for _ in range(batch * heads * blocks)])
    return perm.view(batch, heads, blocks, blocks).to(device=device, dtype=dtype)


def per_head_plan(shape, device):
    """Random counts of one shape ([H, M] or [B, H, M]) and the max_count that fits them."""
    plan = [torch.randint(0, high, shape, dtype=torch.int32) for high in (4, 3, 6, 4)]
    max_count = int(min(shape[-1], sum(plan).max() + 1))
    return [c.to(device) for c in plan], max_count


@pytest.mark.parametrize("shift", [0, 1])
@pytest.mark.parametrize("per", ["head", "batch_and_head"])
@pytest.mark.parametrize("batch,heads,blocks", [(2, 3, 7), (1, 4, 40)])
def test_per_head_counts_match_reference(device, shift, per, batch, heads, blocks):
    shape = (heads, blocks) if per == "head" else (batch, heads, blocks)
    for dtype in (torch.float32, torch.bfloat16):
        s1 = tie_free_scores(batch, heads, blocks, device, dtype)
        s2 = tie_free_scores(batch, heads, blocks, device, dtype)
        plan, max_count = per_head_plan(shape, device)
        got = ops.select_blocks(s1, s2, *plan, shift, max_count)
        want = reference.select_blocks(s1, s2, *plan, shift, max_count)
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
        # each (batch row, head) is what [M] counts of its own give
        for b in range(batch):
            for h in range(heads):
                own = [c.expand(batch, heads, blocks)[b, h].contiguous() for c in plan]
                alone = ops.select_blocks(s1[b:b + 1, h:h + 1].contiguous(),
                                          s2[b:b + 1, h:h + 1].contiguous(), *own, shift,
                                          max_count)
                assert torch.equal(alone[0][0, 0], got[0][b, h])
                assert torch.equal(alone[1][0, 0], got[1][b, h])


def test_per_head_counts_give_heads_different_counts(device):
    s1 = tie_free_scores(1, 2, 6, device)
    zeros = torch.zeros(2, 6, dtype=torch.int32, device=device)
    picks = torch.tensor([[0, 1, 1, 1, 1, 1], [0, 1, 2, 3, 4, 4]], dtype=torch.int32,
                         device=device)
    count, _ = ops.select_blocks(s1, None, zeros, zeros, picks, zeros, 1, 6)
    assert count[0, 0].tolist() == [1, 2, 2, 2, 2, 2]
    assert count[0, 1].tolist() == [1, 2, 3, 4, 5, 5]


def test_bad_per_head_counts_are_rejected(raises_as_on_cpu):
    s1 = tie_free_scores(2, 3, 5, "cpu")
    heads = torch.ones(3, 5, dtype=torch.int32)
    zeros = torch.zeros(3, 5, dtype=torch.int32)
    negative = heads.clone()
    negative[2, 4] = -1
    message = raises_as_on_cpu(ops.select_blocks, s1, None, heads, zeros, negative, zeros, 1, 5)
    assert "n_score1[2, 4] = -1 is negative" in message
    message = raises_as_on_cpu(ops.select_blocks, s1, None, heads, zeros, torch.ones(5).int(),
                               zeros, 1, 5)
    assert "n_score1 has shape [5] but n_recent has [3, 5]" in message
    four_heads = torch.ones(4, 5, dtype=torch.int32)
    message = raises_as_on_cpu(ops.select_blocks, s1, None, *[four_heads] * 4, 1, 5)
    assert "per-head counts of shape [4, 5] do not match score1's [batch, heads] [2, 3]" in message
    other_batch = torch.ones(3, 3, 5, dtype=torch.int32)
    raises_as_on_cpu(ops.select_blocks, s1, None, *[other_batch] * 4, 1, 5)
    message = raises_as_on_cpu(ops.select_blocks, s1, None, *[torch.ones(1, 2, 3, 5).int()] * 4,
                               1, 5)
    assert "must be 1-D [num_blocks], 2-D [heads, num_blocks] or 3-D" in message
    overfull = zeros.clone()
    overfull[1, 3] = 4
    message = raises_as_on_cpu(ops.select_blocks, s1, None, overfull, zeros, zeros, zeros, 1, 3)
    assert "row 3 of counts[1, 3] keeps 4 blocks, more than max_count=3" in message
