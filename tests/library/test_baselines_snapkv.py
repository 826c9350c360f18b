"""snapkv, pyramidkv and adakv (docs/baselines.md) against loop references written from the
definitions: identical layouts (mask protocol) and keep sets (kv protocol), per-layer budgets,
per-head counts, realised density. adakv under the kv protocol: tests/library/test_kv_adakv.py."""
import math

import pytest
import torch
from helpers import tiny_llama

from cabattn import ops
from cabattn.grid import BlockGrid, token_budget
from cabattn.kv_protocol import KVProtocol
from cabattn.mask_protocol import MaskProtocol
from cabattn.methods import get_method
from cabattn.methods.base import KVState, MaskContext
from cabattn.methods.pyramidkv import pyramid_budgets
from cabattn.reference import default_scale
from cabattn.sparse import make_grid, plan_layout

BLOCK, LENGTH, K_MIN = 16, 208, 16  # 13 blocks


def qk(batch=2, q_heads=4, kv_heads=2, length=LENGTH, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, length, dim, generator=g)
    k = torch.randn(batch, kv_heads, length, dim, generator=g)
    return q, k


def layout_sets(method, q, k, sparsity, causal, layer_idx=0, num_layers=1):
    grid = make_grid(method, q.shape[2], sparsity, BLOCK, K_MIN, causal, layer_idx, num_layers)
    layout = plan_layout(method, MaskContext(q, k, grid, default_scale(q.shape[-1])))
    count, index = layout.block_count, layout.block_index
    return grid, [[[index[b, h, i, :count[b, h, i]].tolist() for i in range(count.shape[2])]
                   for h in range(count.shape[1])] for b in range(count.shape[0])]


# ------------------------------------------------------------------ mask protocol references

def snapkv_window(row, budget, window_size, shift):
    """(the source rows, the blocks kept as the window, the rule's picks) of one row."""
    k_b = min(row + 1, math.ceil(budget / BLOCK))
    src = row - shift
    if src < 0:
        return [], [], 0
    picks = k_b - shift
    n_w = math.ceil(window_size / BLOCK)
    sources = [s for s in range(src - n_w + 1, src + 1) if s >= 0]
    return sources, sorted(sources, reverse=True)[:picks], picks


def snapkv_reference(sblk, budget, window_size, shift):
    """One head's rows: the window source blocks + diagonal + top window mass."""
    rows = []
    for row in range(sblk.shape[0]):
        sources, window, picks = snapkv_window(row, budget, window_size, shift)
        kept = {row, *window}
        if picks:
            score = {j: sum(float(sblk[s, j]) for s in sources) for j in range(row - shift + 1)}
            rest = sorted((j for j in score if j not in window), key=lambda j: (-score[j], j))
            kept |= set(rest[:picks - len(window)])
        rows.append(sorted(kept))
    return rows


def adakv_reference(sblk_heads, budget, window_size, shift, floor_ratio):
    """All heads of one batch row: window + diagonal, each head's floor of its own best, the
    rest of the layer's picks to the best normalised scores of all heads jointly."""
    heads, m = sblk_heads.shape[0], sblk_heads.shape[1]
    out = [[None] * m for _ in range(heads)]
    for row in range(m):
        sources, window, picks = snapkv_window(row, budget, window_size, shift)
        kept = [{row, *window} for _ in range(heads)]
        if picks:
            share = picks - len(window)
            floor = math.floor(floor_ratio * share + 0.5)
            pool = []
            for h in range(heads):
                score = {j: sum(float(sblk_heads[h, s, j]) for s in sources)
                         for j in range(row - shift + 1)}
                total = sum(score.values())
                ranked = sorted((j for j in score if j not in window),
                                key=lambda j: (-score[j], j))
                kept[h] |= set(ranked[:floor])
                pool += [(-score[j] / total, h, j) for j in ranked[floor:]]
            for _, h, j in sorted(pool)[:heads * (share - floor)]:
                kept[h].add(j)
        for h in range(heads):
            out[h][row] = sorted(kept[h])
    return out


