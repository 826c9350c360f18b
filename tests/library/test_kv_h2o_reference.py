"""The h2o kv rule end to end (docs/protocols.md, docs/methods.md), against an independent
simulation.

A one-layer random Llama: layer 0's queries and keys do not depend on eviction, so the test can
take them from a dense pass and replay the stream itself in float64: prefill K tokens densely,
then per chunk let every query see the cache plus the chunk up to itself, add to each key's
score the probability each of the KV head's query heads gives it (from the prefill on), and
evict down to K: the ceil(rho K) most recent entries plus the highest-scored rest; an evicted
token is gone with its score, a new one starts at 0. The protocol's keep sets, accumulated
mass and loss must match the simulation's (the loss via a per-head masked dense forward).
"""
import math

import pytest
import torch
from helpers import attention_inputs, tiny_llama

from cabattn import methods as registry
from cabattn.kv_protocol import KVProtocol
from cabattn.methods.base import Method

LENGTH, K_MIN, SPARSITY = 80, 8, 0.75  # K = 20
BUDGET = 20
HEADS, KV_HEADS = 4, 2
NEAR_TIE = 1e-5


@pytest.fixture(scope="module")
def model(single_thread):
    return tiny_llama(layers=1, heads=HEADS, kv_heads=KV_HEADS, attn_implementation="sdpa")


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (1, LENGTH), generator=torch.Generator().manual_seed(2))


def simulate_h2o(q, k, scale, budget, chunk, rho):
    """Replays the stream per KV head. Returns (keep sets after each eviction, as position
    lists per KV head; the scores of the kept entries then; the visible keys of every query,
    per KV head; whether a near tie decided an eviction)."""
    group = q.shape[0] // k.shape[0]
    evictions, scores_after, visible, near_tie = [], [], [], False
    for g in range(k.shape[0]):
        cache, score, seen_by = [], {}, {}
        starts = [0] + list(range(budget, LENGTH, chunk))
        history, history_scores = [], []
        for start in starts:
            end = budget if start == 0 else min(start + chunk, LENGTH)
            for t in range(start, end):
                cache.append(t)
                score[t] = 0.0
            for t in range(start, end):
                keys = [j for j in cache if j <= t]
                seen_by[t] = keys
                for h in range(g * group, (g + 1) * group):
                    logits = torch.stack([q[h, t] @ k[g, j] for j in keys]) * scale
                    for j, p in zip(keys, torch.softmax(logits, 0).tolist()):
                        score[j] += p
            if len(cache) > budget:
                n_recent = math.ceil(rho * budget)
                older = sorted(cache[:-n_recent], key=lambda j: (-score[j], j))
                n_top = budget - n_recent
                gap = score[older[n_top - 1]] - score[older[n_top]]
                near_tie |= gap <= NEAR_TIE * score[older[0]]
                cache = sorted(older[:n_top]) + cache[-n_recent:]
                score = {j: score[j] for j in cache}
                history.append(list(cache))
                history_scores.append([score[j] for j in cache])
        evictions.append(history)
        scores_after.append(history_scores)
        visible.append(seen_by)
    return evictions, scores_after, visible, near_tie


class Recorder(Method):
    """h2o's own kv rule, noting what it was shown and what it kept."""
    name = "h2o_recorder"

    def __init__(self, inner):
        super().__init__()
        self.inner, self.kept, self.mass = inner, [], []

    def kv_keep(self, state):
        keep = self.inner.kv_keep(state)
        self.kept.append(state.positions.gather(-1, keep)[0].tolist())
        self.mass.append(state.mass.gather(-1, keep)[0].double())
        return keep


@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("rho", [0.5, 0.25])
def test_h2o_kv_keeps_and_loss_match_an_independent_stream(model, ids, chunk, rho):
    q, k, scale = attention_inputs(model, ids, [0])[0]
    q, k = q[0].double(), k[0].double()
    want, want_scores, visible, near_tie = simulate_h2o(q, k, scale, BUDGET, chunk, rho)
    assert not near_tie, "a near tie decides an eviction at this seed; pick another"

    recorder = Recorder(registry.get_method("h2o", h2o_recent_ratio=rho))
    with KVProtocol(model, recorder, SPARSITY, kv_chunk=chunk, k_min=K_MIN), torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert len(recorder.kept) == len(want[0]) == math.ceil((LENGTH - BUDGET) / chunk)
    for step, (kept, mass) in enumerate(zip(recorder.kept, recorder.mass)):
        for g in range(KV_HEADS):
            assert kept[g] == want[g][step], (step, g)
            torch.testing.assert_close(mass[g], torch.tensor(want_scores[g][step],
                                                             dtype=torch.float64),
                                       rtol=1e-5, atol=1e-6)

    # The loss: a dense forward whose per-head mask shows each query what the stream showed.
    mask = torch.full((1, HEADS, LENGTH, LENGTH), float("-inf"))
    group = HEADS // KV_HEADS
    for h in range(HEADS):
        for t, keys in visible[h // group].items():
            mask[0, h, t, keys] = 0.0
    with torch.no_grad():
        reference = model(ids, attention_mask=mask, labels=ids).loss.item()
    assert loss == pytest.approx(reference, rel=1e-5)
    with torch.no_grad():
        assert loss != pytest.approx(model(ids, labels=ids).loss.item(), rel=1e-4)
