"""knorm, oracle_topk, quest and tova (docs/baselines.md), and the kv protocol's select mode,
against references written here from the spec's text as plain loops in float64.

Mask rules: the layouts of cabattn.select_blocks row by row (the shared Picker and comparison
of test_method_rules: a pick decided by a margin below float32 resolution is only checked for
its size). kv rules: the keep sets and page picks of the rules, and whole streams through a
tiny Llama against a dense forward whose attention is masked by the reference's choices.
"""
import dataclasses
import math

import pytest
import torch
from helpers import tiny_llama
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import sdpa_mask

import cabattn
from cabattn import methods
from cabattn.grid import token_budget
from cabattn.kv_protocol import KVProtocol
from cabattn.methods import KVPages, KVState
from cabattn.methods.quest import Quest
from test_method_rules import (DIM, GRIDS, HEADS, KV_HEADS, K_MIN, SELECTIONS, Picker, compare,
                               expected, inputs, run, spec_block_stats, spec_budget,
                               spec_probabilities, spec_row_budgets)

# ------------------------------------------------------------------------ mask references


def own_diagonal_and_top(score):
    """A "diagonal + top-scored" rule for source row src: its own block, then the best of
    0..src by score[src] (section 1.2 then adds the output row's diagonal under strict)."""
    def rule(src, budget):
        picker = Picker()
        picker.add([src])
        picker.top(score[src], range(src + 1), budget - 1)
        return picker
    return rule


def spec_key_norm_score(k, block_size):
    """knorm: score[I][J] = - the mean L2 norm of block J's keys (the same for every row)."""
    k = k.double().cpu()
    b, h, length, _ = k.shape
    blocks = math.ceil(length / block_size)
    score = torch.zeros(b, h, blocks, blocks, dtype=torch.float64)
    for j in range(blocks):
        tokens = k[:, :, j * block_size:min((j + 1) * block_size, length)]
        score[:, :, :, j] = -tokens.norm(dim=-1).mean(-1)[..., None]
    return score


