"""random: the diagonal plus uniformly drawn blocks (mask) or tokens (kv); seeded."""
from dataclasses import dataclass

import torch

from .registry import register
from .base import BlockPlan, KVState, MaskContext, Method


@register
@dataclass
class Random(Method):
    """The diagonal plus uniformly drawn blocks (mask) or tokens (kv); seeded."""
    name = "random"

    def mask_plan(self, ctx: MaskContext) -> BlockPlan:
        rule = ctx.grid.rule_budget(ctx.q.device)
        b, h, m = ctx.q.shape[0], ctx.q.shape[1], ctx.grid.num_blocks
        # Seeded by (seed, window, layer); every head and row draws its own numbers.
        draws = torch.stack([torch.rand(h, m, m, generator=ctx.generator(row))
                             for row in range(b)]).to(ctx.q.device)
        # k_b - 1 draws from the blocks before the diagonal: under strict selection the rule
        # (budget k_b - 1) draws them all; under block selection its own diagonal is one pick.
        recent = rule.clamp(max=1) if ctx.grid.shift == 0 else torch.zeros_like(rule)
        zeros = torch.zeros_like(rule)
        return BlockPlan(n_recent=recent, n_sink=zeros, n_score1=rule - recent, n_score2=zeros,
                         score1=draws)

    def kv_keep(self, state: KVState) -> torch.Tensor:
        b, h, n = state.positions.shape
        device = state.positions.device
        draws = torch.stack([torch.rand(h, n - 1, generator=state.generator(row))
                             for row in range(b)]).to(device)
        older = draws.topk(min(state.budget, n) - 1, dim=-1).indices
        newest = torch.full((b, h, 1), n - 1, device=device, dtype=older.dtype)
        return torch.cat([older, newest], dim=-1).sort(dim=-1).values