@pytest.mark.parametrize("causal", ["strict", "block"])
@pytest.mark.parametrize("window_size", [16, 32, 40])
@pytest.mark.parametrize("sparsity", [0.5, 0.75])
def test_snapkv_mask_layouts_match_reference(causal, window_size, sparsity):
    q, k = qk()
    method = get_method("snapkv", window_size=window_size)
    grid, got = layout_sets(method, q, k, sparsity, causal)
    sblk = ops.block_scores(q, k, BLOCK, default_scale(q.shape[-1]))[0]
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            assert got[b][h] == snapkv_reference(sblk[b, h], grid.budget, window_size,
                                                 grid.shift), (b, h)


@pytest.mark.parametrize("causal", ["strict", "block"])
@pytest.mark.parametrize("floor_ratio", [0.0, 0.2, 1.0])
def test_adakv_mask_layouts_match_reference(causal, floor_ratio):
    q, k = qk(seed=3)
    method = get_method("adakv", floor_ratio=floor_ratio, window_size=16)
    grid, got = layout_sets(method, q, k, 0.6, causal)
    sblk = ops.block_scores(q, k, BLOCK, default_scale(q.shape[-1]))[0]
    for b in range(q.shape[0]):
        assert got[b] == adakv_reference(sblk[b], grid.budget, 16, grid.shift, floor_ratio)
    counts = torch.tensor([[[len(r) for r in head] for head in rows] for rows in got])
    # every row keeps H times snapkv's blocks in all; heads differ unless the floor is all
    _, snap = layout_sets(get_method("snapkv", window_size=16), q, k, 0.6, causal)
    snap_counts = torch.tensor([[[len(r) for r in head] for head in rows] for rows in snap])
    assert torch.equal(counts.sum(1), snap_counts.sum(1))
    assert (floor_ratio == 1.0) == torch.equal(counts, snap_counts)


def test_pyramid_budgets_follow_the_line_and_sum_to_the_mean():
    # m = 4, K = 100, w = 20, beta = 20: the pyramid shares P = 80 (PyramidKV's own code):
    # 156, 105.33, 54.67, 4 floored (319), +1 to the lowest layer, then + w each
    assert pyramid_budgets(100, 4, 20, 1000, 20) == [177, 125, 74, 24]
    for budget, layers, beta, length, window in [(64, 30, 20, 1024, 32), (512, 12, 5, 4096, 32),
                                                 (1000, 7, 3, 1100, 64), (1024, 30, 20, 1024, 32)]:
        got = pyramid_budgets(budget, layers, beta, length, window)
        assert sum(got) == layers * budget
        assert all(a >= b for a, b in zip(got, got[1:])) and max(got) <= length
        assert min(got) > window  # every layer keeps the window and some of the pyramid
    assert pyramid_budgets(1024, 30, 20, 1024, 32) == [1024] * 30  # s = 0: every layer dense
    assert pyramid_budgets(100, 1, 20, 1000, 32) == [100]
    assert pyramid_budgets(30, 4, 20, 1000, 32) == [30] * 4  # nothing beyond the window


@pytest.mark.parametrize("causal", ["strict", "block"])
def test_pyramidkv_mask_is_snapkv_at_each_layers_budget(causal):
    q, k = qk(seed=5)
    layers, sparsity = 4, 0.6
    budgets = pyramid_budgets(token_budget(LENGTH, sparsity, K_MIN), layers, 20, LENGTH, 32)
    sblk = ops.block_scores(q, k, BLOCK, default_scale(q.shape[-1]))[0]
    for layer in range(layers):
        grid, got = layout_sets(get_method("pyramidkv"), q, k, sparsity, causal, layer, layers)
        assert grid.budget == budgets[layer]
        for b in range(q.shape[0]):
            for h in range(q.shape[1]):
                assert got[b][h] == snapkv_reference(sblk[b, h], budgets[layer], 32,
                                                     grid.shift)


# ------------------------------------------------------------------- the protocols on a model

@pytest.fixture(scope="module")
def model(single_thread):
    return tiny_llama(layers=4, positions=512, attn_implementation="sdpa")


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (1, LENGTH), generator=torch.Generator().manual_seed(1))


def full_blocks_density(budget):
    """Realised density of any layout that fills every row's budget, L a multiple of B."""
    grid = BlockGrid(LENGTH, BLOCK, budget)
    k_b = grid.row_budget().double()
    kept = ((k_b - 1) * BLOCK * BLOCK + BLOCK * (BLOCK + 1) / 2).sum()
    return float(kept / (LENGTH * (LENGTH + 1) / 2))