def spec_quest_score(q, k, block_size):
    """quest: score[I][J] = max over the queries q of block I of
    U(q, J) = sum_d max(q_d m_{J,d}, q_d M_{J,d}), m and M the elementwise min and max of
    block J's keys (of the query head's KV head)."""
    q, k = q.double().cpu(), k.double().cpu()
    b, hq, length, _ = q.shape
    group = hq // k.shape[1]
    blocks = math.ceil(length / block_size)
    score = torch.zeros(b, hq, blocks, blocks, dtype=torch.float64)
    for h in range(hq):
        keys = k[:, h // group]
        for j in range(blocks):
            page = keys[:, j * block_size:min((j + 1) * block_size, length)]
            low, high = page.amin(1), page.amax(1)  # [B, d]
            for i in range(blocks):
                rows = q[:, h, i * block_size:min((i + 1) * block_size, length)]  # [B, n, d]
                bound = torch.maximum(rows * low[:, None], rows * high[:, None]).sum(-1)
                score[:, h, i, j] = bound.amax(-1)
    return score


def spec_tova_score(q, k, block_size, per_head):
    """tova: score[I][J] = sum over j in J of the mean over the query heads (all of them, or
    per_head those of the head's KV head) of P[t, j], t the last token of block I."""
    p = spec_probabilities(q, k, DIM ** -0.5)
    b, hq, length, _ = p.shape
    group = hq // k.shape[1]
    blocks = math.ceil(length / block_size)
    score = torch.zeros(b, hq, blocks, blocks, dtype=torch.float64)
    for h in range(hq):
        heads = range(h // group * group, (h // group + 1) * group) if per_head else range(hq)
        for i in range(blocks):
            t = min((i + 1) * block_size, length) - 1
            attention = sum(p[:, g, t] for g in heads) / len(heads)
            for j in range(blocks):
                score[:, h, i, j] = attention[:, j * block_size:(j + 1) * block_size].sum(-1)
    return score


@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("block_size,length,sparsity", GRIDS)
def test_knorm_keeps_the_blocks_of_lowest_mean_key_norm(device, selection, block_size, length,
                                                        sparsity):
    q, k = inputs(length, device)
    score = spec_key_norm_score(k, block_size)
    group = HEADS // KV_HEADS
    want, budgets = expected(own_diagonal_and_top, length, block_size, sparsity, selection,
                             lambda b, h: (score[b, h // group],))
    compare(run(q, k, "knorm", block_size, sparsity, selection), want, budgets)


@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("block_size,length,sparsity", GRIDS)
def test_quest_keeps_the_blocks_of_highest_key_bound(device, selection, block_size, length,
                                                     sparsity):
    q, k = inputs(length, device)
    score = spec_quest_score(q, k, block_size)
    want, budgets = expected(own_diagonal_and_top, length, block_size, sparsity, selection,
                             lambda b, h: (score[b, h],))
    compare(run(q, k, "quest", block_size, sparsity, selection), want, budgets)


@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("block_size,length,sparsity", GRIDS)
@pytest.mark.parametrize("per_head", [False, True])
def test_tova_keeps_what_the_last_source_query_attends_to(device, selection, block_size,
                                                          length, sparsity, per_head):
    q, k = inputs(length, device)
    score = spec_tova_score(q, k, block_size, per_head)
    want, budgets = expected(own_diagonal_and_top, length, block_size, sparsity, selection,
                             lambda b, h: (score[b, h],))
    compare(run(q, k, "tova", block_size, sparsity, selection, per_head=per_head), want,
            budgets)
    if not per_head:  # one choice for the whole layer
        layout = run(q, k, "tova", block_size, sparsity, selection)
        assert bool((layout.block_index == layout.block_index[:, :1]).all())


@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("block_size,length,sparsity", GRIDS)
def test_oracle_topk_keeps_the_rows_own_largest_mass(device, selection, block_size, length,
                                                     sparsity):
    """Row I: its diagonal and the k_b - 1 blocks J < I of largest Sblk[I, J], whatever the
    causal selection (the bound reads the queries it serves)."""
    q, k = inputs(length, device)
    sblk, _ = spec_block_stats(spec_probabilities(q, k, DIM ** -0.5), block_size)
    budgets = spec_row_budgets(length, block_size, spec_budget(length, sparsity, K_MIN))
    want = {}
    for b in range(2):
        for h in range(HEADS):
            rows = []
            for row, k_b in enumerate(budgets):
                picker = Picker()
                picker.add([row])
                picker.top(sblk[b, h, row], range(row), k_b - 1)
                rows.append(picker)
            want[b, h] = rows
    compare(run(q, k, "oracle_topk", block_size, sparsity, selection), want, budgets)


def test_oracle_topk_is_an_upper_bound_of_the_kept_mass():
    """At the same budget no causal rule keeps more dense softmax mass than oracle_topk."""
    q, k = inputs(400, "cpu")
    sblk = cabattn.ops.block_scores(q, k, 16, DIM ** -0.5)[0]
    mass = {name: float(run(q, k, name, 16, 0.8, "strict").kept_mass(sblk).sum())
            for name in ("oracle_topk", "h2o", "quest", "tova", "knorm", "streaming_llm")}
    assert all(mass["oracle_topk"] >= value for value in mass.values()), mass


def test_the_upper_bound_is_recorded_and_refused_by_the_kv_protocol():
    model = tiny_llama(vocab_size=256)
    with pytest.raises(ValueError, match="oracle_topk has no kv-protocol rule.*protocol='mask'"):
        KVProtocol(model, "oracle_topk", 0.5)
    with cabattn.apply(model, method="oracle_topk", sparsity=0.5) as stats:
        pass
    assert stats.record()["oracle"] == "upper_bound" and stats.record()["oracle_selection"]
    with cabattn.apply(model, method="quest", sparsity=0.5) as stats:
        pass
    assert stats.record()["oracle"] is None


# ----------------------------------------------------------------------- kv rule references

def kv_state(n=90, budget=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(2, KV_HEADS, n, 16, generator=g) * torch.rand(2, KV_HEADS, n, 1,
                                                                     generator=g)
    return KVState(keys=keys, positions=torch.arange(n).expand(2, KV_HEADS, n),
                   mass=torch.zeros(2, KV_HEADS, n), block_queries=None, budget=budget,
                   block_size=16, scale=0.25)


def test_knorm_kv_keeps_the_lowest_norm_keys_and_the_newest():
    state = kv_state()
    state.keys[:, :, -1] *= 100  # the newest stays whatever its norm
    keep = methods.get_method("knorm").kv_keep(state)
    for b in range(2):
        for h in range(KV_HEADS):
            norms = [float(state.keys[b, h, j].double().norm()) for j in range(89)]
            lowest = sorted(range(89), key=lambda j: (norms[j], j))[:29]
            assert keep[b, h].tolist() == sorted(lowest) + [89]


def spec_tova_keep(newest, keys, cached, budget, scale, per_head):
    """{(b, g): sorted positions}: of each KV head's `cached` positions, the `budget` of highest
    attention from the newest query, averaged over all query heads (or per_head over the KV
    head's group; ties to the older entry). newest [B, Hq, d], keys [B, Hkv, L, d] by
    position."""
    b, hq, _ = newest.shape
    hkv = keys.shape[1]
    group = hq // hkv
    attention = {}
    for bi in range(b):
        for h in range(hq):
            entries = cached[bi, h // group]
            logits = torch.stack([newest[bi, h].double() @ keys[bi, h // group, j].double()
                                  for j in entries]) * scale
            attention[bi, h] = torch.softmax(logits, 0)
    keep = {}
    for bi in range(b):
        for g in range(hkv):
            heads = range(g * group, (g + 1) * group) if per_head else range(hq)
            score = sum(attention[bi, h] for h in heads) / len(heads)
            ranked = sorted(range(len(score)), key=lambda i: (-float(score[i]), i))
            keep[bi, g] = sorted(cached[bi, g][i] for i in ranked[:budget])
    return keep


@pytest.mark.parametrize("per_head", [False, True])
def test_tova_kv_keeps_the_entries_the_newest_query_attends_to_most(per_head):
    state = kv_state()
    state.recent_queries = torch.randn(2, HEADS, 1, 16, generator=torch.Generator().manual_seed(3))
    keep = methods.get_method("tova", per_head=per_head).kv_keep(state)
    cached = {(b, g): list(range(90)) for b in range(2) for g in range(KV_HEADS)}
    want = spec_tova_keep(state.recent_queries[:, :, -1], state.keys, cached, 30, 0.25,
                          per_head)
    for (b, g), kept in want.items():
        assert keep[b, g].tolist() == kept
    if not per_head:
        assert bool((keep == keep[:, :1]).all())  # one keep set for the layer


def spec_quest_pages(queries, keys, block_size, candidates, n_pick, tie=1e-4):
    """Per query head, the n_pick pages of 0..candidates-1 of highest max over the chunk's
    queries of U (ties to the lower page), and whether a near tie (a gap below `tie` relative
    to the largest score) decided the last pick."""
    queries, keys = queries.double(), keys.double()
    b, hq, _, _ = queries.shape
    group = hq // keys.shape[1]
    picks, near_tie = {}, False
    for bi in range(b):
        for h in range(hq):
            score = []
            for page in range(candidates):
                tokens = keys[bi, h // group, page * block_size:(page + 1) * block_size]
                low, high = tokens.amin(0), tokens.amax(0)
                score.append(float(torch.maximum(queries[bi, h] * low,
                                                 queries[bi, h] * high).sum(-1).max()))
            ranked = sorted(range(candidates), key=lambda p: (-score[p], p))
            gap = score[ranked[n_pick - 1]] - score[ranked[n_pick]]
            near_tie |= gap <= tie * max(map(abs, score))
            picks[bi, h] = sorted(ranked[:n_pick])
    return picks, near_tie


@pytest.mark.parametrize("chunk", [1, 7])
def test_quest_kv_picks_the_pages_of_highest_bound(chunk):
    g = torch.Generator().manual_seed(chunk)
    keys = torch.randn(2, KV_HEADS, 160, DIM, generator=g)
    queries = torch.randn(2, HEADS, chunk, DIM, generator=g)
    pages = keys.view(2, KV_HEADS, 10, 16, DIM)
    picked = methods.get_method("quest").kv_select(KVPages(
        queries, pages.amin(3), pages.amax(3), n_pick=4, block_size=16, scale=DIM ** -0.5))
    want, near_tie = spec_quest_pages(queries, keys, 16, 10, 4)
    assert not near_tie
    for (b, h), pages_ in want.items():
        assert sorted(picked[b, h].tolist()) == pages_


# ------------------------------------------------------------------ streams through a model

LENGTH, SPARSITY, BLOCK = 160, 0.75, 16  # K = 40: ceil(40 / 16) - 1 = 2 older pages a chunk
REFERENCE = "cabattn_test_select_reference"


@pytest.fixture(scope="module")
def model(single_thread):
    return tiny_llama(vocab_size=256, attn_implementation="sdpa")


@pytest.fixture(scope="module")
def ids():
    """Distinct tokens: a repeated token has the same key norm at both positions (RoPE keeps
    norms), a tie knorm's float32 keys would break by rounding."""
    return torch.randperm(256, generator=torch.Generator().manual_seed(1))[None, :LENGTH]


def spec_select_mask(q, k, budget, chunk, block_size):
    """bool [B, Hq, L, L] of what each query attends to under quest's select mode: the first
    K tokens prefilled densely; then each chunk of c queries, whose first token lies in page
    F, sees every key from page F's start up to itself plus, when more than ceil(K/B) - 1
    whole pages precede page F, the ceil(K/B) - 1 of them of highest U for its query head
    (the maximum over the chunk's queries); otherwise every earlier key."""
    b, hq, length, _ = q.shape
    mask = torch.zeros(b, hq, length, length, dtype=torch.bool)
    n_pick = math.ceil(budget / block_size) - 1
    starts = [0] + list(range(budget, length, chunk))
    for start in starts:
        end = budget if start == 0 else min(start + chunk, length)
        first_page = start // block_size
        for t in range(start, end):
            mask[:, :, t, first_page * block_size:t + 1] = True
        if first_page <= n_pick:
            for t in range(start, end):
                mask[:, :, t, :first_page * block_size] = True
            continue
        # float32 scores of a head dim of 16 resolve about 1e-6 of their size
        picks, near_tie = spec_quest_pages(q[:, :, start:end], k, block_size, first_page,
                                           n_pick, tie=1e-5)
        assert not near_tie, "a near tie decides a page: pick another seed"
        for (bi, h), pages in picks.items():
            for page in pages:
                mask[bi, h, start:end, page * block_size:(page + 1) * block_size] = True
    return mask & torch.ones(length, length, dtype=torch.bool).tril()


@pytest.mark.parametrize("chunk", [1, 5, 24])
def test_quest_select_mode_equals_the_masked_dense_reference(model, ids, chunk):
    """The stream's loss and realised density are those of a dense forward masked by the
    reference's page picks; the cache kept every token (nothing evicted)."""
    budget = token_budget(LENGTH, SPARSITY, K_MIN)
    protocol, stats, masks = assert_stream_matches(
        model, ids, "quest", chunk, lambda q, k: spec_select_mask(q, k, budget, chunk, BLOCK))
    record = stats.record()
    assert record["kv_mode"] == "select" and record["protocol"] == "kv"
    assert all(layer.length == LENGTH for layer in protocol.cache.layers)
    # the attended keys are bounded: each query sees at most its own pages and ceil(K/B) - 1
    # older ones
    n_pick = math.ceil(budget / BLOCK) - 1
    bound = (n_pick + math.ceil(chunk / BLOCK) + 1) * BLOCK
    assert int(masks[1].sum(-1).max()) <= bound
    assert record["density"] < 0.6


def test_quest_select_mode_attends_within_the_budget_token_by_token(model, ids):
    """c = 1: every streamed query attends to its own page and ceil(K/B) - 1 = 2 older whole
    pages (or everything while that is less), so the density is computable by hand."""
    budget = token_budget(LENGTH, SPARSITY, K_MIN)
    with KVProtocol(model, "quest", SPARSITY, k_min=K_MIN, block_size=BLOCK) as stats:
        with torch.no_grad():
            model(ids, labels=ids)
    kept = select_pairs_token_by_token(budget, budget)
    assert stats.density == pytest.approx(kept / (LENGTH * (LENGTH + 1) / 2))


def select_pairs_token_by_token(budget, layer_budget):
    """Attended (query, key) pairs of one query head under select mode at c = 1: the first K
    tokens prefilled densely, then each query its own page and ceil(K_l / B) - 1 older whole
    pages (or everything while that is less)."""
    n_pick = math.ceil(layer_budget / BLOCK) - 1
    kept = budget * (budget + 1) // 2
    for t in range(budget, LENGTH):
        page = t // BLOCK
        kept += (t + 1) if page <= n_pick else n_pick * BLOCK + t - page * BLOCK + 1
    return kept


@dataclasses.dataclass
class LayeredQuest(Quest):
    """quest with per-layer budgets K - B and K + B (mean K): select mode with layer budgets."""

    def layer_budget(self, budget, layer_idx, num_layers, length):
        return budget + (BLOCK if layer_idx else -BLOCK)


def test_select_mode_reads_each_layers_own_budget(model, ids):
    """Under select mode layer l picks ceil(K_l / B) - 1 pages (1 and 3 here, where one K
    picks 2); the prefill stays the first K tokens."""
    budget = token_budget(LENGTH, SPARSITY, K_MIN)
    with KVProtocol(model, LayeredQuest(), SPARSITY, k_min=K_MIN, block_size=BLOCK) as stats:
        with torch.no_grad():
            model(ids, labels=ids)
    causal = LENGTH * (LENGTH + 1) / 2
    density = stats.layer_head_density()
    for layer, layer_budget in enumerate([budget - BLOCK, budget + BLOCK]):
        want = select_pairs_token_by_token(budget, layer_budget) / causal
        assert density[layer] == pytest.approx([want] * len(density[layer]))
    assert density[0][0] < density[1][0]


def spec_evict_mask(q, k, budget, chunk, evict):
    """bool [B, Hq, L, L] of a streaming eviction simulated on positions: the first K tokens
    prefilled; each chunk joins every KV head's cache, its query t sees the cache plus the
    chunk up to itself, then a cache over K is cut by evict(cached, newest t) ->
    {(b, g): kept positions}."""
    b, hq, length, _ = q.shape
    group = hq // k.shape[1]
    mask = torch.zeros(b, hq, length, length, dtype=torch.bool)
    cached = {(bi, g): [] for bi in range(b) for g in range(k.shape[1])}
    for start in [0] + list(range(budget, length, chunk)):
        end = budget if start == 0 else min(start + chunk, length)
        for (bi, g), entries in cached.items():
            entries += range(start, end)
            for h in range(g * group, (g + 1) * group):
                for t in range(start, end):
                    mask[bi, h, t, [j for j in entries if j <= t]] = True
        if len(cached[0, 0]) > budget:
            cached = evict(cached, end - 1)
    return mask


def knorm_evict(q, k, budget):
    """knorm: the K - 1 cached keys of lowest L2 norm (ties to the older) and the newest."""
    def evict(cached, newest):
        kept = {}
        for (b, g), entries in cached.items():
            older = sorted(entries[:-1], key=lambda j: (float(k[b, g, j].double().norm()), j))
            kept[b, g] = sorted(older[:budget - 1]) + [entries[-1]]
        return kept
    return evict


def tova_evict(q, k, budget, per_head):
    def evict(cached, newest):
        return spec_tova_keep(q[:, :, newest], k, cached, budget, q.shape[-1] ** -0.5,
                              per_head)
    return evict


def reference_run(model, ids, mask_of):
    """A dense teacher-forced forward whose attention in every layer is the float64 softmax
    over mask_of(query, key) (post-RoPE, [B, H, L, d]); returns (output, {layer: mask})."""
    masks = {}

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        group = query.shape[1] // key.shape[1]
        mask = mask_of(query, key)
        masks[module.layer_idx] = mask
        k, v = (x.double().repeat_interleave(group, 1) for x in (key, value))
        logits = (query.double() @ k.transpose(-1, -2)) * scaling
        p = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
        return (p @ v).to(query.dtype).transpose(1, 2).contiguous(), None

    AttentionInterface.register(REFERENCE, attention)
    AttentionMaskInterface.register(REFERENCE, sdpa_mask)
    saved = model.config._attn_implementation
    model.set_attn_implementation(REFERENCE)
    try:
        with torch.no_grad():
            return model(ids, labels=ids), masks
    finally:
        model.set_attn_implementation(saved)


def assert_stream_matches(model, ids, name, chunk, mask_of, **params):
    """The stream's logits, loss and per-layer, per-head density are the reference's."""
    want, masks = reference_run(model, ids, mask_of)
    protocol = KVProtocol(model, name, SPARSITY, kv_chunk=chunk, k_min=K_MIN, block_size=BLOCK,
                          **params)
    with protocol as stats, torch.no_grad():
        got = model(ids, labels=ids)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-4)
    assert got.loss.item() == pytest.approx(want.loss.item(), rel=1e-5)
    causal = LENGTH * (LENGTH + 1) / 2
    for layer, density in stats.layer_head_density().items():
        assert density == pytest.approx((masks[layer].sum((-1, -2))[0] / causal).tolist())
    return protocol, stats, masks


@pytest.mark.parametrize("chunk", [1, 6])
def test_knorm_stream_equals_the_masked_dense_reference(model, ids, chunk):
    budget = token_budget(LENGTH, SPARSITY, K_MIN)
    _, stats, _ = assert_stream_matches(
        model, ids, "knorm", chunk,
        lambda q, k: spec_evict_mask(q, k, budget, chunk, knorm_evict(q, k, budget)))
    assert stats.record()["kv_mode"] == "evict"


@pytest.mark.parametrize("chunk,per_head", [(1, False), (6, False), (1, True)])
def test_tova_stream_equals_the_masked_dense_reference(model, ids, chunk, per_head):
    budget = token_budget(LENGTH, SPARSITY, K_MIN)
    protocol, _, _ = assert_stream_matches(
        model, ids, "tova", chunk,
        lambda q, k: spec_evict_mask(q, k, budget, chunk, tova_evict(q, k, budget, per_head)),
        per_head=per_head)
    positions = protocol.cache.layers[1].positions
    assert positions.shape[-1] == budget
    if not per_head:  # one keep set for all the KV heads of a layer
        assert bool((positions == positions[:, :1]).all())


@pytest.mark.parametrize("name", ["knorm", "quest", "tova", "oracle_topk"])
def test_zero_sparsity_is_dense_under_the_mask_protocol(model, ids, name):
    with torch.no_grad():
        dense = model(ids, labels=ids).loss.item()
        with cabattn.apply(model, method=name, sparsity=0.0) as stats:
            sparse = model(ids, labels=ids).loss.item()
    assert sparse == pytest.approx(dense, rel=1e-5) and stats.density == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["knorm", "quest"])
def test_kv_records_say_whether_the_method_evicted_or_selected(model, ids, name):
    with KVProtocol(model, name, SPARSITY, k_min=K_MIN) as stats, torch.no_grad():
        model(ids, labels=ids)
    assert stats.record()["kv_mode"] == methods.METHODS[name].kv_mode
    assert methods.METHODS[name].kv_mode == ("select" if name == "quest" else "evict")


def test_bad_parameters_are_refused_naming_the_valid_ones():
    with pytest.raises(ValueError, match=r"tova: per_head=1 must be true or false"):
        methods.get_method("tova", per_head=1)
    with pytest.raises(ValueError, match="quest.*has no parameter.*its parameters are: none"):
        methods.get_method("quest", page_size=16)
