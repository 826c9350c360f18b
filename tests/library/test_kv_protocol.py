"""The kv protocol on a random tiny Llama (2 layers, GQA 4:2): exactness against independent
references, cache invariants after every eviction, and the protocol's bookkeeping."""
import inspect
import math

import helpers
import pytest
import torch
from helpers import tiny_llama
from transformers import DynamicCache

from cabattn import methods as registry
from cabattn.grid import token_budget
from cabattn.kv_protocol import KVProtocol
from cabattn.methods.base import KVState, Method

LENGTH, K_MIN = 80, 8
SPARSITY = 0.75  # K = 20 of 80


@pytest.fixture(scope="module")
def model(single_thread):
    return tiny_llama(attn_implementation="sdpa")


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (1, LENGTH), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def dense_loss(model, ids):
    with torch.no_grad():
        return float(model(ids, labels=ids).loss)


class Recorder(Method):
    """Wraps a method: checks every KVState it is shown and every keep set it returns."""
    name = "recorder"

    def __init__(self, inner: Method, dense_keys, dense_values, chunk: int):
        super().__init__()
        self.inner, self.chunk = inner, chunk
        self.dense_keys, self.dense_values = dense_keys, dense_values  # layer 0, [B, Hkv, L, d]
        self.protocol = None  # set once the protocol exists: the live cache is its .cache
        self.evictions = 0

    @property
    def block_query_pooling(self):
        return self.inner.block_query_pooling

    @property
    def recent_query_window(self):
        return self.inner.recent_query_window

    def kv_keep(self, state: KVState) -> torch.Tensor:
        b, h, n = state.positions.shape
        # the cache held at most K entries before this chunk arrived
        assert n <= state.budget + self.chunk
        # positions are the tokens' original positions, ascending and unique per head
        assert bool((state.positions[..., 1:] > state.positions[..., :-1]).all())
        assert bool((state.mass >= 0).all())
        if state.layer_idx == 0:  # layer 0's keys and values do not depend on eviction
            idx = state.positions[..., None].expand(-1, -1, -1, state.keys.shape[-1])
            values = self.protocol.cache.layers[0].values
            torch.testing.assert_close(state.keys, self.dense_keys.gather(2, idx))
            torch.testing.assert_close(values, self.dense_values.gather(2, idx))
        keep = self.inner.kv_keep(state)
        assert keep.dtype == torch.long and keep.shape[:2] == (b, h)
        assert keep.shape[-1] <= state.budget
        assert bool((keep[..., 1:] > keep[..., :-1]).all())
        assert int(keep.min()) >= 0 and int(keep.max()) < n
        self.evictions += 1
        return keep


def dense_kv(model, ids):
    """Layer 0's keys and values of a dense pass, [B, Hkv, L, d]."""
    cache = DynamicCache(config=model.config)
    # transformers 5.24 renamed past_key_values to cache; 5.17 knows only past_key_values
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        model(ids, use_cache=True, **{name: cache})
    return cache.layers[0].keys, cache.layers[0].values


def streaming_rule(cached: list, budget: int, n_sink: int = 4) -> list:
    """StreamingLLM: the first n_sink tokens + the most recent."""
    return cached[:n_sink] + cached[len(cached) - (budget - n_sink):]


def strided_rule(cached: list, budget: int) -> list:
    """local_strided: the last ceil(K/2) tokens + the older ones whose position is a multiple
    of the smallest power-of-two stride that fits the rest of K."""
    recent = math.ceil(budget / 2)
    history = cached[-1] + 1 - recent  # older positions: 0..history-1
    stride = 1
    while math.ceil(history / stride) > budget - recent:
        stride *= 2
    return [p for p in cached if p >= history or p % stride == 0]


def reference_mask(rule, length: int, budget: int, chunk: int) -> torch.Tensor:
    """Float [1, 1, L, L] mask (0 keep, -inf drop) of a policy, simulated on position lists:
    the first `budget` tokens are prefilled; then each chunk joins the cache, its query t
    sees the cache plus the chunk up to itself, and a cache over budget is cut by the rule."""
    mask = torch.full((length, length), float("-inf"))
    cached = []
    for start in [0] + list(range(budget, length, chunk)):
        end = budget if start == 0 else min(start + chunk, length)
        for t in range(start, end):
            mask[t, cached] = 0.0
            mask[t, start:t + 1] = 0.0
        cached += list(range(start, end))
        if len(cached) > budget:
            cached = rule(cached, budget)
    return mask[None, None]


