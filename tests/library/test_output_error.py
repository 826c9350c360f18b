"""The attention output error (docs/metrics.md) against a plain computation of its definition
on the q, k, v and output each layer actually saw."""
import pytest
import torch
from helpers import tiny_llama

import cabattn
from cabattn import ops


def _plain_dense(q, k, v, scale):
    """Causal softmax attention, one head at a time, GQA by repeating KV heads."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    length = q.shape[2]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v.double()


def test_output_error_equals_the_definition(monkeypatch):
    model = tiny_llama()
    seen = []  # (q, k, v, scale, out) of every layer call, in order
    sparse_attention = ops.block_sparse_attention

    def capture(q, k, v, count, index, block_size, scale, softcap=0.0):
        out = sparse_attention(q, k, v, count, index, block_size, scale, softcap)
        seen.append((q.clone(), k.clone(), v.clone(), scale, out[0].clone()))
        return out
    monkeypatch.setattr(ops, "block_sparse_attention", capture)
    ids = torch.randint(0, 128, (2, 128))
    with cabattn.apply(model, method="h2o", sparsity=0.75, block_size=16, k_min=16,
                       diagnostics=True) as stats, torch.inference_mode():
        model(ids)
    record = stats.record()
    assert len(seen) == 2
    expected = []
    for q, k, v, scale, out in seen:
        dense = _plain_dense(q, k, v, scale)
        expected.append(float((dense - out.double()).norm() / dense.norm()))
    assert record["attention_output_error"] == pytest.approx(sum(expected) / 2, rel=1e-4)
    assert record["attention_output_error_max_layer"] == pytest.approx(max(expected), rel=1e-4)
    assert 0 < record["attention_output_error"] < 1


def test_output_error_is_zero_when_everything_is_kept():
    model = tiny_llama(seed=1)
    with cabattn.apply(model, method="h2o", sparsity=0.0, block_size=16, k_min=16,
                       diagnostics=True) as stats, torch.inference_mode():
        model(torch.randint(0, 128, (1, 96)))
    assert stats.record()["attention_output_error_max_layer"] < 1e-5
    with cabattn.apply(model, method="h2o", sparsity=0.5, block_size=16,
                       k_min=16) as stats, torch.inference_mode():
        model(torch.randint(0, 128, (1, 96)))
    assert stats.record()["attention_output_error"] is None  # only with diagnostics
