"""Key-token perplexity (LongPPL, Fang et al., ICLR 2025; docs/metrics.md, Key tokens).

Plain perplexity is dominated by tokens a short context already predicts. A key token of a
window is one the dense model predicts well only with the long context: with NLL_full(t) its
NLL given the whole window before t and NLL_short(t) its NLL given only the S tokens before
it (S = key_context), t is a key token when

    NLL_short(t) - NLL_full(t) > KEY_GAIN   and   NLL_full(t) < KEY_CEILING

(LongPPL's alpha = 2 and beta = -2). The short-context NLLs are computed in blocks of S/4
consecutive targets that share one context, the S tokens before the block's first target
(so a target sees between S and S + S/4 - 1 tokens): (L - S) / (S/4) forwards of 1.25 S tokens
per window, batched, a few dense forwards' worth. Windows that start with a BOS token (a model
whose tokenizer puts one before every text, docs/datasets.md) give each short context the BOS
too, ahead of its S tokens. The key tokens of (model, windows) are computed once per process
and reused by every cell of that (dataset, L).
"""
import math

import torch

KEY_GAIN = 2.0  # NLL_short - NLL_full must exceed this (nats)
KEY_CEILING = 2.0  # NLL_full must be below this (nats)
MIN_KEY_TOKENS = 30  # fewer: the cell's key-token perplexity is indicative only
MIN_KEY_CONTEXT = 64
_CACHE = {}  # (model id, windows fingerprint, S) -> KeyTokens


def key_context(context_length: int) -> int:
    """S = L / 8, at least 64 tokens (METHODS: key_context)."""
    return max(MIN_KEY_CONTEXT, context_length // 8)


def token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """NLL of every next-token prediction: logits [B, n, V], ids [B, n] -> [B, n - 1] float64
    (entry j is the NLL of ids[:, j + 1])."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none").double()


def short_context_nll(model, ids: torch.Tensor, short: int, batch: int = 32,
                      bos_token_id=None) -> torch.Tensor:
    """NLL_short of one window ids [L]: [L - 1] float64, entry j for target t = j + 1; targets
    t <= S see the whole window anyway and get NaN (they cannot be key tokens). With
    bos_token_id (the window's token 0), every short context starts with it."""
    length = ids.shape[0]
    bos = ids.new_full((1,), bos_token_id) if bos_token_id is not None else ids[:0]
    step = max(1, short // 4)
    out = torch.full((length - 1,), math.nan, dtype=torch.float64)
    starts = list(range(short + 1, length, step))  # first target of each block
    full = [b for b in starts if b + step <= length]
    groups = [full[i:i + batch] for i in range(0, len(full), batch)]
    groups += [[b] for b in starts if b + step > length]  # the last, shorter block
    for group in groups:
        # Inputs (BOS,) x[b - S .. b + m - 1] (m = block length): position p + S - 1 + i
        # (p = 1 behind a BOS, else 0) predicts target b + i from the S + i tokens before it.
        m = min(step, length - group[0])
        inputs = torch.stack([torch.cat([bos, ids[b - short:b + m]]) for b in group])
        nll = token_nll(model(inputs).logits, inputs)
        first = len(bos) + short - 1
        for row, b in enumerate(group):
            out[b - 1:b - 1 + m] = nll[row, first:first + m].cpu()
    return out


def key_token_mask(nll_full: torch.Tensor, nll_short: torch.Tensor) -> torch.Tensor:
    """Key tokens (bool, same shape) from the two NLLs of every prediction."""
    gain = nll_short - nll_full
    return torch.nan_to_num(gain, nan=-math.inf).gt(KEY_GAIN) & nll_full.lt(KEY_CEILING)


class KeyTokens:
    """The key tokens of a set of windows under the dense model: mask [n, L - 1] over the
    predictions, and dense's NLL on them."""

    def __init__(self, mask: torch.Tensor, dense_nll: torch.Tensor, short: int):
        self.mask, self.dense_nll, self.short = mask, dense_nll, short
        self.count = int(mask.sum())
        self.dense_perplexity = (math.exp(float(dense_nll[mask].sum()) / self.count)
                                 if self.count else None)

    def from_prediction(self, first: int) -> "KeyTokens":
        """The key tokens among predictions first, first + 1, ... (a cell that scores only a
        window's continuation)."""
        mask = self.mask.clone()
        mask[:, :first] = False
        return KeyTokens(mask, self.dense_nll, self.short)

    def record(self, key_nll_sum: float) -> dict:
        """The cell's fields, given its summed NLL over the key tokens."""
        return {"key_token_perplexity": (math.exp(key_nll_sum / self.count)
                                         if self.count else None),
                "num_key_tokens": self.count, "key_context": self.short,
                "key_token_perplexity_dense": self.dense_perplexity,
                "key_tokens_indicative_only": self.count < MIN_KEY_TOKENS}


def find(model, input_ids: torch.Tensor, short: int, device, bos_token_id=None) -> KeyTokens:
    """The key tokens of windows input_ids [n, L] under the model's own (dense) attention;
    computed once per (model, windows, S) in a process. bos_token_id: the windows' BOS
    (Windows.bos_token_id), which every short context then starts with."""
    model_bos = getattr(model.config, "bos_token_id", None)
    starts_with_bos = model_bos is not None and bool((input_ids[:, 0] == model_bos).all())
    if bos_token_id is None and starts_with_bos:
        # Short contexts without the BOS the windows start with would score another model.
        raise ValueError(f"the windows start with the model's BOS token ({model_bos}) but no "
                         "bos_token_id was given: pass Windows.bos_token_id")
    fingerprint = (id(model), tuple(input_ids.shape), hash(input_ids.numpy().tobytes()), short,
                   bos_token_id)
    if fingerprint not in _CACHE:
        full, shorts = [], []
        with torch.inference_mode():
            for ids in input_ids:
                ids = ids.to(device)
                full.append(token_nll(model(ids[None]).logits, ids[None])[0].cpu())
                shorts.append(short_context_nll(model, ids, short,
                                                bos_token_id=bos_token_id).cpu())
        full, shorts = torch.stack(full), torch.stack(shorts)
        _CACHE.clear()  # one (dataset, L) at a time, as the runner goes
        _CACHE[fingerprint] = KeyTokens(key_token_mask(full, shorts), full, short)
    return _CACHE[fingerprint]
