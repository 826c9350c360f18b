"""The prefill protocol (docs/protocols.md, Prefill) on a random tiny Llama in float64: a
loop reference written from the definition (a dense prefill with the model's own attention,
each layer's cache compressed once by a rule written here, the continuation fed token by token
through the model's own cached decoding) equals the protocol; s = 0 is dense; the
continuation never reaches the compression; kept positions have the budget's size and hold
what each rule protects; a shared dense prefill changes nothing."""
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import attention_inputs, tiny_llama
from transformers import DynamicCache

import cabattn
from cabattn import methods as registry
from cabattn.grid import token_budget
from cabattn.prefill_protocol import PrefillProtocol, PrefillStore

LENGTH, CONTEXT, K_MIN = 96, 80, 8
HEADS, KV_HEADS, LAYERS = 4, 2, 2
SPARSITY = 0.75  # K = 20 of the 80 context tokens
WINDOW, KERNEL = 8, 5  # snapkv's observation window and pooling for these tests


@pytest.fixture(scope="module")
def model(single_thread):
    model = tiny_llama(layers=LAYERS, heads=HEADS, kv_heads=KV_HEADS,
                       attn_implementation="sdpa").double()
    # a random model attends almost uniformly, so that attention mass only ranks keys by age:
    # larger query and key weights make the attention peaked, and each rule's choice its own
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6)
            layer.self_attn.k_proj.weight.mul_(6)
    return model


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (1, LENGTH), generator=torch.Generator().manual_seed(3))


def _softmax_rows(q, k, scale, rows):
    """P [Hq, len(rows), n] of the given query positions over the n causal keys (float64)."""
    group = q.shape[1] // k.shape[1]
    keys = k[0].repeat_interleave(group, 0)  # [Hq, n, d]
    logits = q[0][:, rows] @ keys.transpose(-1, -2) * scale
    n = k.shape[2]
    future = torch.arange(n)[None, :] > torch.as_tensor(rows)[:, None]
    return torch.softmax(logits.masked_fill(future, float("-inf")), -1)


def _top(score, protected: list, budget: int) -> list:
    """protected + the highest-scored others (ties: the older), sorted."""
    others = [j for j in sorted(range(len(score)), key=lambda j: (-score[j], j))
              if j not in protected]
    return sorted(protected + others[:budget - len(protected)])


def reference_keep(method: str, q, k, scale, budget: int) -> list:
    """Per KV head, the positions a one-shot rule keeps of a context's n entries, written
    from the definitions (docs/methods.md, docs/baselines.md), float64."""
    n, hkv = k.shape[2], k.shape[1]
    group = q.shape[1] // hkv
    kept = []
    for g in range(hkv):
        heads = slice(g * group, (g + 1) * group)
        if method == "h2o":  # attention received from every context query, a recent half
            mass = _softmax_rows(q, k, scale, list(range(n)))[heads].sum((0, 1)).tolist()
            recent = math.ceil(0.5 * budget)
            kept.append(_top(mass, list(range(n - recent, n)), budget))
        elif method == "snapkv":  # the last WINDOW queries, summed, group mean, avg-pooled
            p = _softmax_rows(q, k, scale, list(range(n - WINDOW, n)))[heads]
            score = p.sum(1).mean(0)[:n - WINDOW]
            pooled = F.avg_pool1d(score[None, None], KERNEL, 1, KERNEL // 2,
                                  count_include_pad=True)[0, 0].tolist()
            kept.append(_top(pooled + [0.0] * WINDOW, list(range(n - WINDOW, n)), budget))
        elif method == "tova":  # the newest query, averaged over all the layer's heads
            p = _softmax_rows(q, k, scale, [n - 1])[:, 0].mean(0).tolist()
            kept.append(_top(p, [], budget))
        elif method == "knorm":  # the lowest key norms, the newest entry kept
            norms = k[0, g].norm(dim=-1)
            kept.append(_top((-norms).tolist(), [n - 1], budget))
        elif method == "streaming_llm":
            kept.append(list(range(4)) + list(range(n - budget + 4, n)))
    return kept


PARAMS = {"snapkv": {"window_size": WINDOW, "kernel_size": KERNEL}}


