"""knorm (Devoto et al. 2024): keys of low L2 norm draw attention, so keep those
(docs/baselines.md, knorm)."""
from dataclasses import dataclass

import torch

from .base import BlockPlan, KVState, MaskContext, Method
from .common import keep_recent_and_top
from .registry import register


@register
@dataclass
class KNorm(Method):
    """Keeps the keys of lowest L2 norm (blocks of lowest mean key norm under the mask
    protocol); no attention is computed to choose them."""
    name = "knorm"

    def mask_plan(self, ctx: MaskContext) -> BlockPlan:
        grid = ctx.grid
        b, hq, m = ctx.q.shape[0], ctx.q.shape[1], grid.num_blocks
        norms = torch.linalg.vector_norm(ctx.k, dim=-1, dtype=_norm_dtype(ctx.k))  # [B, Hkv, L]
        pad = m * grid.block_size - grid.length
        sums = torch.nn.functional.pad(norms, (0, pad)).view(b, -1, m, grid.block_size).sum(-1)
        mean = sums / grid.block_lengths(ctx.k.device)  # the last block may be partial
        # score(J) = - mean key norm, the same for every row; a query head reads its KV head
        score = (-mean).repeat_interleave(hq // mean.shape[1], dim=1)
        rule = grid.rule_budget(ctx.q.device)
        # the rule's own diagonal (the source row's block, under strict the previous one)
        recent = rule.clamp(max=1)
        by_norm = rule - recent
        zeros = torch.zeros_like(rule)
        return BlockPlan(n_recent=recent, n_sink=zeros, n_score1=by_norm, n_score2=zeros,
                         score1=score[:, :, None, :].expand(b, hq, m, m).contiguous())

    def kv_keep(self, state: KVState) -> torch.Tensor:
        # RoPE rotates pairs of coordinates, so a key's norm is its norm before rotation
        norms = torch.linalg.vector_norm(state.keys, dim=-1, dtype=_norm_dtype(state.keys))
        return keep_recent_and_top(-norms, 1, state.budget - 1)


def _norm_dtype(keys: torch.Tensor) -> torch.dtype:
    """Norms in float32 at least (half keys), float64 for float64 keys (the exact reference)."""
    return torch.promote_types(keys.dtype, torch.float32)
