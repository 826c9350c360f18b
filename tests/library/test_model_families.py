"""Every protocol on tiny random models of the transformers families a user may bring
(tests/model_families.py; docs/protocols.md, models beyond Llama): at s = 0 each reproduces
the model's own (eager) attention, sliding windows and soft-capping included, or refuses the
model before any window, naming the feature (GPT-OSS's sinks); at s > 0 it runs, the layers
with a sliding window keep the model's window (density 1 against the model's own pairs) and
the others keep the method's budget (the density a plain Llama's layers have)."""
import pytest
import torch
from model_families import FAMILIES, VOCAB

import cabattn

LENGTH, CONTEXT, K_MIN, BLOCK = 256, 224, 16, 16
PROTOCOLS = ("mask", "kv", "prefill")
REFUSED = {"gpt_oss": "attention sinks"}


def _ids():
    return torch.randint(3, VOCAB, (1, LENGTH), generator=torch.Generator().manual_seed(5))


def _run(model, protocol, sparsity):
    """(logits from the first position the protocol returns, stats) of h2o at `sparsity`."""
    with cabattn.apply(model, "h2o", sparsity, protocol=protocol, k_min=K_MIN,
                       block_size=BLOCK) as stats, torch.no_grad():
        # the prefill protocol compresses the first CONTEXT tokens; the others split there
        # too (mask: a dense continuation; kv: nothing changes)
        out = model(_ids(), context_length=CONTEXT).logits
    return out, stats


@pytest.fixture(scope="module")
def models(single_thread):
    """{family: (model in eager attention, its own logits)}."""
    built = {}
    for name, family in FAMILIES.items():
        model = family.build()
        model.set_attn_implementation("eager")  # the reference: Gemma 2's soft-cap needs it
        with torch.no_grad():
            built[name] = model, model(_ids()).logits
    return built


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sparsity_zero_is_the_models_own_attention_or_refused(models, family, protocol):
    model, own = models[family]
    if family in REFUSED:
        with pytest.raises(ValueError, match=REFUSED[family]):
            _run(model, protocol, 0.0)
        assert model.config._attn_implementation == "eager"  # refused before any change
        return
    got, stats = _run(model, protocol, 0.0)
    torch.testing.assert_close(got, own[:, LENGTH - got.shape[1]:], rtol=1e-5, atol=1e-5)
    windows = FAMILIES[family].features.sliding_window
    assert stats.model_windows == {layer: w for layer, w in enumerate(windows) if w}
    assert stats.softcap == FAMILIES[family].features.softcap


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("family", sorted(set(FAMILIES) - set(REFUSED)))
def test_sparse_runs_keep_the_window_and_the_budget(models, family, protocol):
    model, own = models[family]
    got, stats = _run(model, protocol, 0.5)
    assert torch.isfinite(got).all() and not torch.allclose(got, own[:, LENGTH - got.shape[1]:])
    plain = _run(models["llama"][0], protocol, 0.5)[1].layer_head_density()
    windows = FAMILIES[family].features.sliding_window
    for layer, densities in stats.layer_head_density().items():
        if windows[layer]:  # the model's own window, counted against the model's own pairs
            assert densities == [1.0] * len(densities), (family, layer)
        else:  # the method's budget: the density the same layer of a plain Llama has
            assert densities == pytest.approx(plain[layer], rel=1e-12), (family, layer)
            assert max(densities) < 1.0
