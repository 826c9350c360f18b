"""cabattn.ties (docs/block_statistics.md, Near-tie diagnostics) on hand-made cases, and their
record in a mask-protocol cell."""
import math

import pytest
import torch
from helpers import tiny_llama

import cabattn
from cabattn import reference, ties


def test_tie_decided_marks_blocks_with_two_tokens_inside_the_tolerance():
    x = torch.zeros(1, 1, 32, 4)
    x[0, 0, :, 0] = 1.0  # every token of norm 1
    x[0, 0, 3, 0] = 2.0  # block 0: one clear largest
    x[0, 0, 20, 0] = 2.0  # block 1: two largest a rounding apart
    x[0, 0, 25, 0] = 2.0 * (1 + 0.1 * reference.max_l2_tolerance(torch.float32))
    assert ties.tie_decided(x, 16).tolist() == [[[False, True]]]


def test_row_margins_are_the_gap_at_the_cut_over_the_row_range():
    # One head, 4 blocks, block selection (shift 0). Row 3 reads scores [0.0, 0.5, 0.52, 1.0]
    # and keeps {2, 3} by score: the lowest kept is 0.52, the first dropped 0.5.
    score = torch.zeros(1, 1, 4, 4)
    score[0, 0, 3] = torch.tensor([0.0, 0.5, 0.52, 1.0])
    kept = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    kept[0, 0, 3, 2:] = True
    scored = torch.tensor([False, False, False, True])
    margins = ties.row_margins(score, kept, 0, scored)
    assert margins.tolist() == pytest.approx([0.02])
    # Keeping {1, 3} (block 1 by an earlier stage): the first dropped is 0.52 and the lowest
    # kept above it 1.0; block 1 below the cut does not count
    kept[0, 0, 3, 1] = True
    kept[0, 0, 3, 2] = False
    assert ties.row_margins(score, kept, 0, scored).tolist() == pytest.approx([0.48])


def test_a_mask_cell_records_the_near_tie_diagnostics():
    model = tiny_llama(vocab_size=64, hidden_size=128, intermediate_size=128, layers=1,
                       heads=2, kv_heads=1, positions=512)
    ids = torch.randint(0, 8, (1, 256))  # 8 token ids: many repeats
    with torch.no_grad():
        with cabattn.apply(model, "cab_v3", 0.9, block_size=16) as stats:
            model(ids)
        with cabattn.apply(model, "streaming_llm", 0.9, block_size=16) as position_only:
            model(ids)
    record = stats.record()
    assert 0 < record["pooling_tie_share"] <= 1
    assert 0 <= record["selection_tie_share"] <= 1
    assert 0 < record["row_margin_median"] <= 1 and 0 <= record["row_margin_small_share"] <= 1
    recorded = position_only.record()
    assert recorded["pooling_tie_share"] is None and recorded["row_margin_median"] is None
    assert math.isfinite(record["density"])


def test_a_kv_cell_records_the_pooling_ties_of_its_query_and_key_blocks():
    """Layer 0's q and k are functions of the token alone and RoPE keeps their norms, so a
    block with a repeated token ties; with distinct tokens nothing does."""
    model = tiny_llama(vocab_size=512, hidden_size=128, intermediate_size=128, layers=1,
                       heads=2, kv_heads=1, positions=512)
    repeats = torch.randint(0, 8, (1, 256), generator=torch.Generator().manual_seed(0))
    distinct = torch.randperm(512, generator=torch.Generator().manual_seed(0))[None, :256]
    shares = {}
    with torch.no_grad():
        for name, ids in (("repeats", repeats), ("distinct", distinct)):
            with cabattn.apply(model, "cab_v3", 0.75, protocol="kv", block_size=16,
                               kv_chunk=16) as stats:
                model(ids)
            shares[name] = stats.record()["pooling_tie_share"]
            # every query block (256 / 16 per query head) and the cached key blocks at
            # each eviction were counted
            assert stats.pooling_ties[1] > 2 * 256 // 16
        with cabattn.apply(model, "streaming_llm", 0.75, protocol="kv") as position_only:
            model(repeats)
    assert 0 < shares["repeats"] <= 1 and shares["distinct"] == 0
    assert position_only.record()["pooling_tie_share"] is None