def reference_loss(model, ids, mask):
    with torch.no_grad():
        return float(model(ids, attention_mask=mask, labels=ids).loss)


def run_kv(model, ids, method, sparsity=SPARSITY, **kw):
    with KVProtocol(model, method, sparsity, k_min=K_MIN, **kw) as stats:
        with torch.no_grad():
            out = model(ids, labels=ids)
    return out, stats


@pytest.mark.parametrize("name", registry.available("kv"))
def test_every_method_at_zero_sparsity_is_dense(model, ids, dense_loss, name):
    out, stats = run_kv(model, ids, name, sparsity=0.0)
    assert out.loss.item() == pytest.approx(dense_loss, rel=1e-5)
    assert stats.density == 1.0
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("name,rule,chunk", [
    ("streaming_llm", streaming_rule, 1),
    ("streaming_llm", streaming_rule, 7),
    ("local_strided", strided_rule, 1),
    ("local_strided", strided_rule, 3),
])
def test_policy_equals_masked_dense_reference(model, ids, name, rule, chunk):
    budget = token_budget(LENGTH, SPARSITY, K_MIN)
    mask = reference_mask(rule, LENGTH, budget, chunk)
    out, stats = run_kv(model, ids, name, kv_chunk=chunk)
    assert out.loss.item() == pytest.approx(reference_loss(model, ids, mask), rel=1e-5)
    # every layer and head attended to exactly the reference's pairs
    kept = float((mask == 0).sum())
    causal = LENGTH * (LENGTH + 1) / 2
    for layer, density in stats.layer_head_density().items():
        assert density == pytest.approx([kept / causal] * model.config.num_attention_heads)
    assert stats.density == pytest.approx(kept / causal)


@pytest.mark.parametrize("name", sorted(set(helpers.kv_methods("evict")) - {"dense"}))
@pytest.mark.parametrize("chunk", [1, 5])
def test_cache_after_every_eviction(model, ids, name, chunk):
    """At most K entries per KV head, sorted unique keep sets, original positions (layer 0's
    cached keys and values are the dense pass's at those positions)."""
    keys, values = dense_kv(model, ids)
    recorder = Recorder(registry.get_method(name), keys, values, chunk)
    protocol = KVProtocol(model, recorder, SPARSITY, kv_chunk=chunk, k_min=K_MIN)
    recorder.protocol = protocol
    with protocol as stats, torch.no_grad():
        out = model(ids, labels=ids)
    budget = token_budget(LENGTH, SPARSITY, K_MIN)
    # a cache over budget is evicted after each chunk (a rule keeping fewer than K skips some)
    streamed_chunks = math.ceil((LENGTH - budget) / chunk)
    assert 0 < recorder.evictions <= streamed_chunks * model.config.num_hidden_layers
    assert math.isfinite(out.loss.item())
    assert 0 < stats.density < 1
    for layer in protocol.cache.layers:
        assert layer.length <= budget
        # coarse block queries are tracked exactly for the rules that read them
        assert (layer.block_query_buffer is not None) == (recorder.block_query_pooling
                                                          is not None)


def test_h2o_keeps_recent_window_and_heavy_hitter():
    method = registry.get_method("h2o")
    budget, n, b, h = 10, 16, 1, 2
    mass = torch.rand(b, h, n) * 0.1
    mass[0, 0, 3] = 50.0  # a heavy hitter in head 0 only
    mass[0, 1, 7] = 50.0  # and another in head 1
    state = KVState(keys=torch.randn(b, h, n, 8), positions=torch.arange(n).expand(b, h, n),
                    mass=mass, block_queries=torch.randn(b, 2 * h, 1, 8), budget=budget,
                    block_size=16, scale=8 ** -0.5)
    keep = method.kv_keep(state)
    recent = math.ceil(method.h2o_recent_ratio * budget)
    assert keep.shape == (b, h, budget)
    for head, hitter in ((0, 3), (1, 7)):
        kept = set(keep[0, head].tolist())
        assert set(range(n - recent, n)) <= kept
        assert hitter in kept
        # the rest are the highest-mass older entries
        older = mass[0, head, :n - recent]
        top = set(older.topk(budget - recent).indices.tolist())
        assert kept - set(range(n - recent, n)) == top


