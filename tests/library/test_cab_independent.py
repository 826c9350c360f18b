"""cab_v3 and cab_v4 (mask protocol, strict causal selection) written again from their
documented rules (docs/methods.md; docs/block_statistics.md: Coarsening, FRC) as plain-PyTorch
loops that share no code with cabattn, against the project on SmolLM2-135M's own activations
(pd-books window 0, L = 512, s = 0.9, block 16): the same layout in every layer and head, and
the same logits (about 1 CPU-minute per method: the loops are slow on purpose, one row at a
time).
"""
import math

import pytest
import torch
from transformers import AttentionInterface

import cabattn

LENGTH, BLOCK, SPARSITY, K_MIN = 512, 16, 0.9, 64
LAMBDA, MAGNITUDE_RATIO = 0.3, 0.5
# The documented tolerance of max_l2 pooling for float32 inputs (docs/block_statistics.md).
TOLERANCE_FLOAT32 = 1e-4


def representatives(x: torch.Tensor) -> torch.Tensor:
    """[H, M, d]: per block, the first token whose squared norm is within the tolerance of the
    block's largest."""
    heads, length, _ = x.shape
    out = []
    for h in range(heads):
        row = []
        for start in range(0, length, BLOCK):
            norms = [float((token.double() ** 2).sum()) for token in x[h, start:start + BLOCK]]
            threshold = (1 - TOLERANCE_FLOAT32) * max(norms)
            first = next(i for i, norm in enumerate(norms) if norm >= threshold)
            row.append(x[h, start + first])
        out.append(torch.stack(row))
    return torch.stack(out)


def curvature(qc: torch.Tensor, kc: torch.Tensor, scale: float) -> torch.Tensor:
    """F [M, M] of one query head: row min-max affinity A over J <= I, F = A - lambda A@A/(I+1)."""
    m = qc.shape[0]
    r = (qc.double() @ kc.double().T) * scale
    a = torch.zeros(m, m, dtype=torch.float64)
    for i in range(m):
        row = r[i, :i + 1]
        a[i, :i + 1] = (row - row.min()) / (row.max() - row.min() + 1e-8)
    t = a @ a
    return a - LAMBDA * t / torch.arange(1, m + 1, dtype=torch.float64)[:, None]


def block_maxima(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Gblk [M, M] of one head: the largest dense causal softmax probability per block pair."""
    length = q.shape[0]
    logits = (q.double() @ k.double().T) * scale
    logits = logits.masked_fill(~torch.ones(length, length, dtype=torch.bool).tril(), -math.inf)
    p = torch.softmax(logits, dim=-1)
    m = length // BLOCK
    return p.view(m, BLOCK, m, BLOCK).amax((1, 3))


def top(scores, candidates, n):
    """The n candidates of highest score, ties to the lower index."""
    return sorted(candidates, key=lambda j: (-float(scores[j]), j))[:n]


def layout(q: torch.Tensor, k: torch.Tensor, scale: float, magnitude_ratio: float) -> list:
    """[head][row] -> sorted kept key blocks, q [Hq, L, d], k [Hkv, L, d]."""
    m = q.shape[1] // BLOCK
    budget = max(K_MIN, math.floor(round((1 - SPARSITY) * q.shape[1], 9)))
    qc, kc = representatives(q), representatives(k)
    group = q.shape[0] // k.shape[0]
    kept = []
    for h in range(q.shape[0]):
        g = h // group
        frc = curvature(qc[h], kc[g], scale)
        gblk = block_maxima(q[h], k[g], scale) if magnitude_ratio else None
        rows = []
        for row in range(m):
            keep = {row}
            k_b = min(row + 1, math.ceil(budget / BLOCK))
            source, rule_budget = row - 1, k_b - 1  # strict: the rule of row I - 1, then I
            if source >= 0 and rule_budget >= 1:
                keep.add(source)  # the rule keeps its own row's block first (the most recent)
                picks = rule_budget - 1
                by_magnitude = math.floor(picks * magnitude_ratio + 0.5)
                candidates = list(range(source))
                if by_magnitude:
                    keep.update(top(gblk[source], candidates, by_magnitude))
                rest = [j for j in candidates if j not in keep]
                keep.update(top(frc[source], rest, picks - by_magnitude))
            rows.append(sorted(keep))
        kept.append(rows)
    return kept


def as_lists(result) -> list:
    count, index = result.block_count[0], result.block_index[0]
    return [[index[h, i, :count[h, i]].tolist() for i in range(count.shape[1])]
            for h in range(count.shape[0])]


def masked_attention(q, k, v, kept, scale):
    """Plain softmax attention over the kept blocks, causal inside each block."""
    hq, length, _ = q.shape
    group = hq // k.shape[0]
    token_block = torch.arange(length) // BLOCK
    out = torch.empty_like(q)
    for h in range(hq):
        allowed = torch.zeros(length // BLOCK, length // BLOCK, dtype=torch.bool)
        for row, blocks in enumerate(kept[h]):
            allowed[row, blocks] = True
        mask = allowed[token_block][:, token_block] & torch.ones(length, length,
                                                                 dtype=torch.bool).tril()
        logits = (q[h] @ k[h // group].T) * scale
        out[h] = torch.softmax(logits.masked_fill(~mask, -math.inf), dim=-1) @ v[h // group]
    return out


@pytest.fixture(scope="module")
def smollm2(single_thread):
    from eval.data import load_windows
    from eval.models import load_model
    loaded = load_model("smollm2-135m")
    ids = load_windows("pd-books", loaded.tokenizer, LENGTH, max_windows=4).input_ids[:1]
    return loaded.model, ids


@pytest.mark.parametrize("method,magnitude_ratio", [("cab_v3", 0.0),
                                                    ("cab_v4", MAGNITUDE_RATIO)])
def test_independent_implementation_agrees_on_smollm2(smollm2, method, magnitude_ratio):
    model, ids = smollm2
    mismatched = []

    def independent(module, query, key, value, attention_mask, scaling=None, **kwargs):
        q, k, v = query[0], key[0], value[0]
        kept = layout(q, k, scaling, magnitude_ratio)
        project = as_lists(cabattn.select_blocks(query, key, method, SPARSITY, scale=scaling))
        if kept != project:
            mismatched.append(module.layer_idx)
        out = masked_attention(q, k, v, kept, scaling)
        return out[None].transpose(1, 2).contiguous(), None

    AttentionInterface.register("tests_independent_cab", independent)
    saved = model.config._attn_implementation
    with torch.inference_mode():
        model.set_attn_implementation("tests_independent_cab")
        try:
            ours = model(ids, labels=ids)
        finally:
            model.set_attn_implementation(saved)
        with cabattn.apply(model, method, SPARSITY):
            theirs = model(ids, labels=ids)
    assert mismatched == [], f"layouts differ in layers {mismatched}"
    difference = (ours.logits - theirs.logits).abs().max().item()
    ppl_ours, ppl_theirs = math.exp(ours.loss.item()), math.exp(theirs.loss.item())
    print(f"{method}: PPL independent {ppl_ours:.4f}, project {ppl_theirs:.4f}; "
          f"largest logit difference {difference:.2e}")
    assert difference < 1e-3
    assert ppl_ours == pytest.approx(ppl_theirs, rel=1e-5)
