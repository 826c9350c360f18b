"""adakv (Feng et al. 2024): snapkv's scores with the budget of a layer shared out among its
heads by those scores (docs/baselines.md, adakv).

mask protocol, per layer and query-block row: every head keeps snapkv's window blocks and the
diagonal; of the remaining P picks per head, each head first takes f = round(floor_ratio * P)
by its own score; the layer's other H * (P - f) picks go to the highest normalised scores
(a head's window mass divided by its total over the row's candidates) of all heads jointly
(ties: lower head, then lower block). Heads thus get different counts (per-head counts of
ops.select_blocks) and the layer's total is H times a snapkv row's.
kv protocol: refused for now (its per-head budgets need a cache whose KV heads hold different
numbers of entries; see docs/baselines.md).
"""
from dataclasses import dataclass

import torch

from ..checks import ratio
from .base import BlockPlan, MaskContext, param
from .common import round_ratio
from .registry import register
from .snapkv import SnapKV


def share_picks(score: torch.Tensor, free: torch.Tensor, floor: torch.Tensor,
                picks: torch.Tensor) -> torch.Tensor:
    """Per-head pick counts int64 [B, H, M]: score [B, H, M, M] (row = source row), free bool
    [M, M] (the candidates open to score picks), floor and picks int [M] per row: each head
    gets its own `floor` best free candidates, then H * (picks - floor) more go to the best
    remaining (head, candidate) pairs of all heads jointly."""
    b, h, m, _ = score.shape
    ranked = score.masked_fill(~free, float("-inf")).sort(dim=-1, descending=True,
                                                          stable=True).values
    beyond_floor = torch.arange(m, device=score.device) >= floor[:, None]  # [M rows, M ranks]
    pool = ranked.masked_fill(~beyond_floor, float("-inf"))
    joint = pool.permute(0, 2, 1, 3).reshape(b, m, h * m)  # head-major: ties to the lower head
    order = joint.sort(dim=-1, descending=True, stable=True).indices
    chosen = torch.arange(h * m, device=score.device) < (h * (picks - floor))[:, None]
    extra = torch.zeros(b, m, h, dtype=torch.long, device=score.device)
    extra.scatter_add_(-1, order // m, chosen.long().expand(b, m, h * m))
    return floor.long() + extra.permute(0, 2, 1)


@register
@dataclass
class AdaKV(SnapKV):
    """snapkv with each row's budget shared among the heads by their normalised scores."""
    name = "adakv"
    floor_ratio: float = param(0.2, "share of each head's score picks it keeps whatever the "
                               "other heads' scores; the rest is shared among the heads", ratio)

    def check_protocol(self, protocol: str) -> None:
        if protocol == "kv":
            raise ValueError("adakv is defined for the mask protocol only in this version: its "
                             "kv rule gives KV heads different numbers of cache entries, which "
                             "the kv protocol's cache does not hold yet (docs/baselines.md); "
                             "use protocol 'mask'")

    def kv_keep(self, state):
        raise NotImplementedError("adakv has no kv rule in this version (check_protocol)")

    def mask_plan(self, ctx: MaskContext) -> BlockPlan:
        plan = super().mask_plan(ctx)
        grid = ctx.grid
        rows = torch.arange(grid.num_blocks, device=plan.score1.device)
        # each source row's window mass over its candidates 0..src, normalised to sum 1
        causal = rows[None, :] <= rows[:, None]
        total = (plan.score1 * causal).sum(-1, keepdim=True)
        normalised = plan.score1 / total.clamp(min=torch.finfo(total.dtype).tiny)
        # free for score picks: a candidate outside the source blocks snapkv keeps
        free = rows[None, :] <= (rows - grid.shift - plan.n_recent)[:, None]
        source = (rows - grid.shift).clamp(min=0)
        floor = round_ratio(plan.n_score1, self.floor_ratio)
        counts = share_picks(normalised[..., source, :], free, floor, plan.n_score1)
        return BlockPlan(n_recent=plan.n_recent, n_sink=plan.n_sink, n_score1=counts.int(),
                         n_score2=plan.n_score2, score1=normalised)
