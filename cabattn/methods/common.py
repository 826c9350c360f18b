"""Small pieces several method rules share."""
import torch


def ceil_ratio(counts: torch.Tensor, ratio: float) -> torch.Tensor:
    """ceil(ratio * counts) for int counts, exact for ratios like 0.5 (no float drift up)."""
    return torch.ceil(counts.double() * ratio - 1e-9).to(counts.dtype)


def round_ratio(counts: torch.Tensor, ratio: float) -> torch.Tensor:
    """round(ratio * counts), halves up (Python's round() would go to even)."""
    return torch.floor(counts.double() * ratio + 0.5).to(counts.dtype)


def keep_recent_and_top(score: torch.Tensor, recent: int, n_top: int) -> torch.Tensor:
    """Sorted int64 keep indices [B, H, recent + n_top] of a cache ordered oldest to newest:
    its last `recent` entries plus the `n_top` highest-scoring older ones (ties: the older;
    a stable sort, so pooled scores, which tie by construction, pick deterministically)."""
    b, h, n = score.shape
    recent = min(recent, n)
    n_top = min(n_top, n - recent)
    newest = torch.arange(n - recent, n, device=score.device).expand(b, h, recent)
    top = score[..., :n - recent].sort(dim=-1, descending=True, stable=True).indices[..., :n_top]
    return torch.cat([top, newest], dim=-1).sort(dim=-1).values


def keep_mask_indices(mask: torch.Tensor) -> torch.Tensor:
    """Sorted int64 indices [B, H, K] of the True entries of mask [B, H, n]; every (b, h) row
    must hold the same number of them (position-based rules keep the same count per head)."""
    b, h, _ = mask.shape
    return mask.nonzero()[:, 2].view(b, h, -1)


def diagonal_and_top(rule: torch.Tensor, shift: int):
    """(n_recent, n_score) int32 [M] of a "diagonal + top-scored" mask rule with rule budgets
    `rule` (BlockGrid.rule_budget): the output row's diagonal block, then the best-scored of the
    earlier blocks, k_b - 1 of them. Under strict selection (shift 1) the protocol adds the
    diagonal outside the rule, so every pick is by score; under block selection (shift 0) the
    rule's own diagonal is its one recent pick."""
    recent = rule.clamp(max=1) if shift == 0 else torch.zeros_like(rule)
    return recent, rule - recent
