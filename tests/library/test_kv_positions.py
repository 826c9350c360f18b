"""The kv protocol's positions="cache" (StreamingLLM's pos-shift) on a random tiny Llama:
equal to "absolute" until the first eviction, equal to an independent token-by-token
computation that re-rotates each step's keys at their cache indices, and finite on a stream
three times longer than the model's positions."""
import math

import pytest
import torch
import helpers
from helpers import tiny_llama
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from cabattn import methods as registry
from cabattn.kv_protocol import KVProtocol

LENGTH, K_MIN, SPARSITY = 80, 8, 0.75  # K = 20 of 80
N_SINK = 4


def rope_llama(max_positions: int, **rope):
    return tiny_llama(positions=max_positions, attn_implementation="sdpa", **rope)


@pytest.fixture(scope="module")
def model(single_thread):
    return rope_llama(256)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (1, LENGTH), generator=torch.Generator().manual_seed(1))


def stream_logits(model, ids, method, positions, sparsity=SPARSITY, **kw):
    with KVProtocol(model, method, sparsity, k_min=K_MIN, positions=positions, **kw) as stats:
        with torch.no_grad():
            out = model(ids, labels=ids)
    return out, stats


@pytest.mark.parametrize("chunk", [1, 4])
@pytest.mark.parametrize("name", registry.available("kv"))
def test_cache_positions_equal_absolute_until_the_first_eviction(model, ids, name, chunk):
    budget = 20
    params = {"block_size": 16} if name.startswith("cab") else {}
    absolute, _ = stream_logits(model, ids, name, "absolute", kv_chunk=chunk, **params)
    cache, stats = stream_logits(model, ids, name, "cache", kv_chunk=chunk, **params)
    # the prefill and the first chunk attend before anything is evicted: same indices (a
    # method with per-layer budgets may evict a layer right after the prefill)
    method = registry.get_method(name)
    layers = model.config.num_hidden_layers
    evicts_at_prefill = any(method.layer_budget(budget, layer, layers, ids.shape[1]) < budget
                            for layer in range(layers))
    seen = budget if evicts_at_prefill else budget + chunk
    assert torch.equal(cache.logits[:, :seen], absolute.logits[:, :seen])
    assert stats.record()["positions"] == "cache"
    # once entries are evicted the indices shift; a selecting method (quest) evicts nothing, so
    # its cache indices stay the absolute positions
    if name != "dense" and method.kv_mode == "evict":
        assert not torch.allclose(cache.logits[:, seen:], absolute.logits[:, seen:])
    at_zero, _ = stream_logits(model, ids, name, "cache", sparsity=0.0, kv_chunk=chunk)
    dense, _ = stream_logits(model, ids, name, "absolute", sparsity=0.0, kv_chunk=chunk)
    assert torch.equal(at_zero.logits, dense.logits)  # s = 0 never evicts


def reference_pos_shift_logits(model, ids, budget: int, n_sink: int) -> torch.Tensor:
    """StreamingLLM with pos-shift, token by token in plain PyTorch: token t attends to the
    first n_sink tokens and the latest ones that fit the budget, its own included; every
    attended key is rotated at its index in that list and the query at the last index."""
    inner = model.model
    heads, kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
    d = model.config.hidden_size // heads
    raw_keys = [[] for _ in inner.layers]  # per layer: each token's un-rotated key [Hkv, d]
    values = [[] for _ in inner.layers]
    logits = []
    with torch.no_grad():
        for t in range(ids.shape[1]):
            # the cache before t holds at most `budget` tokens: sinks + the most recent
            cached = [j for j in range(t) if j < n_sink or j >= t - (budget - n_sink)]
            attended = cached + [t]
            n = len(attended)
            cos, sin = inner.rotary_emb(inner.embed_tokens.weight, torch.arange(n)[None])
            h = inner.embed_tokens(ids[:, t])  # [1, hidden]
            for layer_idx, layer in enumerate(inner.layers):
                attn = layer.self_attn
                x = layer.input_layernorm(h)
                q = attn.q_proj(x).view(heads, 1, d)
                raw_keys[layer_idx].append(attn.k_proj(x).view(kv_heads, d))
                values[layer_idx].append(attn.v_proj(x).view(kv_heads, d))
                k = torch.stack([raw_keys[layer_idx][j] for j in attended], dim=1)
                v = torch.stack([values[layer_idx][j] for j in attended], dim=1)
                k, _ = apply_rotary_pos_emb(k[None], k[None], cos, sin)
                q, _ = apply_rotary_pos_emb(q[None], q[None], cos[:, n - 1:], sin[:, n - 1:])
                outputs = []
                for head in range(heads):
                    g = head * kv_heads // heads
                    scores = (q[0, head] @ k[0, g].T) / math.sqrt(d)  # [1, n]
                    outputs.append(scores.softmax(-1) @ v[g])
                h = h + attn.o_proj(torch.cat(outputs, dim=-1))
                h = h + layer.mlp(layer.post_attention_layernorm(h))
            logits.append(model.lm_head(inner.norm(h)))
    return torch.stack(logits, dim=1)


