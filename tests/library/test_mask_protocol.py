"""The mask protocol inside a (tiny, random) Llama model through cabattn.apply."""
import pytest
import torch
from helpers import tiny_llama

import cabattn
from cabattn import methods

SPARSE = [m for m in methods.available() if m != "dense"]
# every method but the upper bound that reads the queries it serves (oracle_topk)
CAUSAL = [m for m in methods.available() if not methods.METHODS[m].reads_own_row]
LENGTH = 600  # budget at s = 0.9: k_min = 64 tokens, 4 blocks of 16 per row


def budget_density(length=LENGTH, block_size=16, row_budget=4):
    """Every row keeps min(I + 1, 4) blocks: whole earlier blocks plus the causal part of its
    diagonal (the last block holds 600 - 37 * 16 = 8 tokens)."""
    kept = 0
    for row in range(-(-length // block_size)):
        size = min(block_size, length - row * block_size)
        kept += size * (min(row + 1, row_budget) - 1) * block_size + size * (size + 1) // 2
    return kept / (length * (length + 1) / 2)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=256, positions=2048)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (1, LENGTH), generator=torch.Generator().manual_seed(0))


def loss(model, ids, **apply_args):
    with torch.no_grad():
        if not apply_args:
            return model(ids, labels=ids).loss.item()
        with cabattn.apply(model, **apply_args) as stats:
            return model(ids, labels=ids).loss.item(), stats


@pytest.mark.parametrize("name", methods.available())
def test_sparsity_zero_gives_the_dense_loss(model, ids, name):
    sparse, stats = loss(model, ids, method=name, sparsity=0.0)
    assert sparse == pytest.approx(loss(model, ids), rel=1e-5)
    assert stats.density == pytest.approx(1.0)


