"""The reference path (kernels="reference"): every operator in plain PyTorch, on any device.

cabattn.ops dispatches to this module inside `ops.use_kernels("reference")` (what
cabattn.apply(..., kernels="reference") and `python -m eval.run --kernels reference` enter):
the same methods and protocols, with

- selection (coarsen, block_scores, frc_scores, select_blocks) and the kv protocol's
  attention_with_scores and kv_compact_: the definitions in cabattn.reference, computed in
  float32 from half-precision inputs (as the kernels accumulate) and one head at a time where
  they would build an L x L matrix;
- block_sparse_attention: FlexAttention over a BlockMask made from the same layout (compiled on
  CUDA where the eager one's L x L scores would take more than EAGER_SCORES_BYTES, eager
  elsewhere), or SDPA with the layout's token mask where FlexAttention is missing.

It shares no code with the extension's kernels, so it is the independent check of a number and
the path a user can always take when the self-check fails on their device
(docs/selfcheck.md). It is slower, and never differs beyond the correctness bar
(docs/operators.md).
"""
import functools
import warnings

import torch

from . import reference

try:
    from torch.nn.attention import flex_attention as _flex
except ImportError:  # a torch without FlexAttention: SDPA with a mask instead
    _flex = None

# Eager FlexAttention builds the float32 scores [B, Hq, L, L]; past this many bytes CUDA runs it
# compiled (its fused kernel never builds them), below it skips the compilation (seconds).
EAGER_SCORES_BYTES = 4 * 2 ** 30
# Elements of one L x L float32 score matrix the per-head reference definitions may build at
# once (block_scores, attention_with_scores): 2^28 is 1 GiB.
_CHUNK_ELEMENTS = 2 ** 28


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels accumulate half-precision inputs in float32; float32/64 stay as they are."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.to(_accumulation_dtype(x.dtype))


def attention_backend(q: torch.Tensor) -> str:
    """"flex-compiled", "flex" (eager) or "sdpa": what block_sparse_attention runs for q."""
    if _flex is None:
        return "sdpa"
    batch, heads, length, _ = q.shape
    if q.device.type == "cuda" and batch * heads * length * length * 4 > EAGER_SCORES_BYTES:
        return "flex-compiled"
    return "flex"


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    return torch.compile(_flex.flex_attention)


def coarsen(x, block_size, mode):
    # max_l2's tie tolerance is the input dtype's, not the upcast one's (docs/block_statistics.md)
    return reference.coarsen(_upcast(x), block_size, mode,
                             reference.max_l2_tolerance(x.dtype)).to(x.dtype)


