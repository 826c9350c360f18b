"""Plain-PyTorch references of the compiled operators.

They define what each operator computes (docs/operators.md) and are what
the tests compare the CPU and CUDA kernels against. They favour clarity over speed: some build
the L x L matrix the kernels never build. Run them in float64 for the correctness bar.

Conventions shared with the kernels:
- q [B, Hq, L, d], k and v [B, Hkv, L, d]; query head h reads KV head h // (Hq // Hkv).
- Blocks of `block_size` tokens; M = ceil(L / block_size); the last block may be partial.
- A block layout is (block_count [B, Hq, M] int32, block_index [B, Hq, M, max_count] int32):
  row I keeps key blocks block_index[..., I, :block_count[..., I]], sorted ascending, padded -1.
- softcap c (0: none) soft-caps every scaled logit s to c * tanh(s / c) before the softmax
  (Gemma 2); masked logits stay -inf. window W (0: none; attention_with_scores) lets a query
  see only itself and the W - 1 keys before it (docs/operators.md, Model features).
"""
import math

import torch

# The operators' integer modes, defined once for the kernels and for Python in csrc/modes.h.
from ._C import ADDITIVE, GLOBAL_MINMAX, MAX_L2, MEAN, MULTIPLICATIVE, ROW_MINMAX
from . import _C

# MAX_L2's relative tolerance on squared norms per input dtype, defined once in csrc/modes.h.
MAX_L2_TOLERANCE = {
    dtype: getattr(_C, "MAX_L2_TOLERANCE_" + str(dtype).removeprefix("torch.").upper())
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16)}


def num_blocks(length: int, block_size: int) -> int:
    return (length + block_size - 1) // block_size