@pytest.mark.parametrize("name", SPARSE)
def test_sparse_methods_change_the_loss_at_their_budget(model, ids, name):
    sparse, stats = loss(model, ids, method=name, sparsity=0.9)
    # a random model attends almost uniformly: the rules that keep the most mass (knorm,
    # oracle_topk) move its loss by only ~5e-5 relative
    assert sparse != pytest.approx(loss(model, ids), rel=1e-6)
    # the mean over the layers of their budgets' densities (one budget, K = 64, unless the
    # method sets budgets per layer)
    method = methods.get_method(name)
    want = sum(budget_density(row_budget=-(-method.layer_budget(64, layer, 2, LENGTH) // 16))
               for layer in range(2)) / 2
    assert stats.density == pytest.approx(want, rel=1e-9)
    assert set(stats.layer_head_density()) == {0, 1}
    assert stats.selection_seconds > 0 and stats.attention_seconds > 0
    assert stats.oracle_selection == methods.get_method(name).oracle
    assert stats.record()["oracle"] == ("upper_bound" if name == "oracle_topk" else None)


@pytest.mark.parametrize("name", CAUSAL)
def test_strict_selection_logits_before_a_token_ignore_it(model, ids, name):
    cut = 250
    changed = ids.clone()
    changed[0, cut] = (changed[0, cut] + 1) % 256
    logits = []
    for window in (ids, changed):  # one context each: random draws per (seed, window, layer)
        with torch.no_grad(), cabattn.apply(model, method=name, sparsity=0.9):
            logits.append(model(window).logits)
    before, after = logits
    torch.testing.assert_close(before[:, :cut], after[:, :cut], rtol=0, atol=1e-6)
    assert not torch.allclose(before[:, cut:], after[:, cut:])


def test_the_model_attention_is_restored(model, ids):
    original = model.config._attn_implementation
    with cabattn.apply(model, method="cab_v3", sparsity=0.5):
        assert model.config._attn_implementation == "cabattn_mask"
    assert model.config._attn_implementation == original
    with pytest.raises(ZeroDivisionError):
        with cabattn.apply(model, method="h2o", sparsity=0.5):
            1 / 0
    assert model.config._attn_implementation == original
    assert loss(model, ids) == pytest.approx(loss(model, ids))


def test_bad_arguments_fail_before_touching_the_model(model):
    original = model.config._attn_implementation
    for kwargs, message in [({"method": "cab_v5"}, "valid methods"),
                            ({"method": "h2o", "sparsity": 1.2}, "outside [0, 1)"),
                            ({"method": "h2o", "protocol": "tokens"}, "valid protocols: mask, kv"),
                            ({"method": "h2o", "lambda_redundancy": 0.3}, "no parameter")]:
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
            with cabattn.apply(model, **kwargs):
                pass
        assert model.config._attn_implementation == original


def test_cached_decoding_points_to_the_kv_protocol(model, ids):
    with torch.no_grad(), cabattn.apply(model, method="h2o", sparsity=0.5):
        out = model(ids[:, :100], use_cache=True)
        with pytest.raises(ValueError, match="protocol='kv'"):
            model(ids[:, 100:101], past_key_values=out.past_key_values, use_cache=True)


def test_a_padding_mask_is_rejected_and_an_all_ones_mask_is_causal(model, ids):
    window = ids[:, :200]
    with torch.no_grad(), cabattn.apply(model, method="cab_v4", sparsity=0.5):
        plain = model(window, labels=window).loss.item()
        ones = model(window, attention_mask=torch.ones_like(window), labels=window).loss.item()
        padded = torch.ones_like(window)
        padded[:, :10] = 0
        with pytest.raises(ValueError, match="padding"):
            model(window, attention_mask=padded)
    assert ones == pytest.approx(plain, rel=1e-6)


def test_kv_protocol_dispatch_and_mask_only_patterns(model, ids):
    window = ids[:, :160]
    with torch.no_grad(), cabattn.apply(model, method="streaming_llm", sparsity=0.5,
                                        protocol="kv", kv_chunk=16, block_size=16) as stats:
        streamed = model(window, labels=window).loss.item()
    assert stats.density < 1.0 and streamed != pytest.approx(loss(model, window), rel=1e-6)
    original = model.config._attn_implementation
    with pytest.raises(ValueError, match="pattern='budget'"):
        with cabattn.apply(model, method="local_strided", pattern="fixed", sparsity=0.5,
                           protocol="kv"):
            pass
    assert model.config._attn_implementation == original


def test_the_stats_record_says_what_ran(model, ids):
    _, stats = loss(model, ids, method="cab_v4", sparsity=0.9, k_min=32, block_size=32)
    record = stats.record()
    assert (record["protocol"], record["causal_selection"]) == ("mask", "strict")
    assert (record["block_size"], record["k_min"]) == (32, 32)
    assert record["params"] == methods.get_method("cab_v4").config
    assert record["oracle_selection"] and record["density"] == stats.density
    assert set(record["layer_head_density"]) == {"0", "1"}
    with cabattn.model_attention(model) as dense:
        assert dense.record()["protocol"] == "dense" and dense.record()["density"] == 1.0


@pytest.mark.gpu
def test_gpu_timings_come_from_cuda_events(model, ids):
    with torch.no_grad(), cabattn.apply(model.cuda(), method="h2o", sparsity=0.9) as stats:
        model(ids.cuda(), labels=ids.cuda())
    assert stats.pending  # events, read once at the end instead of a sync per layer
    assert stats.selection_seconds > 0 and stats.attention_seconds > 0 and not stats.pending
    model.cpu()


# -- what the kept attention explains (docs/metrics.md) -------------------------------------------

def captured_qk(model, ids, monkeypatch, **apply_args):
    """Each layer's post-RoPE (q, k, scale) as the protocol saw them, and its stats."""
    from cabattn.mask_protocol import MaskProtocol
    seen, attend = {}, MaskProtocol.attend

    def spy(self, module, query, key, value, attention_mask, scaling):
        seen[module.layer_idx] = (query.clone(), key.clone(), scaling or module.scaling)
        return attend(self, module, query, key, value, attention_mask, scaling)
    monkeypatch.setattr(MaskProtocol, "attend", spy)
    _, stats = loss(model, ids, **apply_args)
    return seen, stats


@pytest.mark.parametrize("name", ["cab_v3", "h2o", "streaming_llm"])
def test_attention_recall_is_the_kept_softmax_mass(model, ids, name, monkeypatch):
    from cabattn.reference import layout_to_mask
    seen, stats = captured_qk(model, ids, monkeypatch, method=name, sparsity=0.9,
                              diagnostics=True)
    per_layer = []
    for layer, (q, k, scale) in sorted(seen.items()):
        layout = cabattn.select_blocks(q, k, name, 0.9, scale=scale)
        keep = layout_to_mask(layout.block_count, layout.block_index, LENGTH,
                              layout.grid.block_size)
        k_full = k.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        scores = (q.double() @ k_full.transpose(-1, -2)) * scale
        causal = torch.ones(LENGTH, LENGTH, dtype=torch.bool).tril()
        p = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        per_layer.append(float((p * keep).sum(-1).mean()))
    assert stats.layer_recall() == pytest.approx(dict(enumerate(per_layer)), abs=1e-5)
    assert stats.attention_recall == pytest.approx(sum(per_layer) / len(per_layer), abs=1e-5)
    assert stats.attention_recall_min_layer == pytest.approx(min(per_layer), abs=1e-5)
    assert 0.05 < stats.attention_recall < 0.999


def test_attention_recall_is_one_when_everything_is_kept(model, ids):
    from cabattn.mask_protocol import MaskProtocol
    with torch.no_grad(), MaskProtocol(model, methods.get_method("cab_v3"), 0.0,
                                       diagnostics=True) as stats:
        model(ids)
    assert stats.attention_recall == pytest.approx(1.0, abs=1e-5)
    assert stats.attention_recall_min_layer == pytest.approx(1.0, abs=1e-5)
    assert stats.sink_retention == 1.0


def test_sink_retention_and_selection_share_are_recorded(model, ids):
    _, sinks = loss(model, ids, method="streaming_llm", sparsity=0.9)
    record = sinks.record()
    assert record["sink_retention"] == 1.0
    assert record["attention_recall"] is None  # measured only with diagnostics
    assert record["selection_share"] == pytest.approx(
        record["selection_seconds"] / record["attention_seconds"])
    _, frc = loss(model, ids, method="cab_v3", sparsity=0.9)
    _, kept = loss(model, ids, method="cab_v3", sparsity=0.9, keep_sink_blocks=1)
    assert frc.sink_retention < 1.0 and kept.sink_retention == 1.0


# -- a context and a continuation (docs/protocols.md, the split) -------------------------------
SPLIT_LENGTH, SPLIT_CONTEXT = 128, 112  # at s = 0.9 both are 8 blocks of 16 with K = k_min


@pytest.mark.parametrize("name", ["h2o", "cab_v4", "snapkv", "streaming_llm"])
def test_a_dense_continuation_leaves_the_context_digit_for_digit(model, ids, name):
    """decoding dense: the context's rows are exactly the unsplit forward's, the
    continuation's are not; decoding sparse: the whole forward is the unsplit one."""
    window = ids[:, :SPLIT_LENGTH]
    runs = {}
    for decoding, split in (("dense", None), ("dense", SPLIT_CONTEXT),
                            ("sparse", SPLIT_CONTEXT)):
        with cabattn.apply(model, method=name, sparsity=0.9, decoding=decoding) as stats, \
                torch.no_grad():
            runs[decoding, split] = model(window, context_length=split).logits, stats
    plain, _ = runs["dense", None]
    dense, stats = runs["dense", SPLIT_CONTEXT]
    assert torch.equal(dense[:, :SPLIT_CONTEXT], plain[:, :SPLIT_CONTEXT])
    assert not torch.equal(dense[:, SPLIT_CONTEXT:], plain[:, SPLIT_CONTEXT:])
    assert stats.density_rows == "context" and stats.density < 1.0
    assert stats.record()["continuation_attention"] == "dense (every earlier key)"
    assert torch.equal(runs["sparse", SPLIT_CONTEXT][0], plain)
    assert runs["sparse", SPLIT_CONTEXT][1].density_rows == "all"


@pytest.mark.parametrize("name", ["h2o", "cab_v4"])
def test_a_dense_continuation_is_cached_dense_decoding_after_a_block_sparse_prompt(
        model, ids, name):
    """The teacher-forced form of a block-sparse prefill followed by dense decoding: the
    prompt's cache from a block-sparse forward, then each continuation token under the model's
    own attention (here the grids of the prompt and of the whole window agree: 8 blocks of 16,
    K = k_min)."""
    window = ids[:, :SPLIT_LENGTH]
    own = model.config._attn_implementation
    with torch.no_grad():
        with cabattn.apply(model, method=name, sparsity=0.9):
            out = model(window[:, :SPLIT_CONTEXT], use_cache=True)
            split = model(window, context_length=SPLIT_CONTEXT).logits
        assert model.config._attn_implementation == own
        cache, logits = out.cache, [out.logits[:, -1:]]
        for position in range(SPLIT_CONTEXT, SPLIT_LENGTH - 1):
            out = model(window[:, position:position + 1], cache=cache, use_cache=True)
            logits.append(out.logits)
    torch.testing.assert_close(split[:, SPLIT_CONTEXT - 1:-1], torch.cat(logits, 1),
                               rtol=1e-4, atol=1e-4)


def test_generation_refuses_sparse_decoding(model, ids):
    protocol = cabattn.MaskProtocol(model, "h2o", 0.5, decoding="sparse")
    with protocol, pytest.raises(ValueError, match="teacher-forced only"):
        protocol.generate(ids[:, :64], 4)