def _head_groups(q_heads: int, kv_heads: int, length: int, batch: int):
    """Slices of KV heads (and their query heads) small enough to build their L x L scores."""
    group = q_heads // kv_heads
    per_kv_head = batch * group * length * length
    step = max(1, _CHUNK_ELEMENTS // max(per_kv_head, 1))
    for first in range(0, kv_heads, step):
        kv = slice(first, min(first + step, kv_heads))
        yield slice(kv.start * group, kv.stop * group), kv


def block_scores(q, k, block_size, scale, softcap=0.0):
    sums, maxes = [], []
    for qh, kh in _head_groups(q.shape[1], k.shape[1], q.shape[2], q.shape[0]):
        s, g = reference.block_scores(_upcast(q[:, qh]), _upcast(k[:, kh]), block_size, scale,
                                      softcap)
        sums.append(s)
        maxes.append(g)
    return torch.cat(sums, 1), torch.cat(maxes, 1)


def frc_scores(qc, kc, scale, lam, formula, normalization):
    return reference.frc_scores(qc, kc, scale, lam, formula, normalization)


def select_blocks(score1, score2, n_recent, n_sink, n_score1, n_score2, shift, max_count):
    return reference.select_blocks(score1, score2, n_recent, n_sink, n_score1, n_score2, shift,
                                   max_count)


def attention_with_scores(q, k, v, scale, softcap=0.0, window=0):
    outs, lses, masses = [], [], []
    for qh, kh in _head_groups(q.shape[1], k.shape[1], max(q.shape[2], k.shape[2]), q.shape[0]):
        out, lse, mass = reference.attention_with_scores(
            _upcast(q[:, qh]), _upcast(k[:, kh]), _upcast(v[:, kh]), scale, softcap, window)
        outs.append(out)
        lses.append(lse)
        masses.append(mass)
    return torch.cat(outs, 1).to(q.dtype), torch.cat(lses, 1), torch.cat(masses, 1)


def kv_compact_(x, keep):
    reference.kv_compact_(x, keep)


def block_sparse_attention(q, k, v, block_count, block_index, block_size, scale, softcap=0.0):
    length = q.shape[2]
    backend = attention_backend(q)
    reference.check_softcap(softcap)
    if backend == "sdpa":
        if softcap:
            raise ValueError(f"softcap {softcap}: SDPA cannot soft-cap its logits and this torch "
                             "has no FlexAttention; valid here: softcap 0")
        return _sdpa_attention(q, k, v, block_count, block_index, block_size, scale)
    blocks = block_count.shape[-1]
    # The layout as a dense [B, Hq, M, M] keep-table that the mask_mod reads: causal inside the
    # diagonal block, kept blocks only (the eager FlexAttention applies the mask_mod alone).
    kept = torch.zeros(*block_count.shape, blocks + 1, dtype=torch.bool, device=q.device)
    slots = torch.arange(block_index.shape[-1], device=q.device)
    valid = slots < block_count[..., None]
    kept.scatter_(-1, torch.where(valid, block_index.long(), blocks), True)
    kept = kept[..., :blocks]

    def layout_mask(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & kept[b, h, q_idx // block_size, kv_idx // block_size]

    # FlexAttention wants one index slot per key block: the CSR rows padded to M.
    index = torch.nn.functional.pad(block_index.clamp(min=0),
                                    (0, blocks - block_index.shape[-1]))
    mask = _flex.BlockMask.from_kv_blocks(block_count, index, BLOCK_SIZE=block_size,
                                          mask_mod=layout_mask, seq_lengths=(length, length))
    attend = _compiled_flex() if backend == "flex-compiled" else _flex.flex_attention
    options = dict(block_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    if softcap:  # FlexAttention hands score_mod the scaled logit
        options["score_mod"] = lambda score, b, h, q_idx, kv_idx: softcap * torch.tanh(
            score / softcap)
    with warnings.catch_warnings():  # eager on purpose (short windows, CPU): no fused kernel
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        if hasattr(_flex, "AuxRequest"):
            out, aux = attend(q, k, v, return_aux=_flex.AuxRequest(lse=True), **options)
            lse = aux.lse
        else:  # torch before AuxRequest
            out, lse = attend(q, k, v, return_lse=True, **options)
    return out, lse.float()


def _sdpa_attention(q, k, v, block_count, block_index, block_size, scale):
    """SDPA with the layout's token mask, one KV head group at a time (no FlexAttention)."""
    outs, lses = [], []
    length = q.shape[2]
    for qh, kh in _head_groups(q.shape[1], k.shape[1], length, q.shape[0]):
        mask = reference.layout_to_mask(block_count[:, qh], block_index[:, qh], length,
                                        block_size)
        qg = q[:, qh]
        kg = k[:, kh].repeat_interleave(qg.shape[1] // (kh.stop - kh.start), 1)
        vg = v[:, kh].repeat_interleave(qg.shape[1] // (kh.stop - kh.start), 1)
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            qg, kg, vg, attn_mask=mask, scale=scale))
        logits = (_upcast(qg) @ _upcast(kg).transpose(-1, -2)) * scale
        lses.append(torch.logsumexp(logits.masked_fill(~mask, float("-inf")), -1).float())
    return torch.cat(outs, 1), torch.cat(lses, 1)