def test_forward_and_attention_restored_on_error(model, ids):
    class Broken(Method):
        name = "broken"

        def kv_keep(self, state):
            raise RuntimeError("rule failed")

    forward = model.forward
    with pytest.raises(RuntimeError, match="rule failed"):
        with KVProtocol(model, Broken(), SPARSITY, k_min=K_MIN):
            model(ids, labels=ids)
    assert model.config._attn_implementation == "sdpa"
    assert "forward" not in model.__dict__ and model.forward == forward
    with torch.no_grad():
        model(ids)  # the model's own attention works again


@pytest.mark.parametrize("kwargs,match", [
    (dict(sparsity=1.0), "sparsity"),
    (dict(kv_chunk=0), "kv_chunk"),
    (dict(positions="relative"), "absolute"),
    (dict(block_size=48), "block_size"),
])
def test_bad_arguments_are_rejected(model, kwargs, match):
    args = dict(sparsity=SPARSITY) | kwargs
    with pytest.raises(ValueError, match=match):
        KVProtocol(model, "streaming_llm", **args)


def test_bad_keep_is_reported(model, ids):
    class OverBudget(Method):
        name = "over_budget"

        def kv_keep(self, state):
            b, h, n = state.positions.shape
            return torch.arange(n).expand(b, h, n).contiguous()

    with pytest.raises(RuntimeError, match="expected int64"):
        run_kv(model, ids, OverBudget())


def test_mean_pooled_block_queries_are_the_mean_of_each_blocks_queries():
    from cabattn.kv_cache import EvictingLayer
    query = torch.randn(1, 2, 11, 4, dtype=torch.float64)
    layer = EvictingLayer(capacity=16, block_size=4, num_blocks=3, block_query_pooling="mean")
    kv = torch.zeros(1, 1, 11, 4, dtype=torch.float64)
    layer.update(kv, kv, positions=torch.arange(11)[None])
    for start in range(0, 11, 3):  # chunks of 3 straddle the blocks of 4
        layer.note_queries(query[:, :, start:start + 3], start)
    pooled = layer.state(budget=8, scale=1.0, layer_idx=0, window_idx=0, seed=0).block_queries
    expected = torch.stack([query[:, :, 0:4].mean(2), query[:, :, 4:8].mean(2),
                            query[:, :, 8:11].mean(2)], dim=2)
    torch.testing.assert_close(pooled, expected)
    with pytest.raises(ValueError, match="valid: None, max_l2, mean"):
        EvictingLayer(capacity=16, block_size=4, num_blocks=3, block_query_pooling="median")


@pytest.mark.parametrize("pooling", ["max_l2", "mean"])
def test_the_cache_pools_queries_as_the_method_does(model, ids, pooling):
    method = registry.get_method("cab_v4", pooling=pooling)
    protocol = KVProtocol(model, method, SPARSITY, kv_chunk=5, k_min=K_MIN, block_size=16)
    with protocol, torch.no_grad():
        assert math.isfinite(model(ids, labels=ids).loss.item())
    assert {layer.block_query_pooling for layer in protocol.cache.layers} == {pooling}


def test_the_stats_record_says_what_ran(model, ids):
    protocol = KVProtocol(model, "h2o", SPARSITY, kv_chunk=5, k_min=K_MIN)
    with protocol as stats, torch.no_grad():
        model(ids, labels=ids)
    record = stats.record()
    assert (record["protocol"], record["kv_chunk"], record["k_min"]) == ("kv", 5, K_MIN)
    assert record["block_size"] == 16 and record["params"] == {"h2o_recent_ratio": 0.5}
    assert record["density"] == stats.density < 1
    assert record["selection_seconds"] > 0 and record["attention_seconds"] > 0


def test_sink_retention_and_cached_age_of_streaming_llm(model, ids):
    _, stats = run_kv(model, ids, "streaming_llm")
    budget = token_budget(LENGTH, SPARSITY, K_MIN)
    steps = [list(range(budget))]  # what every cache holds after the prefill, then each token
    steps += [list(range(4)) + list(range(t - (budget - 4) + 1, t + 1))
              for t in range(budget, LENGTH)]
    ages = [t[-1] - p for t in steps for p in t]
    record = stats.record()
    assert record["sink_retention"] == 1.0
    assert record["mean_cached_age"] == pytest.approx(sum(ages) / len(ages))
    assert record["attention_recall"] is None
    _, recent = run_kv(model, ids, "streaming_llm", n_sink=0)
    assert recent.sink_retention == pytest.approx(1 / len(steps))  # only the prefill held it