@pytest.mark.parametrize("name", ["snapkv", "pyramidkv", "adakv"])
def test_mask_density_is_the_mean_of_the_layers_budgets(model, ids, name):
    sparsity = 0.7
    budget = token_budget(LENGTH, sparsity, K_MIN)
    with MaskProtocol(model, get_method(name), sparsity, block_size=BLOCK, k_min=K_MIN) as stats:
        with torch.no_grad():
            model(ids)
    layers = model.config.num_hidden_layers
    budgets = (pyramid_budgets(budget, layers, 20, LENGTH, 32) if name == "pyramidkv"
               else [budget] * layers)
    want = sum(full_blocks_density(b) for b in budgets) / layers
    assert stats.density == pytest.approx(want, rel=1e-12)
    per_head = stats.layer_head_density()
    for layer, densities in per_head.items():
        mean = sum(densities) / len(densities)
        assert mean == pytest.approx(full_blocks_density(budgets[layer]), rel=1e-12)
        if name != "adakv":  # the same budget for every head
            assert max(densities) == pytest.approx(min(densities), rel=1e-12)
    if name == "adakv":  # the budget moved between heads
        assert any(max(d) - min(d) > 1e-3 for d in per_head.values())
    # near the run's budget: pyramidkv's per-layer budgets round up to whole blocks layer by
    # layer (13 blocks here; at L = 1024 on SmolLM2 its density is within 2.3% of the budget's
    # at s = 0.9, docs/baselines.md)
    assert abs(stats.density - full_blocks_density(budget)) < 0.05


@pytest.mark.parametrize("name", ["snapkv", "pyramidkv", "adakv"])
@pytest.mark.parametrize("causal", ["strict", "block"])
def test_mask_at_zero_sparsity_is_dense(model, ids, name, causal):
    with torch.no_grad():
        dense = model(ids, labels=ids).loss
        with MaskProtocol(model, get_method(name), 0.0, block_size=BLOCK, k_min=K_MIN,
                          causal_selection=causal) as stats:
            sparse = model(ids, labels=ids).loss
    assert float(sparse) == pytest.approx(float(dense), rel=1e-5)
    assert stats.density == 1.0


# --------------------------------------------------------------------- kv protocol reference

