"""Each method's mask rule (docs/methods.md, docs/protocols.md), written here from the spec as
plain loops over query-block rows, against the layouts cabattn.select_blocks produces.

The references use nothing of cabattn: the dense softmax, the block statistics, the coarse
queries and keys and the curvature are recomputed here in float64 from the spec's text. The
kernels work in float32, so a pick decided by a margin below float32 resolution may go either
way: such rows (rare, counted) are only checked for their size; every other row must match
exactly.
"""
import math

import pytest
import torch

import cabattn
from cabattn.reference import max_l2_tolerance

HEADS, KV_HEADS, DIM = 4, 2, 64  # a head dim the CUDA kernels take
K_MIN = 16
# (block size, length, sparsity): k_b = 5 and 4 blocks at B = 16 (an odd number of
# non-diagonal picks under both selections: cab_v4's halves), 5 at B = 32 (a partial last block).
GRIDS = [(16, 400, 0.8), (16, 400, 0.85), (32, 400, 0.6)]
SELECTIONS = ["strict", "block"]
NEAR_TIE = 1e-4  # float32 scores can swap two candidates closer than this (relative)


# ------------------------------------------------------------------------ spec quantities

def spec_budget(length, sparsity, k_min):
    """K = max(k_min, floor((1 - s) L)), the product rounded to 9 decimals first."""
    return max(k_min, math.floor(round((1 - sparsity) * length, 9)))


def spec_row_budgets(length, block_size, budget):
    """k_b = min(I + 1, ceil(K / B)) for each query-block row I."""
    blocks = math.ceil(length / block_size)
    return [min(row + 1, math.ceil(budget / block_size)) for row in range(blocks)]