@pytest.mark.parametrize("method", ["h2o", "snapkv", "tova", "knorm", "streaming_llm"])
def test_equals_a_loop_reference(model, ids, method):
    budget = token_budget(CONTEXT, SPARSITY, K_MIN)
    context = ids[:, :CONTEXT]
    inputs = attention_inputs(model, context, range(LAYERS))
    with torch.no_grad():
        dense = model(context, use_cache=True)
    # the reference: each layer's cache compressed once, then cached decoding token by token
    cache, kept = DynamicCache(), []
    for layer in range(LAYERS):
        q, k, scale = inputs[layer]
        keep = reference_keep(method, q, k, scale, budget)
        kept.append(keep)
        index = torch.tensor(keep)[None, :, :, None]
        own = dense.cache.layers[layer]
        cache.update(own.keys.gather(2, index.expand(-1, -1, -1, own.keys.shape[-1])),
                     own.values.gather(2, index.expand(-1, -1, -1, own.values.shape[-1])),
                     layer)
    logits = [dense.logits[:, -1:]]
    with torch.no_grad():
        for position in range(CONTEXT, LENGTH - 1):
            out = model(ids[:, position:position + 1], position_ids=torch.tensor([[position]]),
                        cache=cache, use_cache=True)
            logits.append(out.logits)
    expected = torch.cat(logits, 1)
    with cabattn.apply(model, method, SPARSITY, protocol="prefill", k_min=K_MIN,
                       **PARAMS.get(method, {})) as stats, torch.no_grad():
        got = model(ids, context_length=CONTEXT).logits
    for layer in range(LAYERS):
        assert stats.kept_positions[layer][0].tolist() == kept[layer], layer
    assert got.shape[1] == LENGTH - CONTEXT + 1
    torch.testing.assert_close(got[:, :-1], expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("method", sorted(set(registry.available("prefill")) - {"dense"}))
def test_sparsity_zero_is_the_models_own_attention(method, single_thread):
    model = tiny_llama(layers=LAYERS, heads=HEADS, kv_heads=KV_HEADS,
                       attn_implementation="sdpa")
    ids = torch.randint(0, 128, (2, LENGTH), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        own = model(ids).logits
    with cabattn.apply(model, method, 0.0, protocol="prefill", k_min=K_MIN) as stats, \
            torch.no_grad():
        got = model(ids, context_length=CONTEXT).logits
    torch.testing.assert_close(got, own[:, CONTEXT - 1:], rtol=1e-5, atol=1e-5)
    assert stats.density == 1.0 and stats.density_rows == "continuation"


@pytest.mark.parametrize("method", ["h2o", "snapkv", "cab_v4", "adakv", "pyramidkv", "random"])
def test_the_continuation_never_reaches_the_compression(model, ids, method):
    """Other continuation tokens: the same kept positions and the same first prediction (it is
    the context's last position's), while the later predictions do change."""
    runs = []
    other_tail = ids.clone()
    other_tail[:, CONTEXT:] = (ids[:, CONTEXT:] + 7) % 128
    for sequence in (ids, other_tail):
        with cabattn.apply(model, method, SPARSITY, protocol="prefill", k_min=K_MIN,
                           block_size=16) as stats, torch.no_grad():
            logits = model(sequence, context_length=CONTEXT).logits
        runs.append((stats.kept_positions, logits))
    (kept, logits), (kept_tail, logits_tail) = runs
    assert all(torch.equal(a, b) for a, b in zip(kept, kept_tail))
    assert torch.equal(logits[:, 0], logits_tail[:, 0])
    assert not torch.equal(logits[:, 1:], logits_tail[:, 1:])


def test_kept_positions_have_the_budget_and_what_each_rule_protects(model, ids):
    budget = token_budget(CONTEXT, SPARSITY, K_MIN)
    protected = {"snapkv": set(range(CONTEXT - WINDOW, CONTEXT)),
                 "streaming_llm": {0, 1, 2, 3, CONTEXT - 1},
                 "h2o": set(range(CONTEXT - math.ceil(budget / 2), CONTEXT)),
                 "knorm": {CONTEXT - 1}, "cab_v4": {CONTEXT - 1}}
    for method in registry.available("prefill"):
        params = PARAMS.get(method, {}) if method != "adakv" else {"window_size": WINDOW}
        with cabattn.apply(model, method, SPARSITY, protocol="prefill", k_min=K_MIN,
                           block_size=16, **params) as stats, torch.no_grad():
            model(ids, context_length=CONTEXT)
        kept = stats.kept_positions
        assert len(kept) == LAYERS, method
        method_object = registry.get_method(method, **params)
        layer_budgets = [min(method_object.layer_budget(budget, layer, LAYERS, CONTEXT),
                             CONTEXT) if method != "dense" else CONTEXT
                         for layer in range(LAYERS)]
        for layer, positions in enumerate(kept):
            assert positions.shape[:2] == (1, KV_HEADS), method
            live = positions >= 0
            counts = live.sum(-1)
            if method == "adakv":  # heads keep different numbers, their sum the budget
                assert int(counts.sum()) == KV_HEADS * layer_budgets[layer]
            elif method.startswith("cab"):  # whole blocks of 16 and the newest: at most K
                assert bool((counts <= layer_budgets[layer]).all()), method
                assert bool((counts > layer_budgets[layer] - 16).all()), method
            elif method == "local_strided":  # the stride's multiples may leave room unused
                assert bool((counts <= layer_budgets[layer]).all()), method
            else:
                assert bool((counts == layer_budgets[layer]).all()), (method, layer)
            for head in range(KV_HEADS):
                held = positions[0, head][live[0, head]].tolist()
                assert held == sorted(set(held)) and 0 <= held[0] and held[-1] < CONTEXT
                assert protected.get(method, set()) <= set(held), (method, layer, head)


def test_a_shared_dense_prefill_changes_nothing(model, ids):
    """A store's prefill tracks what every method reads (here adakv's wider window: snapkv
    must read its own newest WINDOW queries of it)."""
    methods = [registry.get_method("h2o"), registry.get_method("snapkv", **PARAMS["snapkv"]),
               registry.get_method("adakv", window_size=2 * WINDOW)]
    store = PrefillStore.for_methods(methods, max_bytes=2**30)
    assert store.recent_query_window == 2 * WINDOW
    for method in methods:
        results = []
        for shared in (None, store, store):
            with PrefillProtocol(model, method, SPARSITY, k_min=K_MIN, block_size=16,
                                 prefill_store=shared) as stats, torch.no_grad():
                logits = model(ids, context_length=CONTEXT).logits
            results.append((stats.kept_positions, logits))
        for kept, logits in results[1:]:
            assert all(torch.equal(a, b) for a, b in zip(kept, results[0][0]))
            assert torch.equal(logits, results[0][1])
    assert store.misses == 1 and store.hits == 5 and len(store.entries) == 1
    empty = PrefillStore.for_methods(methods, max_bytes=0)
    with PrefillProtocol(model, methods[0], SPARSITY, k_min=K_MIN, prefill_store=empty), \
            torch.no_grad():
        model(ids, context_length=CONTEXT)
    assert not empty.entries and empty.bytes == 0


def test_generation_continues_the_teacher_forced_continuation(model, ids):
    """Greedy tokens fed back as a teacher-forced continuation are predicted again: the
    generation compresses the same context and evicts nothing afterwards."""
    prompt = ids[:, :CONTEXT + 4]
    protocol = PrefillProtocol(model, "snapkv", SPARSITY, k_min=K_MIN, **PARAMS["snapkv"])
    with protocol, torch.no_grad():
        # the budget is the context's, whatever window a generation is sized as
        new = protocol.generate(prompt, 6, budget_length=LENGTH, context_length=CONTEXT)
        assert protocol.budget == token_budget(CONTEXT, SPARSITY, K_MIN)
        window = torch.cat([prompt, new], 1)
        logits = model(window, context_length=CONTEXT).logits
    assert torch.equal(logits[0, 4:-1].argmax(-1), new[0])


@pytest.mark.parametrize("method, words", [("quest", "no one-shot compression"),
                                           ("oracle_topk", "use protocol='mask'")])
def test_methods_without_a_one_shot_rule_are_refused_before_the_model(method, words):
    with pytest.raises(ValueError, match=words):
        PrefillProtocol(object(), method, 0.5)
    assert method not in registry.available("prefill")
