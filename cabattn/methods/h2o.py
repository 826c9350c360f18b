"""h2o (Heavy-Hitter Oracle): a recent window plus the keys that received most attention."""
import math
from dataclasses import dataclass

import torch

from ..checks import ratio
from .base import BlockPlan, KVState, MaskContext, Method, param
from .common import ceil_ratio, keep_recent_and_top
from .registry import register


@register
@dataclass
class H2O(Method):
    """Heavy-Hitter Oracle: a recent window plus the keys that received the most attention."""
    name = "h2o"
    oracle = True
    h2o_recent_ratio: float = param(
        0.5, "share of each row's budget kept as the most recent blocks (tokens under kv); "
        "the rest goes to the keys that received the most attention", ratio)

    def mask_plan(self, ctx: MaskContext) -> BlockPlan:
        # c_I(J): attention mass key block J has received from query blocks 0..I.
        received = ctx.block_scores[0].cumsum(dim=-2)
        rule = ctx.grid.rule_budget(ctx.q.device)
        recent = torch.where(rule > 0, ceil_ratio(rule, self.h2o_recent_ratio).clamp(min=1), 0)
        zeros = torch.zeros_like(rule)
        return BlockPlan(n_recent=recent, n_sink=zeros, n_score1=rule - recent, n_score2=zeros,
                         score1=received)

    def kv_keep(self, state: KVState) -> torch.Tensor:
        recent = math.ceil(self.h2o_recent_ratio * state.budget)
        return keep_recent_and_top(state.mass, recent, state.budget - recent)