def spec_probabilities(q, k, scale):
    """The dense causal softmax P [B, Hq, L, L] in float64; query head h reads KV head
    h // (Hq / Hkv)."""
    q, k = q.double().cpu(), k.double().cpu()
    group = q.shape[1] // k.shape[1]
    k = torch.stack([k[:, h // group] for h in range(q.shape[1])], dim=1)
    logits = q @ k.transpose(-1, -2) * scale
    length = q.shape[2]
    future = torch.ones(length, length, dtype=torch.bool).triu(1)
    return torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1)


def spec_block_stats(p, block_size):
    """Sblk (sum) and Gblk (max) of P over each (query block, key block), as lists."""
    b, h, length, _ = p.shape
    blocks = math.ceil(length / block_size)
    sblk = torch.zeros(b, h, blocks, blocks, dtype=torch.float64)
    gblk = torch.zeros(b, h, blocks, blocks, dtype=torch.float64)
    for i in range(blocks):
        rows = slice(i * block_size, min((i + 1) * block_size, length))
        for j in range(i + 1):
            cols = slice(j * block_size, min((j + 1) * block_size, length))
            tile = p[:, :, rows, cols]
            sblk[:, :, i, j] = tile.sum((-1, -2))
            gblk[:, :, i, j] = tile.amax((-1, -2))
    return sblk, gblk


def spec_coarse(x, block_size):
    """Each block's first token whose squared L2 norm is within the input dtype's relative
    tolerance of the block's largest (docs/block_statistics.md), [B, H, M, d] float64."""
    tolerance = max_l2_tolerance(x.dtype)
    x = x.double().cpu()
    b, h, length, d = x.shape
    blocks = math.ceil(length / block_size)
    out = torch.zeros(b, h, blocks, d, dtype=torch.float64)
    for i in range(blocks):
        tokens = x[:, :, i * block_size:min((i + 1) * block_size, length)]
        norms = tokens.pow(2).sum(-1)
        inside = norms >= (1 - tolerance) * norms.amax(-1, keepdim=True)
        first = inside.byte().argmax(-1)  # argmax returns the first maximum: the first inside
        out[:, :, i] = tokens.gather(2, first[..., None, None].expand(b, h, 1, d))[:, :, 0]
    return out


def spec_curvature(qc, kc, scale, lam, tau=1.0):
    """F = A - lambda (A @ A) / (I + 1) with A the row-wise min-max of R = Qc.Kc / sqrt(d) tau
    over J <= I (0 above the diagonal), per batch row and query head: [B, Hq, M, M]."""
    b, hq, m, _ = qc.shape
    group = hq // kc.shape[1]
    f = torch.zeros(b, hq, m, m, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            a = torch.zeros(m, m, dtype=torch.float64)
            for i in range(m):
                r = torch.stack([qc[bi, h, i] @ kc[bi, h // group, j] * scale * tau
                                 for j in range(i + 1)])
                a[i, :i + 1] = (r - r.min()) / (r.max() - r.min() + 1e-8)
            t = a @ a
            for i in range(m):
                f[bi, h, i, :i + 1] = a[i, :i + 1] - lam * t[i, :i + 1] / (i + 1)
    return f


# -------------------------------------------------------------------------- rule helpers

class Picker:
    """Keeps a set of blocks; `top` adds the n best-scoring free candidates (ties to the lower
    index) and notes when the n-th and (n+1)-th are closer than float32 can tell apart."""

    def __init__(self):
        self.kept, self.near_tie = set(), False

    def add(self, blocks):
        self.kept |= set(blocks)

    def top(self, scores, candidates, n):
        free = [j for j in candidates if j not in self.kept]
        ranked = sorted(free, key=lambda j: (-float(scores[j]), j))
        n = min(n, len(ranked))
        if 0 < n < len(ranked):
            gap = float(scores[ranked[n - 1]] - scores[ranked[n]])
            size = max(abs(float(scores[j])) for j in ranked)
            self.near_tie |= gap <= NEAR_TIE * size
        self.add(ranked[:n])


def spec_layout(rule, row_budgets, selection):
    """Section 1.2: strict runs the rule for row I-1 over 0..I-1 with budget k_b - 1 and adds
    the diagonal I (row 0 is {0}); block runs it for row I over 0..I with budget k_b.
    rule(src, budget) -> Picker with at most `budget` blocks of 0..src."""
    rows = []
    for row, k_b in enumerate(row_budgets):
        if selection == "strict":
            picker = rule(row - 1, k_b - 1) if row > 0 and k_b > 1 else Picker()
        else:
            picker = rule(row, k_b)
        picker.add([row])
        rows.append(picker)
    return rows


def recent(src, n):
    """The n most recent candidates src, src-1, ..., the rule's own diagonal included."""
    return range(max(src - n + 1, 0), src + 1)


def h2o_rule(sblk, rho):
    """Keep r = ceil(rho b) most recent blocks (at least the diagonal) and the rest by
    c_src(J) = sum over I' <= src of Sblk[I', J]."""
    def rule(src, budget):
        picker = Picker()
        n_recent = max(1, math.ceil(rho * budget - 1e-9))
        picker.add(recent(src, n_recent))
        received = [sum(float(sblk[i, j]) for i in range(src + 1)) for j in range(src + 1)]
        picker.top(received, range(src + 1), budget - n_recent)
        return picker
    return rule


def cab_rule(gblk, frc, alpha):
    """The diagonal, then round(alpha (b - 1)) (halves up) picks by Gblk[src, J], the rest by
    curvature among those not picked."""
    def rule(src, budget):
        picker = Picker()
        picker.add([src])
        picks = budget - 1
        by_magnitude = math.floor(alpha * picks + 0.5)
        picker.top(gblk[src], range(src + 1), by_magnitude)
        picker.top(frc[src], range(src + 1), picks - by_magnitude)
        return picker
    return rule


def streaming_rule(block_size, n_sink):
    """Sink blocks covering the first n_sink tokens (while the budget leaves room for the
    diagonal), the rest most recent."""
    def rule(src, budget):
        picker = Picker()
        sinks = min(math.ceil(n_sink / block_size), budget - 1)
        picker.add(range(min(sinks, src + 1)))
        picker.add(recent(src, budget - sinks))
        return picker
    return rule


def local_strided_rule(src, budget):
    """ceil(b/2) most recent blocks, the rest evenly spaced over 0..src-ceil(b/2), block 0
    first: picks at round(i * last / (n - 1)) (nearest; the spec does not say how halves go,
    Python's round sends them to the even neighbour)."""
    picker = Picker()
    n_recent = math.ceil(budget / 2)
    picker.add(recent(src, n_recent))
    n, last = budget - n_recent, src - n_recent
    if n == 1:
        picker.add([0])
    elif n > 1:
        picker.add(round(i * last / (n - 1)) for i in range(n))
    return picker


# ------------------------------------------------------------------------------- the tests

def inputs(length, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, HEADS, length, DIM, generator=g)
    k = torch.randn(2, KV_HEADS, length, DIM, generator=g)
    return q.to(device), k.to(device)


def compare(layout, want_per_head, row_budgets):
    """Exact row sets where no near tie decides them; the budget everywhere. Returns how many
    rows a near tie left undecided."""
    count, index = layout.block_count.cpu(), layout.block_index.cpu()
    undecided = 0
    for (b, h), rows in want_per_head.items():
        for row, picker in enumerate(rows):
            got = set(index[b, h, row, :count[b, h, row]].tolist())
            assert len(got) == int(count[b, h, row]) == row_budgets[row], (b, h, row)
            if picker.near_tie:
                undecided += 1
                continue
            assert got == picker.kept, (b, h, row, sorted(got), sorted(picker.kept))
    total = sum(len(rows) for rows in want_per_head.values())
    assert undecided <= 0.05 * total, f"{undecided} of {total} rows decided by near ties"
    return undecided


def expected(method_rule, length, block_size, sparsity, selection, per_head):
    """{(b, h): [Picker per row]} of a rule built per head by per_head(b, h)."""
    budgets = spec_row_budgets(length, block_size, spec_budget(length, sparsity, K_MIN))
    return {(b, h): spec_layout(method_rule(*per_head(b, h)), budgets, selection)
            for b in range(2) for h in range(HEADS)}, budgets


def run(q, k, name, block_size, sparsity, selection, **params):
    return cabattn.select_blocks(q, k, name, sparsity, block_size=block_size, k_min=K_MIN,
                                 causal_selection=selection, **params)


@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("block_size,length,sparsity", GRIDS)
@pytest.mark.parametrize("rho", [0.5, 0.25])
def test_h2o_keeps_recent_blocks_and_the_most_received_mass(torch_device, selection, block_size,
                                                            length, sparsity, rho):
    q, k = inputs(length, torch_device)
    sblk, _ = spec_block_stats(spec_probabilities(q, k, DIM ** -0.5), block_size)
    want, budgets = expected(lambda s: h2o_rule(s, rho), length, block_size, sparsity,
                             selection, lambda b, h: (sblk[b, h],))
    compare(run(q, k, "h2o", block_size, sparsity, selection, h2o_recent_ratio=rho), want,
            budgets)


@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("block_size,length,sparsity", GRIDS)
@pytest.mark.parametrize("name,alpha", [("cab_v4", 0.5), ("cab_v4", 0.75), ("cab_v3", 0.0)])
def test_cab_picks_by_block_maximum_then_curvature(torch_device, selection, block_size, length,
                                                   sparsity, name, alpha):
    q, k = inputs(length, torch_device)
    scale = DIM ** -0.5
    _, gblk = spec_block_stats(spec_probabilities(q, k, scale), block_size)
    frc = spec_curvature(spec_coarse(q, block_size), spec_coarse(k, block_size), scale, 0.3)
    want, budgets = expected(lambda g, f: cab_rule(g, f, alpha), length, block_size, sparsity,
                             selection, lambda b, h: (gblk[b, h], frc[b, h]))
    params = {"magnitude_ratio": alpha} if name == "cab_v4" else {}
    compare(run(q, k, name, block_size, sparsity, selection, **params), want, budgets)


@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("block_size,length,sparsity", GRIDS)
@pytest.mark.parametrize("n_sink", [4, 0, 40])
def test_streaming_llm_keeps_sink_blocks_and_the_recent_ones(torch_device, selection, block_size,
                                                             length, sparsity, n_sink):
    q, k = inputs(length, torch_device)
    want, budgets = expected(lambda: streaming_rule(block_size, n_sink), length, block_size,
                             sparsity, selection, lambda b, h: ())
    layout = run(q, k, "streaming_llm", block_size, sparsity, selection, n_sink=n_sink)
    compare(layout, want, budgets)
    if n_sink:  # block 0 is in every row that has room beside its diagonal
        assert all(0 in picker.kept for picker in want[0, 0][2:])


@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("block_size,length,sparsity", GRIDS + [(16, 800, 0.8)])
def test_local_strided_keeps_recent_blocks_and_evenly_spaced_history(torch_device, selection,
                                                                     block_size, length,
                                                                     sparsity):
    q, k = inputs(length, torch_device)
    want, budgets = expected(lambda: local_strided_rule, length, block_size, sparsity,
                             selection, lambda b, h: ())
    compare(run(q, k, "local_strided", block_size, sparsity, selection), want, budgets)


@pytest.mark.parametrize("selection", SELECTIONS)
def test_random_draws_its_picks_uniformly_from_the_earlier_blocks(torch_device, selection):
    """k_b - 1 distinct blocks of 0..I-1 plus the diagonal; every earlier block equally likely
    (the previous block and block 0 are not forced), each head its own draw."""
    block_size, length, sparsity = 16, 400, 0.8
    g = torch.Generator().manual_seed(0)
    q = torch.randn(4, 16, length, DIM, generator=g).to(torch_device)
    k = torch.randn(4, 4, length, DIM, generator=g).to(torch_device)
    layout = run(q, k, "random", block_size, sparsity, selection)
    count, index = layout.block_count.cpu(), layout.block_index.cpu()
    budgets = spec_row_budgets(length, block_size, spec_budget(length, sparsity, K_MIN))
    heads = count.shape[0] * count.shape[1]
    hits = torch.zeros(len(budgets), len(budgets))  # [row, block]: how many heads kept it
    for b in range(count.shape[0]):
        for h in range(count.shape[1]):
            for row, k_b in enumerate(budgets):
                kept = index[b, h, row, :count[b, h, row]].tolist()
                assert len(set(kept)) == len(kept) == k_b and row in kept
                assert all(0 <= j < row for j in kept if j != row)
                hits[row, kept] += 1
    assert len({tuple(index[b, h].flatten().tolist()) for b in range(4) for h in range(16)}) > 1
    # Rows with more earlier blocks than picks: each earlier block is kept with probability
    # (k_b - 1) / I. Sum the counts of a column group over those rows and compare with the
    # binomial expectation at 5 standard deviations.
    rows = [row for row, k_b in enumerate(budgets) if row > k_b - 1]
    for name, column in (("previous block", lambda r: r - 1), ("block 0", lambda r: 0),
                         ("middle block", lambda r: r // 2)):
        p = torch.tensor([(budgets[r] - 1) / r for r in rows], dtype=torch.float64)
        got = sum(float(hits[r, column(r)]) for r in rows)
        mean, sd = float(p.sum()) * heads, math.sqrt(float((p * (1 - p)).sum()) * heads)
        assert abs(got - mean) <= 5 * sd, (name, got, mean, sd)