def snapkv_kv_reference(state, window_size, kernel_size, pooling):
    """Keep lists per (batch row, KV head), from the definition, one entry at a time."""
    b_n, kv_heads, n = state.positions.shape
    queries = state.recent_queries.double()
    group, window = queries.shape[1] // kv_heads, queries.shape[2]
    newest = int(state.positions.max())
    out = []
    for b in range(b_n):
        rows = []
        for g in range(kv_heads):
            recent = min(window_size, state.budget)
            if recent == state.budget:
                rows.append(list(range(n - recent, n)))
                continue
            positions = state.positions[b, g].tolist()
            mass = [0.0] * n
            for h in range(g * group, (g + 1) * group):
                for t in range(window):
                    seen = [j for j in range(n) if positions[j] <= newest - window + 1 + t]
                    logits = torch.stack([queries[b, h, t] @ state.keys[b, g, j].double()
                                          for j in seen]) * state.scale
                    for j, p in zip(seen, torch.softmax(logits, 0).tolist()):
                        mass[j] += p / group
            candidates = n - window_size
            score = []
            for j in range(candidates):
                near = [mass[i] for i in range(j - kernel_size // 2, j + kernel_size // 2 + 1)
                        if 0 <= i < candidates]
                score.append(sum(near) / kernel_size if pooling == "avg" else max(near))
            top = sorted(range(candidates), key=lambda j: (-score[j], j))
            rows.append(sorted(top[:state.budget - recent] + list(range(n - recent, n))))
        out.append(rows)
    return out


def random_state(budget, n=40, window=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    positions = torch.sort(torch.randperm(100, generator=g)[:n]).values
    positions[-1] = 100  # the newest entry is the newest query's own token
    return KVState(keys=torch.randn(2, 2, n, 8, generator=g, dtype=torch.float64),
                   positions=positions.expand(2, 2, n).contiguous(),
                   mass=torch.zeros(2, 2, n), block_queries=None, budget=budget,
                   block_size=16, scale=0.35,
                   recent_queries=torch.randn(2, 4, window, 8, generator=g,
                                              dtype=torch.float64))


@pytest.mark.parametrize("pooling", ["avg", "max"])
@pytest.mark.parametrize("kernel_size", [1, 3, 7])
@pytest.mark.parametrize("budget,window_size", [(20, 8), (30, 12), (6, 8)])
def test_snapkv_kv_keep_matches_reference(pooling, kernel_size, budget, window_size):
    state = random_state(budget, window=min(window_size, 12), seed=kernel_size)
    method = get_method("snapkv", window_size=window_size, kernel_size=kernel_size,
                        pooling=pooling)
    got = method.kv_keep(state).tolist()
    assert got == snapkv_kv_reference(state, window_size, kernel_size, pooling)


def checked(method, layers):
    """`method` with every keep set it returns for `layers` compared with the reference (the
    loop reference is slow); .lengths records the kept counts of every layer."""
    class Checked(type(method)):
        lengths = {}

        def kv_keep(self, state):
            keep = super().kv_keep(state)
            if state.layer_idx in layers:
                assert keep.tolist() == snapkv_kv_reference(state, self.window_size,
                                                            self.kernel_size, self.pooling)
            self.lengths.setdefault(state.layer_idx, set()).add(keep.shape[-1])
            return keep
    return Checked(**method.config)


@pytest.mark.parametrize("name", ["snapkv", "pyramidkv"])
@pytest.mark.parametrize("chunk", [1, 5])
def test_kv_stream_keeps_what_the_reference_keeps(model, ids, name, chunk):
    method = checked(get_method(name, window_size=8, kernel_size=3), layers=(0, 3))
    sparsity, length = 0.8, 120
    with KVProtocol(model, method, sparsity, kv_chunk=chunk, k_min=K_MIN) as stats:
        with torch.no_grad():
            model(ids[:, :length], labels=ids[:, :length])
    budget = token_budget(length, sparsity, K_MIN)
    layers = model.config.num_hidden_layers
    budgets = (pyramid_budgets(budget, layers, 20, length, 8) if name == "pyramidkv"
               else [budget] * layers)
    # each layer is evicted to its own budget (one whose budget holds the window never is)
    assert method.lengths == {layer: {b} for layer, b in enumerate(budgets) if b < length}
    # kept pairs: the prefill of K tokens, then each chunk sees the layer's cache and itself;
    # after the prefill and after each chunk the cache is cut to the layer's budget
    want = 0
    for layer_budget in budgets:
        cached, start = min(budget, layer_budget), budget
        want += budget * (budget + 1) // 2
        while start < length:
            c = min(chunk, length - start)
            want += c * cached + c * (c + 1) // 2
            cached = min(cached + c, layer_budget)
            start += c
    assert stats.density == pytest.approx(want / (layers * length * (length + 1) / 2),
                                          rel=1e-12)


@pytest.mark.parametrize("name", ["snapkv", "pyramidkv"])
def test_kv_at_zero_sparsity_is_dense(model, ids, name):
    with torch.no_grad():
        dense = model(ids, labels=ids).loss
        with KVProtocol(model, name, 0.0, k_min=K_MIN) as stats:
            streamed = model(ids, labels=ids).loss
    assert float(streamed) == pytest.approx(float(dense), rel=1e-5)
    assert stats.density == 1.0


@pytest.mark.parametrize("name,params,message", [
    ("snapkv", {"window_size": 0}, "window_size=0 must be a positive integer"),
    ("snapkv", {"kernel_size": 4}, "kernel_size=4 must be odd"),
    ("snapkv", {"pooling": "median"}, "valid choices: avg, max"),
    ("pyramidkv", {"beta": 0.5}, "beta=0.5 must be a number >= 1"),
    ("adakv", {"floor_ratio": 1.5}, "floor_ratio=1.5 must be a number in \\[0, 1\\]"),
])
def test_bad_parameters_are_rejected(name, params, message):
    with pytest.raises(ValueError, match=message):
        get_method(name, **params)


def test_the_registry_lists_the_methods_each_protocol_has_a_rule_for():
    from cabattn.methods import available
    assert {"snapkv", "pyramidkv", "adakv"} <= set(available("mask"))
    assert {"snapkv", "pyramidkv", "adakv"} <= set(available("kv"))
