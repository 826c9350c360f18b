"""cab_v4 and cab_v3: curvature-aware block selection (docs/methods.md).

cab_v4 takes a share (magnitude_ratio) of each row's picks by the oracle block maximum Gblk
and the rest by block Forman-Ricci curvature; cab_v3 uses curvature alone (no oracle pass).
"""
import math
from dataclasses import dataclass

import torch

from .. import ops
from ..checks import non_negative, non_negative_int, one_of, positive, ratio
from .base import BlockPlan, KVState, MaskContext, Method, param
from .common import round_ratio
from .registry import register

FORMULAS = {"additive": ops.ADDITIVE, "multiplicative": ops.MULTIPLICATIVE}
NORMALIZATIONS = {"row_minmax": ops.ROW_MINMAX, "global_minmax": ops.GLOBAL_MINMAX}
POOLINGS = {"max_l2": ops.MAX_L2, "mean": ops.MEAN}
SELECTIONS = ("high", "low")


@dataclass
class CurvatureMethod(Method):
    """The curvature rule cab_v3 and cab_v4 share; magnitude_share() is the part of each row's
    picks taken by the oracle magnitude Gblk instead (none for cab_v3)."""
    lambda_redundancy: float = param(0.3, "weight of the redundancy term of the curvature",
                                     non_negative)
    temperature: float = param(1.0, "multiplies the attention scale inside the curvature",
                               positive)
    frc_formula: str = param("additive", "how curvature combines affinity and redundancy",
                             one_of(*FORMULAS))
    frc_select: str = param("high", "keep the blocks of highest (or lowest) curvature",
                            one_of(*SELECTIONS))
    normalization: str = param("row_minmax", "scaling of the affinities before the curvature",
                               one_of(*NORMALIZATIONS))
    pooling: str = param("max_l2", "a block's coarse query/key: the largest-L2 token or the "
                         "mean (both protocols)", one_of(*POOLINGS))
    keep_sink_blocks: int = param(0, "leading key blocks every row always keeps (attention "
                                  "sinks), counted inside the budget; 0 = none", non_negative_int)

    def magnitude_share(self) -> float:
        return 0.0

    @property
    def block_query_pooling(self) -> str:
        return self.pooling

    def curvature(self, coarse_q: torch.Tensor, coarse_k: torch.Tensor, scale: float):
        """FRC [B, Hq, M, M] oriented so that higher is better for the chosen frc_select."""
        frc = ops.frc_scores(coarse_q, coarse_k, scale * self.temperature,
                             self.lambda_redundancy, FORMULAS[self.frc_formula],
                             NORMALIZATIONS[self.normalization])
        return frc if self.frc_select == "high" else -frc

    def mask_plan(self, ctx: MaskContext) -> BlockPlan:
        bs, mode = ctx.grid.block_size, POOLINGS[self.pooling]
        frc = self.curvature(ops.coarsen(ctx.q, bs, mode), ops.coarsen(ctx.k, bs, mode),
                             ctx.scale)
        rule = ctx.grid.rule_budget(ctx.q.device)
        picks = (rule - 1).clamp(min=0)
        # A row whose budget covers its sinks keeps them apart from the diagonal (block 0 is
        # the diagonal only for a row that keeps everything anyway).
        sinks = picks.clamp(max=self.keep_sink_blocks)
        by_magnitude = round_ratio(picks - sinks, self.magnitude_share())
        magnitude = ctx.block_scores[1] if bool(by_magnitude.any()) else None
        return BlockPlan(n_recent=rule.clamp(max=1), n_sink=sinks, n_score1=by_magnitude,
                         n_score2=picks - sinks - by_magnitude, score1=magnitude, score2=frc)

    def kv_keep(self, state: KVState) -> torch.Tensor:
        """Whole blocks of block_size tokens (by absolute position); the newest, possibly
        partial, block always stays. The mask rule runs for the newest query block over the
        cached key blocks: magnitude = received mass of a block, curvature from the blocks'
        coarse queries and keys; a KV head scores a block by the mean over its query heads.
        The first keep_sink_blocks absolute blocks are kept before any score picks."""
        b, h, n = state.positions.shape
        bs = state.block_size
        newest_block = state.positions[..., -1:] // bs
        in_newest = int((state.positions[0, 0] // bs == newest_block[0, 0]).sum())
        if in_newest > state.budget:
            raise ValueError(f"{self.name} keeps whole blocks of block_size={bs} tokens, but "
                             f"the budget K={state.budget} cannot hold the newest block "
                             f"({in_newest} tokens); use a block_size <= K or a lower sparsity")
        if (n - in_newest) % bs:
            raise RuntimeError(f"{self.name}: the cache of layer {state.layer_idx} holds "
                               f"{n - in_newest} entries before its newest block, not whole "
                               f"blocks of {bs}; it must only ever be evicted by whole blocks")
        whole = (n - in_newest) // bs  # cached whole blocks, contiguous in the cache
        room = (state.budget - in_newest) // bs
        if whole <= room:
            return torch.arange(n, device=state.positions.device).expand(b, h, n).contiguous()
        mode = POOLINGS[self.pooling]
        keys_whole = state.keys[:, :, :whole * bs].contiguous()
        coarse_k = torch.cat([ops.coarsen(keys_whole, bs, mode),
                              ops.coarsen(state.keys[:, :, whole * bs:].contiguous(), bs, mode)],
                             dim=2)
        group = state.block_queries.shape[1] // h
        block_ids = state.positions[:, :, :whole * bs:bs] // bs  # [B, Hkv, whole]
        ids_per_q_head = block_ids.repeat_interleave(group, dim=1)
        d = state.block_queries.shape[-1]
        coarse_q = torch.cat([
            state.block_queries.gather(2, ids_per_q_head[..., None].expand(-1, -1, -1, d)),
            state.block_queries.gather(2, (newest_block.repeat_interleave(group, dim=1)
                                           )[..., None].expand(-1, -1, -1, d))], dim=2)
        frc = self.curvature(coarse_q.contiguous(), coarse_k.contiguous(), state.scale)
        frc_newest = frc[:, :, -1, :whole].view(b, h, group, whole).mean(2)
        received = state.mass[:, :, :whole * bs].view(b, h, whole, bs).sum(-1)
        # Sinks are the oldest blocks, kept from the first eviction on, so every head holds
        # the same number of them.
        kept = block_ids < min(self.keep_sink_blocks, room)
        sinks = int(kept[0, 0].sum())
        by_magnitude = int(math.floor((room - sinks) * self.magnitude_share() + 0.5))
        if by_magnitude:
            top = received.masked_fill(kept, float("-inf")).topk(by_magnitude, dim=-1).indices
            kept.scatter_(-1, top, True)
        rest = frc_newest.float().masked_fill(kept, float("-inf"))
        if room - sinks - by_magnitude:
            kept.scatter_(-1, rest.topk(room - sinks - by_magnitude, dim=-1).indices, True)
        token_kept = torch.cat([kept.repeat_interleave(bs, dim=-1),
                                torch.ones(b, h, n - whole * bs, dtype=torch.bool,
                                           device=kept.device)], dim=-1)
        return token_kept.nonzero()[:, 2].view(b, h, -1)


@register
@dataclass
class CabV4(CurvatureMethod):
    """A share of each row's picks by the oracle block maximum, the rest by curvature."""
    name = "cab_v4"
    oracle = True
    magnitude_ratio: float = param(0.5, "share of each row's picks by the oracle block "
                                   "maximum Gblk; the rest by curvature", ratio)

    def magnitude_share(self) -> float:
        return self.magnitude_ratio


@register
@dataclass
class CabV3(CurvatureMethod):
    """Block Forman-Ricci curvature alone (no oracle pass)."""
    name = "cab_v3"
