"""Hand-computed anchors for the formulas of docs/methods.md, docs/block_statistics.md and
docs/operators.md.

A misreading shared by a kernel and its reference would pass every comparison between them;
these numbers were worked out by hand from the spec's text, not by running the code.
"""
import pytest
import torch

from cabattn import ops, reference
from cabattn.grid import auto_block_size, token_budget

# --------------------------------------------------------------------------- curvature (2.3)
# Three blocks, d = 2, scale 1. Every coarse key lies on the x axis, k = (0, 2, 1); the coarse
# queries are (1, 0), (1, 0), (2, 0). So R[I, J] = q_I . k_J:
#   row 0: [0]        row 1: [0, 2]        row 2: [0, 4, 2]
# Row min-max:   A = [[0], [0, 1], [0, 1, 1/2]]   (row 0: 0 / (0 + 1e-8) = 0)
# Global min-max over the causal entries (min 0, max 4):   A = [[0], [0, 1/2], [0, 1, 1/2]]
# T = A @ A (2-hop paths I -> K -> J):
#   row min-max:    T[1,1] = 1*1 = 1;      T[2,1] = A[2,1]A[1,1] + A[2,2]A[2,1] = 1 + 1/2 = 3/2;
#                   T[2,2] = A[2,2]^2 = 1/4; the J = 0 column is 0.
#   global min-max: T[1,1] = 1/4; T[2,1] = 1*1/2 + 1/2*1 = 1; T[2,2] = 1/4.
# Additive F = A - lambda T / (I + 1), lambda = 0.3:
#   row:    F[1,1] = 1 - 0.3/2 = 0.85;  F[2,1] = 1 - 0.3*1.5/3 = 0.85;  F[2,2] = 0.5 - 0.075/3 = 0.475
#   global: F[1,1] = 0.5 - 0.075/2 = 0.4625;  F[2,1] = 1 - 0.3/3 = 0.9;  F[2,2] = 0.475
# Multiplicative F = A / (1 + lambda T / (A + 1e-8)):
#   row:    F[1,1] = 1/1.3;  F[2,1] = 1/1.45;  F[2,2] = 0.5/(1 + 0.3*0.25/0.5) = 0.5/1.15
QC = [[1.0, 0.0], [1.0, 0.0], [2.0, 0.0]]
KC = [[0.0, 0.0], [2.0, 0.0], [1.0, 0.0]]
BY_HAND = {
    (reference.ADDITIVE, reference.ROW_MINMAX): [[0, 0, 0], [0, 0.85, 0], [0, 0.85, 0.475]],
    (reference.ADDITIVE, reference.GLOBAL_MINMAX): [[0, 0, 0], [0, 0.4625, 0], [0, 0.9, 0.475]],
    (reference.MULTIPLICATIVE, reference.ROW_MINMAX): [[0, 0, 0], [0, 1 / 1.3, 0],
                                                        [0, 1 / 1.45, 0.5 / 1.15]],
}


@pytest.mark.parametrize("formula,normalization", list(BY_HAND))
def test_three_block_curvature_worked_by_hand(formula, normalization):
    qc = torch.tensor(QC)[None, None]
    kc = torch.tensor(KC)[None, None]
    want = torch.tensor(BY_HAND[formula, normalization])[None, None]
    # the 1e-8 in the min-max denominator moves the values by a few 1e-9
    for f in (ops.frc_scores(qc, kc, 1.0, 0.3, formula, normalization),
              reference.frc_scores(qc, kc, 1.0, 0.3, formula, normalization)):
        torch.testing.assert_close(f, want, rtol=0, atol=1e-7)


# ------------------------------------------------------------------- select_blocks priority
# Six blocks, one head, row 5. Per row the order is: recent -> sink -> score1 -> score2, each
# score picking among the candidates not yet kept; ties to the lower index.
SCORE1_ROW = [0.1, 0.9, 0.3, 0.8, 0.95, 0.5]
SCORE2_ROW = [5.0, 4.0, 3.0, 1.0, 0.0, 2.0]