def _expand_kv(x: torch.Tensor, q_heads: int) -> torch.Tensor:
    return x.repeat_interleave(q_heads // x.shape[1], dim=1)


def _pad_to_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    pad = num_blocks(x.shape[2], block_size) * block_size - x.shape[2]
    return torch.nn.functional.pad(x, (0, 0, 0, pad))


def max_l2_tolerance(dtype: torch.dtype) -> float:
    if dtype not in MAX_L2_TOLERANCE:
        raise ValueError(f"max_l2 pooling has no tolerance for {dtype}; valid: "
                         f"{', '.join(map(str, MAX_L2_TOLERANCE))}")
    return MAX_L2_TOLERANCE[dtype]


def block_squared_norms(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Squared L2 norms [B, H, M, block_size] in float64, -1 past the end of a partial block."""
    b, h, length, d = x.shape
    m = num_blocks(length, block_size)
    valid = (torch.arange(m * block_size, device=x.device) < length).view(m, block_size)
    norms = _pad_to_blocks(x, block_size).view(b, h, m, block_size, d).double().pow(2).sum(-1)
    return norms.masked_fill(~valid, -1.0)


def max_l2_candidates(norms: torch.Tensor, tolerance: float) -> torch.Tensor:
    """bool, like norms [..., n]: the tokens whose squared norm is within the relative
    tolerance of the largest (all False where a norm is NaN)."""
    return norms >= (1 - tolerance) * norms.amax(-1, keepdim=True)


def coarsen(x: torch.Tensor, block_size: int, mode: int = MAX_L2, tolerance: float = None):
    """Block representatives [B, H, M, d]: the mean, or (MAX_L2) the first token whose squared
    L2 norm is within a relative `tolerance` of the block's largest (default: x's dtype's,
    MAX_L2_TOLERANCE; pass the original one when x was upcast). A block with a NaN norm is
    represented by its first token."""
    b, h, length, d = x.shape
    m = num_blocks(length, block_size)
    xb = _pad_to_blocks(x, block_size).view(b, h, m, block_size, d)
    if mode == MEAN:
        valid = (torch.arange(m * block_size, device=x.device) < length).view(m, block_size)
        sizes = valid.sum(-1).to(x.dtype)
        return xb.sum(3) / sizes[:, None]
    tolerance = max_l2_tolerance(x.dtype) if tolerance is None else tolerance
    inside = max_l2_candidates(block_squared_norms(x, block_size), tolerance)
    first = inside.byte().argmax(-1)  # argmax returns the first maximal index: the first True
    return xb.gather(3, first[..., None, None].expand(b, h, m, 1, d)).squeeze(3)


def check_softcap(softcap: float) -> None:
    if not (math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"softcap must be a finite number >= 0 (0: no soft-capping), got "
                         f"{softcap}")


def check_window(window: int) -> None:
    if window < 0:
        raise ValueError(f"window must be >= 0 (0: no sliding window), got {window}")


def _logits(q, k, scale: float, softcap: float):
    """The scaled, soft-capped logits q k^T [B, Hq, Lq, Lk] (unmasked)."""
    check_softcap(softcap)
    logits = (q @ _expand_kv(k, q.shape[1]).transpose(-1, -2)) * scale
    return softcap * torch.tanh(logits / softcap) if softcap else logits


def _causal_logits(q, k, scale, softcap):
    length = q.shape[2]
    logits = _logits(q, k, scale, softcap)
    causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    return logits.masked_fill(~causal, float("-inf"))


def block_scores(q, k, block_size: int, scale: float, softcap: float = 0.0):
    """(Sblk, Gblk) [B, Hq, M, M] float32: sum and max of the dense causal softmax per block pair
    (of the soft-capped logits when softcap > 0)."""
    p = torch.softmax(_causal_logits(q, k, scale, softcap), dim=-1)
    b, h, length, _ = p.shape
    m = num_blocks(length, block_size)
    pad = m * block_size - length
    pb = torch.nn.functional.pad(p, (0, pad, 0, pad)).view(b, h, m, block_size, m, block_size)
    return pb.sum((3, 5)).float(), pb.amax((3, 5)).float()


def frc_scores(qc, kc, scale: float, lam: float, formula: int = ADDITIVE,
               normalization: int = ROW_MINMAX):
    """Block Forman-Ricci curvature F [B, Hq, M, M] float32 (docs/block_statistics.md); 0 where
    J > I."""
    m = qc.shape[2]
    causal = torch.ones(m, m, dtype=torch.bool, device=qc.device).tril()
    r = (qc.double() @ _expand_kv(kc, qc.shape[1]).double().transpose(-1, -2)) * scale
    if normalization == GLOBAL_MINMAX:
        lo = r.masked_fill(~causal, float("inf")).amin((-1, -2), keepdim=True)
        hi = r.masked_fill(~causal, float("-inf")).amax((-1, -2), keepdim=True)
    else:
        lo = r.masked_fill(~causal, float("inf")).amin(-1, keepdim=True)
        hi = r.masked_fill(~causal, float("-inf")).amax(-1, keepdim=True)
    a = ((r - lo) / (hi - lo + 1e-8)).masked_fill(~causal, 0.0)
    t = a @ a
    if formula == MULTIPLICATIVE:
        f = a / (1 + lam * t / (a + 1e-8))
    else:
        rows = torch.arange(1, m + 1, device=qc.device, dtype=torch.float64)
        f = a - lam * t / rows[:, None]
    return f.masked_fill(~causal, 0.0).float()


def select_blocks(score1, score2, n_recent, n_sink, n_score1, n_score2, shift: int,
                  max_count: int):
    """Per-row block selection, returned as a padded CSR layout.

    Row I always keeps its diagonal block I. Its rule runs on source row src = I - shift
    (shift 1 = strict causal selection, 0 = block) over candidates 0..src, in this order:
    the n_recent[I] most recent candidates (src, src-1, ...), the first n_sink[I] candidates,
    then the n_score1[I] highest score1[..., src, :] among those not yet kept, then the
    n_score2[I] highest score2[..., src, :] likewise. Ties go to the lower index; NaN ranks
    as -inf. The per-row counts are int32 [M] (every batch row and head alike), or [H, M] /
    [B, H, M], all four of one shape, for per-head budgets (head h then reads its own counts);
    score1/score2 are float [B, H, M, M] or None when unused.
    """
    ref = score1 if score1 is not None else score2
    b, h, m = ref.shape[0], ref.shape[1], n_recent.shape[-1]
    if n_recent.dim() > 1:  # per-head counts: each (batch row, head) on its own
        counts = [c.expand(b, h, m) for c in (n_recent, n_sink, n_score1, n_score2)]
        count = torch.zeros(b, h, m, dtype=torch.int32, device=n_recent.device)
        index = torch.full((b, h, m, max_count), -1, dtype=torch.int32, device=n_recent.device)
        for row in range(b):
            for head in range(h):
                one = [None if s is None else s[row:row + 1, head:head + 1]
                       for s in (score1, score2)]
                count[row, head], index[row, head] = (
                    t[0, 0] for t in select_blocks(*one, *(c[row, head] for c in counts), shift,
                                                   max_count))
        return count, index
    device = n_recent.device
    count = torch.zeros(b, h, m, dtype=torch.int32, device=device)
    index = torch.full((b, h, m, max_count), -1, dtype=torch.int32, device=device)
    cols = torch.arange(m, device=device)
    for row in range(m):
        kept = torch.zeros(b, h, m, dtype=torch.bool, device=device)
        kept[..., row] = True
        src = row - shift
        if src >= 0:
            eligible = cols <= src
            kept |= (eligible & (cols > src - int(n_recent[row])))
            kept |= (eligible & (cols < int(n_sink[row])))
            for scores, n in ((score1, int(n_score1[row])), (score2, int(n_score2[row]))):
                free = int((eligible & ~kept[0, 0]).sum())
                n = min(n, free)
                if n <= 0:
                    continue
                s = scores[..., src, :].double()
                s = torch.where(s.isnan(), float("-inf"), s)  # NaN ranks lowest, as -inf
                by_score = torch.sort(s, dim=-1, descending=True, stable=True).indices
                # Free candidates first, keeping the score order (a -inf candidate still beats
                # an ineligible or already kept block).
                free_first = torch.sort((eligible & ~kept).gather(-1, by_score).byte(), dim=-1,
                                        descending=True, stable=True).indices
                kept.scatter_(-1, by_score.gather(-1, free_first[..., :n]), True)
        c = int(kept[0, 0].sum())
        if c > max_count:
            raise ValueError(f"row {row} keeps {c} blocks, more than max_count={max_count}")
        count[..., row] = c
        index[..., row, :c] = cols.expand(b, h, m)[kept].view(b, h, c).int()
    return count, index


def layout_to_mask(block_count, block_index, length: int, block_size: int) -> torch.Tensor:
    """Token-level boolean mask [B, H, L, L] of a block layout, causal inside the diagonal."""
    b, h, m = block_count.shape
    blocks = torch.zeros(b, h, m, m + 1, dtype=torch.bool, device=block_count.device)
    slots = torch.arange(block_index.shape[-1], device=block_count.device)
    valid = slots < block_count[..., None]
    blocks.scatter_(-1, torch.where(valid, block_index.long(), m), True)
    token_block = torch.arange(length, device=block_count.device) // block_size
    mask = blocks[..., :m][:, :, token_block][:, :, :, token_block]
    causal = torch.ones(length, length, dtype=torch.bool, device=block_count.device).tril()
    return mask & causal


def block_sparse_attention(q, k, v, block_count, block_index, block_size: int, scale: float,
                           softcap: float = 0.0):
    """(out [B, Hq, L, d] in q's dtype, lse [B, Hq, L] float32) over the layout's key blocks."""
    length = q.shape[2]
    mask = layout_to_mask(block_count, block_index, length, block_size)
    logits = _logits(q, k, scale, softcap).masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    out = torch.softmax(logits, dim=-1) @ _expand_kv(v, q.shape[1])
    return out.to(q.dtype), lse.float()


def attention_with_scores(q, k, v, scale: float, softcap: float = 0.0, window: int = 0):
    """A chunk of Lq queries against Lk >= Lq keys whose last Lq are the chunk itself.

    Query t sits at key index Lk - Lq + t and sees every key up to it; with a window W > 0 only
    the keys j with Lk - Lq + t - W < j <= Lk - Lq + t (itself and the W - 1 before it). Returns
    (out [B, Hq, Lq, d], lse [B, Hq, Lq] float32, mass [B, Hkv, Lk] float32), mass being the
    attention probability each key received, summed over the chunk's queries and over the
    query heads that share its KV head (the H2O accumulator); 0 for a key no query sees.
    """
    check_window(window)
    b, hq, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    logits = _logits(q, k, scale, softcap)
    keys = torch.arange(lk, device=q.device)[None, :]
    position = (lk - lq + torch.arange(lq, device=q.device))[:, None]
    visible = keys <= position
    if window:
        visible &= keys > position - window
    logits = logits.masked_fill(~visible, float("-inf"))
    p = torch.softmax(logits, dim=-1)
    out = p @ _expand_kv(v, hq)
    mass = p.sum(2).view(b, hkv, hq // hkv, lk).sum(2)
    return out.to(q.dtype), torch.logsumexp(logits, dim=-1).float(), mass.float()


def kv_compact_(x: torch.Tensor, keep: torch.Tensor) -> None:
    """In place: x[b, h, :K] = x[b, h, keep[b, h]] for x [B, H, Lc, ...] and keep [B, H, K].

    keep is int64, sorted ascending and unique per (b, h), so keep[i] >= i.
    """
    b, h, n = keep.shape
    idx = keep.view(b, h, n, *([1] * (x.dim() - 3))).expand(b, h, n, *x.shape[3:])
    x[:, :, :n] = x.gather(2, idx)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