def test_cache_positions_equal_an_independent_pos_shift_stream(model, ids):
    budget = 20
    out, _ = stream_logits(model, ids, registry.get_method("streaming_llm", n_sink=N_SINK),
                           "cache", kv_chunk=1)
    expected = reference_pos_shift_logits(model, ids, budget, N_SINK)
    torch.testing.assert_close(out.logits, expected, rtol=1e-4, atol=1e-4)
    # the same stream at absolute positions is another computation
    absolute, _ = stream_logits(model, ids, "streaming_llm", "absolute", kv_chunk=1)
    assert (absolute.logits[:, budget + 1:] - expected[:, budget + 1:]).abs().max() > 1e-3


# A selecting method keeps every token (memory unbounded), so its cache indices reach the
# stream's length: only evicting methods can stream past the model's positions.
@pytest.mark.parametrize("name", helpers.kv_methods("evict"))
def test_a_stream_three_times_the_models_positions_stays_finite(single_thread, name):
    positions = 32
    short = rope_llama(positions)
    ids = torch.randint(0, 128, (1, 3 * positions), generator=torch.Generator().manual_seed(2))
    protocol = KVProtocol(short, name, 0.75, kv_chunk=4, k_min=K_MIN, positions="cache",
                          block_size=16)  # K = 24: the cache never holds more than 28 entries
    with protocol, torch.no_grad():
        out = short(ids, labels=ids)
    assert bool(torch.isfinite(out.logits).all()) and math.isfinite(out.loss.item())
    if name != "dense":  # a layer's cache holds max(K, K_l) + chunk entries
        capacity = max(layer.capacity for layer in protocol.cache.layers)
        assert capacity == max(24, *protocol.layer_budgets) + 4
        if max(protocol.layer_budgets) <= 24:  # per-layer budgets (pyramidkv) hold more
            assert capacity <= positions


def test_a_rope_that_is_not_the_identity_at_zero_is_rejected(single_thread):
    yarn = rope_llama(256, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                         "original_max_position_embeddings": 64})
    with pytest.raises(ValueError, match="attention_scaling"):
        KVProtocol(yarn, "streaming_llm", SPARSITY, positions="cache")


def test_scoring_without_logits_gives_each_predictions_nll(model, ids):
    kept, _ = stream_logits(model, ids, "h2o", "cache", kv_chunk=4)
    protocol = KVProtocol(model, "h2o", SPARSITY, k_min=K_MIN, positions="cache", kv_chunk=4,
                          keep_logits=False)
    with protocol, torch.no_grad():
        out = model(ids, labels=ids)
    assert out.logits is None and protocol.token_nll.shape == (1, LENGTH - 1)
    expected = torch.nn.functional.cross_entropy(kept.logits[0, :-1], ids[0, 1:],
                                                 reduction="none")
    torch.testing.assert_close(protocol.token_nll[0], expected)
    torch.testing.assert_close(out.loss, kept.loss)
    with pytest.raises(ValueError, match="needs labels"), protocol, torch.no_grad():
        model(ids)
