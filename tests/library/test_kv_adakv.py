"""adakv under the kv protocol (docs/baselines.md, adakv; per-head budgets) against references
written from the definition: KV heads keep different numbers of entries (a ragged cache).

The rule, from the definition: at each eviction every KV head keeps its w newest entries; of
the P = K - w other picks per head each head takes round(alpha * P) of its older entries by
its own snapkv score (the window mass pooled over neighbouring entries); the layer's other
Hkv * (P - round(alpha * P)) picks go to the best normalised scores (a head's score over its
window mass on all its entries) of all heads jointly (ties: lower head, then older entry).

A one-layer float64 Llama is replayed in plain PyTorch (layer 0's queries and keys do not
depend on eviction): per KV head its own cache of positions, the rule applied to it, and each
query's visible keys; the protocol's keep sets must equal the replay's at every step and its
logits those of a dense forward masked per head with the replay's visible keys.
"""
import math

import pytest
import torch
from helpers import tiny_llama
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from cabattn.grid import token_budget
from cabattn.kv_protocol import KVProtocol
from cabattn.methods import KVState, RaggedKeep, get_method

HEADS, KV_HEADS = 4, 2
WINDOW, KERNEL = 8, 3
NEAR_TIE = 1e-9


# ----------------------------------------------------------------- the rule, from the text

