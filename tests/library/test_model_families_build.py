"""tests/model_families.py: every family builds and runs a forward at L = 256, the probe passes
the model's own attention through unchanged, and what it records (and what the model holds)
matches the features each family declares."""
import re

import pytest
import torch
from model_families import FAMILIES, HEAD_DIM, VOCAB, attention_calls

L = 256

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (1, L), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=list(FAMILIES))
def built(request, ids):
    """(family, model, the probe's calls, logits through the probe, eager logits)."""
    family = FAMILIES[request.param]
    model = family.build()
    calls = attention_calls(model, ids)
    model.set_attn_implementation("cabattn_family_probe")
    with torch.no_grad():
        probed = model(ids).logits
    model.set_attn_implementation("eager")
    with torch.no_grad():
        eager = model(ids).logits
    return family, model, calls, probed, eager


def test_builds_and_runs_a_forward(built):
    family, model, calls, probed, eager = built
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert model.config.num_hidden_layers == 2 == len(calls)
    assert probed.shape == (1, L, VOCAB) and torch.isfinite(probed).all()
    # The probe records and computes what the model's eager attention computes.
    assert torch.equal(probed, eager)
    assert [call["layer"] for call in calls] == [0, 1]
    for call in calls:
        assert call["query"][2] == call["key"][2] == L and call["query"][3] == HEAD_DIM


def test_the_probe_sees_the_declared_features(built):
    family, model, calls, _, _ = built
    features = family.features
    for layer, call in enumerate(calls):
        assert call.get("sliding_window") == features.sliding_window[layer], layer
        assert call.get("softcap") == features.softcap, layer
        assert call["scaling"] == pytest.approx(features.score_scale, rel=1e-12), layer
        sinks = call.get("s_aux")
        if features.sinks:
            assert sinks.shape == (call["query"][1],)  # one learned logit per query head
        else:
            assert sinks is None


def test_the_model_holds_its_declared_rotary_and_norms(built):
    family, model, _, _, _ = built
    features = family.features
    # RoPE rotates 2 dims per inverse frequency; a model without RoPE has none.
    rotated = {2 * buffer.numel() for name, buffer in model.named_buffers()
               if name.endswith("inv_freq") and "original" not in name}
    assert rotated == ({round(features.rotary_fraction * HEAD_DIM)}
                       if features.rotary_fraction else set())
    no_rope = tuple(module.layer_idx for module in model.modules()
                    if getattr(module, "use_rope", True) == 0)  # SmolLM3's attention flag
    assert no_rope == features.no_rope_layers
    qk_norms = {name for name, _ in model.named_modules()
                if re.search(r"\.[qk]_(norm|layernorm)$", name)}
    assert bool(qk_norms) == features.qk_norm


def _last_hidden(model, ids):
    with torch.no_grad():
        return model(ids, output_hidden_states=True).hidden_states[-1]


def test_windows_and_caps_change_the_output(ids):
    """The declared features matter at L = 256: without its sliding window Mistral computes
    something else, and so does the soft-capped Gemma 2 without its cap of 5."""
    mistral = FAMILIES["mistral"].build()
    capped = FAMILIES["gemma2_softcap5"].build()
    windowed, cap = _last_hidden(mistral, ids), _last_hidden(capped, ids)
    mistral.config.sliding_window = None
    for layer in capped.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    full, uncapped = _last_hidden(mistral, ids), _last_hidden(capped, ids)
    assert (windowed - full).norm() > 0.05 * full.norm()
    assert (cap - uncapped).norm() > 0.2 * uncapped.norm()
