"""oracle_topk: the upper bound of block selection at a budget, not a method
(docs/baselines.md, oracle_topk)."""
from dataclasses import dataclass

import torch

from .base import BlockPlan, MaskContext, Method
from .common import diagonal_and_top
from .registry import register


@register
@dataclass
class OracleTopK(Method):
    """The diagonal plus the k_b - 1 key blocks of largest dense softmax mass Sblk[I, J] of
    the row's own queries, at row I even under strict selection: it reads the queries it
    serves (and their future), so it bounds what any selection rule can keep at the budget."""
    name = "oracle_topk"
    oracle = True
    reads_own_row = True

    def check_protocol(self, protocol: str) -> None:
        super().check_protocol(protocol)
        if protocol != "mask":
            raise ValueError(f"oracle_topk has no {protocol}-protocol rule: it ranks keys by "
                             "the attention of the queries they will serve, which a cache "
                             "has not seen when it evicts (it is a mask-protocol upper "
                             "bound); use protocol='mask'")

    def mask_plan(self, ctx: MaskContext) -> BlockPlan:
        rule = ctx.grid.rule_budget(ctx.q.device)
        recent, by_mass = diagonal_and_top(rule, ctx.grid.shift)
        zeros = torch.zeros_like(rule)
        return BlockPlan(n_recent=recent, n_sink=zeros, n_score1=by_mass, n_score2=zeros,
                         score1=ctx.block_scores[0])
