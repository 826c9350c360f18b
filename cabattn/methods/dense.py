"""dense: the model's full causal attention; ignores the sparsity."""
from dataclasses import dataclass

import torch

from .registry import register
from .base import BlockPlan, KVState, MaskContext, Method


@register
@dataclass
class Dense(Method):
    """The model's full causal attention; ignores the sparsity."""
    name = "dense"

    def token_budget(self, length: int, sparsity: float, k_min: int = 64) -> int:
        return length

    def mask_plan(self, ctx: MaskContext) -> BlockPlan:
        rule = ctx.grid.rule_budget(ctx.q.device)
        zeros = torch.zeros_like(rule)
        return BlockPlan(n_recent=rule, n_sink=zeros, n_score1=zeros, n_score2=zeros)

    def kv_keep(self, state: KVState) -> torch.Tensor:
        b, h, n = state.positions.shape
        return torch.arange(n, device=state.positions.device).expand(b, h, n).contiguous()