def pooled(mass, candidates, kernel_size, pooling):
    """Each of the first `candidates` entries' mass pooled over its neighbours (zero padding,
    counted in the average; max pooling ignores the padding)."""
    out = []
    for j in range(candidates):
        near = [mass[i] for i in range(j - kernel_size // 2, j + kernel_size // 2 + 1)
                if 0 <= i < candidates]
        out.append(sum(near) / kernel_size if pooling == "avg" else max(near))
    return out


def adakv_choice(masses, budget, window_size, kernel_size, pooling, floor_ratio):
    """masses: per KV head, the window mass of each of its entries (oldest first). Returns
    (per head the sorted kept entry indices, the smallest score gap a pick decided)."""
    recent = min(window_size, budget)
    picks = budget - recent
    floor = math.floor(floor_ratio * picks + 0.5)
    kept, pool, gaps = [], [], [math.inf]
    for g, mass in enumerate(masses):
        n = len(mass)
        candidates = max(n - window_size, 0)
        score = pooled(mass, candidates, kernel_size, pooling)
        total = sum(mass)
        ranked = sorted(range(candidates), key=lambda j: (-score[j], j))
        kept.append(set(ranked[:floor]) | set(range(n - recent, n)))
        if 0 < floor < candidates:
            gaps.append(score[ranked[floor - 1]] - score[ranked[floor]])
        pool += [(-score[j] / total, g, j) for j in ranked[floor:]]
    pool.sort()
    shared = len(masses) * (picks - floor)
    for _, g, j in pool[:shared]:
        kept[g].add(j)
    if 0 < shared < len(pool):
        gaps.append(pool[shared][0] - pool[shared - 1][0])
    return [sorted(k) for k in kept], min(gaps)


def window_mass(queries, query_positions, keys, positions, scale, group):
    """One KV head: each entry's softmax mass from the window queries of the head's group
    ([group, w, d] at query_positions), each seeing the entries at positions <= its own,
    summed over the window and averaged over the group."""
    mass = [0.0] * len(positions)
    for h in range(group):
        for t, p_t in enumerate(query_positions):
            seen = [j for j, p in enumerate(positions) if p <= p_t]
            logits = torch.stack([queries[h, t] @ keys[j] for j in seen]) * scale
            for j, p in zip(seen, torch.softmax(logits, 0).tolist()):
                mass[j] += p / group
    return mass


def state_reference(state, method):
    """The rule on a KVState (its live entries per head): kept indices per (batch row, head)."""
    b_n, kv_heads, n = state.positions.shape
    lengths = state.head_lengths().tolist()
    queries = state.recent_queries.double()
    group, window = queries.shape[1] // kv_heads, queries.shape[2]
    out = []
    for b in range(b_n):
        newest = max(int(state.positions[b, g, lengths[b][g] - 1]) for g in range(kv_heads))
        query_positions = list(range(newest - window + 1, newest + 1))
        masses = [window_mass(queries[b, g * group:(g + 1) * group], query_positions,
                              state.keys[b, g, :lengths[b][g]].double(),
                              state.positions[b, g, :lengths[b][g]].tolist(), state.scale,
                              group) for g in range(kv_heads)]
        out.append(adakv_choice(masses, state.budget, method.window_size, method.kernel_size,
                                method.pooling, method.floor_ratio)[0])
    return out


def kept_lists(keep, kv_heads):
    """A rule's keep set as lists of indices per (batch row, head)."""
    if isinstance(keep, RaggedKeep):
        return [[keep.index[b, g, :keep.counts[b, g]].tolist() for g in range(kv_heads)]
                for b in range(keep.index.shape[0])]
    return keep.tolist()


def crafted_state(budget=16, ragged=False):
    """Head 0's window queries look at the window's own keys (its older entries get almost no
    mass), head 1's attention is spread: sharing by normalised score moves head 0's picks to
    head 1 unless the floor holds them. ragged: head 1 holds 30 live entries (its last 10
    slots stale, with junk positions and keys the rule must not read)."""
    g = torch.Generator().manual_seed(7)
    n, d = 40, 8
    u = torch.zeros(d, dtype=torch.float64)
    u[0] = 1.0
    keys = torch.randn(1, KV_HEADS, n, d, generator=g, dtype=torch.float64) * 0.3
    keys[0, 0, n - WINDOW:] += 10.0 * u
    queries = torch.randn(1, HEADS, WINDOW, d, generator=g, dtype=torch.float64) * 0.3
    queries[0, :2] += 10.0 * u
    positions = torch.arange(n).expand(1, KV_HEADS, n).clone()
    lengths = None
    if ragged:
        live = torch.sort(torch.randperm(n - 1, generator=g)[:29]).values
        positions[0, 1, :30] = torch.cat([live, torch.tensor([n - 1])])
        positions[0, 1, 30:] = 1000
        keys[0, 1, 30:] = 50.0
        lengths = torch.tensor([[n, 30]])
    return KVState(keys=keys, positions=positions, mass=torch.zeros(1, KV_HEADS, n),
                   block_queries=None, budget=budget, block_size=16, scale=0.35,
                   recent_queries=queries, lengths=lengths)


@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("floor_ratio", [0.0, 0.5, 1.0])
def test_the_rule_matches_the_reference_and_the_floor_holds(ragged, floor_ratio):
    state = crafted_state(ragged=ragged)
    method = get_method("adakv", window_size=WINDOW, kernel_size=KERNEL,
                        floor_ratio=floor_ratio)
    got = kept_lists(method.kv_keep(state), KV_HEADS)
    assert got == state_reference(state, method)
    counts = [len(head) for head in got[0]]
    assert sum(counts) == KV_HEADS * state.budget
    picks = state.budget - WINDOW
    floor = math.floor(floor_ratio * picks + 0.5)
    # head 0's older entries lose every shared pick: it keeps its window and its floor
    assert counts[0] == WINDOW + floor
    if ragged:  # a ragged head keeps live entries only
        assert max(got[0][1]) < 30


# ----------------------------------------------------- an independent one-layer replay

@pytest.fixture(scope="module")
def one_layer(single_thread):
    return tiny_llama(layers=1, heads=HEADS, kv_heads=KV_HEADS,
                      attn_implementation="sdpa").double()


def layer0_queries_and_keys(model, ids):
    """Post-RoPE q [Hq, L, d] and k [Hkv, L, d] of layer 0 in a dense pass, with its scale."""
    seen = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        seen.update(q=query[0], k=key[0], scale=kwargs["scaling"])
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("test_adakv_capture", capture)
    model.set_attn_implementation("test_adakv_capture")
    try:
        with torch.no_grad():
            model(ids)
    finally:
        model.set_attn_implementation("sdpa")
    return seen["q"], seen["k"], seen["scale"]


def replay(q, k, scale, length, budget, chunk, floor_ratio, pooling="avg"):
    """The stream per KV head: prefill `budget` tokens, then chunks; a layer over Hkv * K
    entries is evicted by the rule. Returns (the kept positions per head after each eviction,
    each query's visible positions per KV head, the smallest score gap a pick decided)."""
    group = HEADS // KV_HEADS
    caches = [[] for _ in range(KV_HEADS)]
    visible = [dict() for _ in range(KV_HEADS)]
    history, gap = [], math.inf
    for start in [0] + list(range(budget, length, chunk)):
        end = budget if start == 0 else min(start + chunk, length)
        for g in range(KV_HEADS):
            for t in range(start, end):
                visible[g][t] = caches[g] + list(range(start, t + 1))
            caches[g] += list(range(start, end))
        if sum(map(len, caches)) > KV_HEADS * budget:
            query_positions = list(range(max(end - WINDOW, 0), end))
            masses = [window_mass(q[g * group:(g + 1) * group, query_positions],
                                  query_positions, k[g, caches[g]], caches[g], scale, group)
                      for g in range(KV_HEADS)]
            kept, step_gap = adakv_choice(masses, budget, WINDOW, KERNEL, pooling, floor_ratio)
            gap = min(gap, step_gap)
            caches = [[caches[g][j] for j in kept[g]] for g in range(KV_HEADS)]
            history.append([list(c) for c in caches])
    return history, visible, gap


def recording(method):
    """`method` noting the positions each KV head kept at every eviction (batch row 0)."""
    class Recording(type(method)):
        kept = []

        def kv_keep(self, state):
            keep = super().kv_keep(state)
            self.kept.append([state.positions[0, g, index].tolist() for g, index in
                              enumerate(kept_lists(keep, state.positions.shape[1])[0])])
            return keep
    recorder = Recording(**method.config)
    recorder.kept = []
    return recorder


def masked_logits(model, ids, visible):
    """A dense forward in which query head h sees what its KV head's stream showed it."""
    length = ids.shape[1]
    mask = torch.full((1, HEADS, length, length), float("-inf"), dtype=torch.float64)
    for h in range(HEADS):
        for t, keys in visible[h // (HEADS // KV_HEADS)].items():
            mask[0, h, t, keys] = 0.0
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("floor_ratio", [0.0, 0.2, 0.6])
def test_stream_matches_an_independent_replay(one_layer, chunk, floor_ratio):
    length, sparsity, k_min = 96, 0.75, 8
    budget = token_budget(length, sparsity, k_min)  # 24: w = 8 kept, P = 16 picks per head
    ids = torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(4))
    q, k, scale = layer0_queries_and_keys(one_layer, ids)
    want, visible, gap = replay(q, k, scale, length, budget, chunk, floor_ratio)
    assert gap > NEAR_TIE, "a near tie decides a pick at this seed; pick another"

    method = recording(get_method("adakv", window_size=WINDOW, kernel_size=KERNEL,
                                  floor_ratio=floor_ratio))
    protocol = KVProtocol(one_layer, method, sparsity, kv_chunk=chunk, k_min=k_min)
    with protocol as stats, torch.no_grad():
        logits = one_layer(ids).logits
    assert len(method.kept) == len(want) == math.ceil((length - budget) / chunk)
    for step, (got, expected) in enumerate(zip(method.kept, want)):
        assert got == expected, step
    # the heads held different numbers of entries, Hkv * K in all after every eviction
    counts = [[len(head) for head in step] for step in want]
    assert any(len(set(c)) > 1 for c in counts)
    assert all(sum(c) == KV_HEADS * budget for c in counts)
    # a head that outgrew the preallocated K + c entries got more room
    layer = protocol.cache.layers[0]
    assert layer.capacity >= max(max(c) for c in counts) + chunk
    torch.testing.assert_close(logits, masked_logits(one_layer, ids, visible),
                               rtol=1e-9, atol=1e-9)
    # kept pairs per query head: what its KV head's stream showed it; their mean is the budget's
    per_head = [sum(len(keys) for keys in visible[h // 2].values()) for h in range(HEADS)]
    causal = length * (length + 1) / 2
    assert stats.layer_head_density()[0] == pytest.approx([p / causal for p in per_head],
                                                          rel=1e-12)
    uniform = budget * (budget + 1) // 2 + sum(
        c * budget + c * (c + 1) // 2 for c in
        (min(chunk, length - s) for s in range(budget, length, chunk)))
    assert stats.density == pytest.approx(uniform / causal, rel=1e-12)


def test_a_floor_of_every_pick_is_snapkv(one_layer):
    """floor_ratio 1: every head keeps its own P best, as snapkv (the cache stays uniform)."""
    ids = torch.randint(0, 128, (1, 96), generator=torch.Generator().manual_seed(4))
    params = dict(window_size=WINDOW, kernel_size=KERNEL, kv_chunk=2, k_min=8)
    out = {}
    for name, extra in (("snapkv", {}), ("adakv", {"floor_ratio": 1.0})):
        protocol = KVProtocol(one_layer, name, 0.75, **params, **extra)
        with protocol, torch.no_grad():
            out[name] = one_layer(ids).logits
        assert protocol.cache.layers[0].head_lengths is None
    assert torch.equal(out["snapkv"], out["adakv"])


# ------------------------------------------------------------- a 4-layer model, float32

@pytest.fixture(scope="module")
def model(single_thread):
    return tiny_llama(layers=4, positions=512, attn_implementation="sdpa")


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (1, 208), generator=torch.Generator().manual_seed(1))


def checked(method, layers):
    """`method` with every keep set of `layers` compared with the state reference; notes
    whether it was shown a ragged state."""
    class Checked(type(method)):
        ragged_states = 0

        def kv_keep(self, state):
            keep = super().kv_keep(state)
            if state.layer_idx in layers:
                assert kept_lists(keep, state.positions.shape[1]) == state_reference(state,
                                                                                     self)
            type(self).ragged_states += state.lengths is not None
            return keep
    return Checked(**method.config)


@pytest.mark.parametrize("chunk", [1, 5])
def test_every_eviction_keeps_what_the_rule_keeps(model, ids, chunk):
    method = checked(get_method("adakv", window_size=WINDOW, kernel_size=KERNEL,
                                floor_ratio=0.6), (0, 3))
    length, sparsity, k_min = 120, 0.7, 16
    with KVProtocol(model, method, sparsity, kv_chunk=chunk, k_min=k_min) as stats, \
            torch.no_grad():
        model(ids[:, :length], labels=ids[:, :length])
    assert type(method).ragged_states > 0
    # every head's cache had K entries on average at every step: snapkv's density
    budget = token_budget(length, sparsity, k_min)
    kept = budget * (budget + 1) // 2 + sum(
        c * budget + c * (c + 1) // 2 for c in
        (min(chunk, length - s) for s in range(budget, length, chunk)))
    causal = length * (length + 1) / 2
    assert stats.density == pytest.approx(kept / causal, rel=1e-12)
    per_head = stats.layer_head_density()
    for densities in per_head.values():
        assert sum(densities) / len(densities) == pytest.approx(kept / causal, rel=1e-12)
    assert any(max(d) - min(d) > 1e-4 for d in per_head.values())


@pytest.mark.parametrize("chunk", [1, 4])
def test_zero_sparsity_is_dense(model, ids, chunk):
    with torch.no_grad():
        dense = model(ids, labels=ids).loss
        with KVProtocol(model, "adakv", 0.0, kv_chunk=chunk, k_min=16) as stats:
            streamed = model(ids, labels=ids).loss
    assert float(streamed) == pytest.approx(float(dense), rel=1e-5)
    assert stats.density == 1.0


def test_cache_positions_run_on_a_ragged_cache(model, ids):
    """positions="cache": each head's queries and keys sit at its own cache indices; equal
    to absolute positions until the first eviction, finite after it."""
    params = dict(window_size=WINDOW, kernel_size=KERNEL, kv_chunk=4, k_min=16)
    out = {}
    for positions in ("absolute", "cache"):
        protocol = KVProtocol(model, "adakv", 0.7, positions=positions, **params)
        with protocol, torch.no_grad():
            out[positions] = model(ids, labels=ids)
    budget = token_budget(ids.shape[1], 0.7, 16)
    seen = budget + 4
    assert torch.equal(out["cache"].logits[:, :seen], out["absolute"].logits[:, :seen])
    assert math.isfinite(out["cache"].loss.item())
    assert not torch.allclose(out["cache"].logits[:, seen:], out["absolute"].logits[:, seen:])


class Keeping(type(get_method("snapkv"))):
    """snapkv's window, returning a fixed ragged keep set (to test the protocol's checks)."""
    keep = None

    def kv_keep(self, state):
        return type(self).keep(state)


@pytest.mark.parametrize("make,message", [
    (lambda s: RaggedKeep(torch.arange(40).expand(1, 2, 40).contiguous(),
                          torch.tensor([[40, 40]])), "keep more than 2 x 20"),
    (lambda s: RaggedKeep(torch.arange(20).flip(-1).expand(1, 2, 20).contiguous(),
                          torch.tensor([[20, 10]])), "not ascending"),
    (lambda s: RaggedKeep(torch.arange(20).expand(1, 2, 20).contiguous(),
                          torch.tensor([[0, 20]])), "outside 1..20"),
    (lambda s: RaggedKeep(torch.arange(20).expand(1, 2, 20).contiguous(),
                          torch.tensor([[20, 20]], dtype=torch.int32)), "int32 counts"),
])
def test_a_bad_ragged_keep_is_rejected(model, ids, make, message):
    method = Keeping()
    Keeping.keep = staticmethod(make)
    with KVProtocol(model, method, 0.9, k_min=20) as _, torch.no_grad():
        with pytest.raises(RuntimeError, match=message):
            model(ids, labels=ids)


@pytest.mark.parametrize("positions", ["absolute", "cache"])
def test_a_batch_streams_as_its_windows_alone(one_layer, positions):
    """Batch rows hold their own per-head lengths (the attention runs per row)."""
    ids = torch.randint(0, 128, (2, 96), generator=torch.Generator().manual_seed(3))
    rule = dict(window_size=WINDOW, kernel_size=KERNEL, floor_ratio=0.1)
    stream = dict(kv_chunk=3, k_min=8, positions=positions)

    class Counting(type(get_method("adakv"))):
        ragged_rows = 0

        def kv_keep(self, state):
            keep = super().kv_keep(state)
            type(self).ragged_rows += sum(len(set(row)) > 1 for row in keep.counts.tolist())
            return keep

    method = Counting(**rule)
    with KVProtocol(one_layer, method, 0.75, **stream), torch.no_grad():
        both = one_layer(ids).logits
    alone = []
    for row in range(2):
        with KVProtocol(one_layer, "adakv", 0.75, **rule, **stream), torch.no_grad():
            alone.append(one_layer(ids[row:row + 1]).logits)
    torch.testing.assert_close(both, torch.cat(alone), rtol=1e-12, atol=1e-12)
    assert Counting.ragged_rows > 0
