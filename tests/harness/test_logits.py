"""eval.logits: a forward's predictions with the output layer deferred and applied in slices
equal those of the whole logits; a model whose forward does more after its output layer than
a final soft-cap is not deferred."""
import pytest
import torch
from helpers import tiny_llama

import cabattn
from eval import logits


@pytest.fixture
def model(single_thread):
    return tiny_llama(vocab_size=300)


def test_deferred_slices_equal_the_whole_logits(model, monkeypatch):
    ids = torch.randint(0, 300, (2, 90), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = logits.predictions(model, ids, first=5)
        monkeypatch.setattr(logits, "LARGE_LOGITS", 0)
        monkeypatch.setattr(logits, "CHUNK", 16)  # several slices, the last one partial
        assert logits.can_defer(model)
        sliced = logits.predictions(model, ids, first=5, defer=True)
    assert sliced.first == whole.first == 5 and sliced.nll.shape == (2, 84)
    torch.testing.assert_close(sliced.nll, whole.nll, rtol=1e-6, atol=1e-6)
    assert torch.equal(sliced.argmax, whole.argmax)
    reference = torch.nn.functional.cross_entropy(model(ids).logits[:, 5:-1].transpose(1, 2),
                                                  ids[:, 6:], reduction="none")
    torch.testing.assert_close(whole.nll, reference.double(), rtol=1e-6, atol=1e-6)
    assert model.get_output_embeddings() is model.lm_head  # restored


def test_a_final_soft_cap_is_applied_after_the_deferred_layer(model, monkeypatch):
    ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(1))
    model.config.final_logit_softcapping = 0.5  # a Llama does not read it: this one's own
    own = model.forward

    def capped(*args, **kwargs):  # a forward that soft-caps its logits, as Gemma 2's does
        out = own(*args, **kwargs)
        cap = model.config.final_logit_softcapping
        if cap is not None:
            out.logits = cap * torch.tanh(out.logits / cap)
        return out

    monkeypatch.setattr(model, "forward", capped)
    monkeypatch.setattr(logits, "LARGE_LOGITS", 0)
    with torch.no_grad():
        assert logits.can_defer(model)
        sliced = logits.predictions(model, ids, defer=True)
        whole = logits.predictions(model, ids)
    torch.testing.assert_close(sliced.nll, whole.nll, rtol=1e-6, atol=1e-6)
    assert model.config.final_logit_softcapping == 0.5


def test_a_forward_that_changes_the_logits_otherwise_is_not_deferred(model, monkeypatch):
    own = model.forward

    def clipped(*args, **kwargs):  # a nonlinear step after the output layer
        out = own(*args, **kwargs)
        out.logits = out.logits.clamp(max=0.0)
        return out

    monkeypatch.setattr(model, "forward", clipped)
    with torch.no_grad():
        assert not logits.can_defer(model)


def test_predictions_start_where_a_protocol_returns_them(model):
    """Under the prefill protocol the forward returns positions context - 1 on: those are the
    first predictions, and asking for an earlier one is an error."""
    ids = torch.randint(0, 300, (1, 96), generator=torch.Generator().manual_seed(2))
    with cabattn.apply(model, "h2o", 0.5, protocol="prefill", k_min=8), torch.no_grad():
        scores = logits.predictions(model, ids, context_length=80)
        assert scores.first == 79 and scores.nll.shape == (1, 16)
        with pytest.raises(ValueError, match="from position 79 on"):
            logits.predictions(model, ids, first=10, context_length=80)


def test_the_size_estimate_times_a_window_as_a_cell_scores_it(model, monkeypatch):
    """The run's size estimate (eval.cell.time_forward) applies the output layer in slices as
    a cell does: timing a 16K window of a 262k vocabulary must not hold its 17 GB of logits."""
    from types import SimpleNamespace

    from eval.cell import time_forward
    monkeypatch.setattr(logits, "LARGE_LOGITS", 0)
    monkeypatch.setattr(logits, "CHUNK", 16)
    widest = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: widest.append(out.shape[1]))
    ids = torch.randint(0, 300, (1, 90), generator=torch.Generator().manual_seed(3))
    try:
        assert time_forward(SimpleNamespace(model=model), ids, "cpu") > 0
    finally:
        hook.remove()
    assert widest and max(widest[2:]) <= 16  # after can_defer's own check of 8 tokens