def _select(shift, n_recent, n_sink, n1, n2, row=5, blocks=6):
    # Every other row prefers the highest index: reading the wrong source row shows.
    s1 = (torch.arange(blocks) / 10).expand(1, 1, blocks, blocks).clone()
    s2 = s1.clone()
    s1[0, 0, row - shift] = torch.tensor(SCORE1_ROW)
    s2[0, 0, row - shift] = torch.tensor(SCORE2_ROW)
    counts = []
    for n in (n_recent, n_sink, n1, n2):
        c = torch.zeros(blocks, dtype=torch.int32)
        c[row] = n
        counts.append(c)
    got = ops.select_blocks(s1, s2, *counts, shift, blocks)
    want = reference.select_blocks(s1, s2, *counts, shift, blocks)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    return got[1][0, 0, row, :got[0][0, 0, row]].tolist()


@pytest.mark.parametrize("shift,plan,kept", [
    # block selection, row 5 over 0..5: recent 2 -> {5, 4}; sink 1 -> {0}; score1's best free
    # block is 1 (0.9; 4 is kept already); score2's best free block is 2 (0 and 1 are kept).
    # (score2 before score1 would give 1 by score2 and then 3 by score1.)
    (0, (2, 1, 1, 1), [0, 1, 2, 4, 5]),
    # strict: the rule reads source row 4 over 0..4, the diagonal 5 is added:
    # recent 2 -> {4, 3}; sink 1 -> {0}; score1 -> 1 (0.9, not 2 as row 5 would say).
    (1, (2, 1, 1, 0), [0, 1, 3, 4, 5]),
    # a sink overlapping the recent window: their union, nothing left for score1.
    (0, (3, 4, 2, 0), [0, 1, 2, 3, 4, 5]),
    # score1 alone takes 4 (0.95) then 1 (0.9).
    (0, (1, 0, 2, 0), [1, 4, 5]),
    # only score2: 0, 1, 2 by score2 (5 is the diagonal, kept anyway).
    (0, (0, 0, 0, 3), [0, 1, 2, 5]),
    # asking for more than the free candidates keeps them all and no more.
    (1, (0, 0, 9, 0), [0, 1, 2, 3, 4, 5]),
])
def test_select_blocks_priority_worked_by_hand(shift, plan, kept):
    assert _select(shift, *plan) == kept


# ----------------------------------------------------------------- token budget, block size

@pytest.mark.parametrize("length,sparsity,k_min,budget", [
    (1000, 0.9, 64, 100),    # (1 - 0.9) * 1000 = 99.99999999999997 in floating point
    (1000, 0.9, 1, 100),
    (4096, 0.9, 64, 409),    # 409.6 -> 409: a real fraction still floors
    (100, 0.9, 64, 64),      # 10 < k_min: the floor
    (4096, 0.99, 64, 64),    # 40.96 -> 40 < 64
    (4096, 0.98, 64, 81),    # 81.92 -> 81, above the floor
    (1000, 0.9000000000004, 1, 100),  # 99.9999999996 rounds to 100.000000000 at 9 decimals
    (1000, 0.900000001, 1, 99),       # 99.999999 is below 100 at 9 decimals: floor 99
    (512, 0.0, 64, 512),
])
def test_token_budget_worked_by_hand(length, sparsity, k_min, budget):
    assert token_budget(length, sparsity, k_min) == budget


@pytest.mark.parametrize("length,block_size", [
    (1, 16), (100, 16), (1024, 16),   # clamped up to 16 (L / 64 = 16 at 1024)
    (2048, 32), (4096, 64),           # exact powers of two of L / 64
    (8192, 128), (16384, 128), (10 ** 6, 128),  # clamped down to 128
])
def test_auto_block_size_at_its_clamps(length, block_size):
    assert auto_block_size(length) == block_size
