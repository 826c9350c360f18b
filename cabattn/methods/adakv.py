"""adakv (Feng et al. 2024): snapkv's scores with the budget of a layer shared out among its
heads by those scores (docs/baselines.md, adakv).

mask protocol, per layer and query-block row: every head keeps snapkv's window blocks and the
diagonal; of the remaining P picks per head, each head first takes f = round(floor_ratio * P)
by its own score; the layer's other H * (P - f) picks go to the highest normalised scores
(a head's window mass divided by its total over the row's candidates) of all heads jointly
(ties: lower head, then lower block). Heads thus get different counts (per-head counts of
ops.select_blocks) and the layer's total is H times a snapkv row's.
kv protocol, per layer at each eviction: every KV head keeps its window_size newest entries
(snapkv's window); of the remaining P = K - window_size picks per head, each KV head first
takes f = round(floor_ratio * P) of its older entries by its own snapkv score (pooled window
mass); the layer's other Hkv * (P - f) picks go to the highest normalised scores (a head's
score divided by its window mass over all its live entries) of all KV heads jointly (ties:
lower head, then older entry). The KV heads then hold different numbers of entries (a
RaggedKeep; the protocol's ragged cache, docs/baselines.md), Hkv * K in all. When K <=
window_size every head keeps its K newest, as snapkv.
"""
from dataclasses import dataclass

import torch

from ..checks import ratio
from .base import BlockPlan, KVState, MaskContext, RaggedKeep, param
from .common import round_ratio
from .registry import register
from .snapkv import SnapKV, pool_scores, window_attention


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

    def kv_keep(self, state: KVState):
        recent = min(self.window_size, state.budget)
        if recent == state.budget and state.lengths is None:  # K <= w: snapkv's K newest
            return super().kv_keep(state)
        b, h, n = state.positions.shape
        lengths = state.head_lengths()
        slots = torch.arange(n, device=lengths.device)
        # each head's entries older than its window are its candidates
        candidates = slots < (lengths - self.window_size)[..., None]
        mass = window_attention(state)
        fill = 0.0 if self.pooling == "avg" else float("-inf")  # as the pooling's own padding
        score = pool_scores(mass.masked_fill(~candidates, fill), self.pooling, self.kernel_size)
        normalised = score / mass.sum(-1, keepdim=True)
        ranked, order = normalised.masked_fill(~candidates, float("-inf")).sort(
            dim=-1, descending=True, stable=True)  # ties: the older entry
        picks = state.budget - recent
        floor = int(round_ratio(torch.tensor(picks), self.floor_ratio))
        # each head's f best candidates (by rank; its own order is the normalised one's)
        in_floor = (slots < floor) & torch.isfinite(ranked)  # [B, Hkv, rank]
        # the rest of every head's candidates, ranked jointly for the Hkv * (P - f) shared
        # picks; flattened head-major, a stable sort gives ties to the lower head
        pool = ranked.masked_fill(slots < floor, float("-inf")).reshape(b, h * n)
        joint, joint_order = pool.sort(dim=-1, descending=True, stable=True)
        shared = (torch.arange(h * n, device=slots.device) < h * (picks - floor)) \
            & torch.isfinite(joint)
        chosen = torch.zeros_like(shared).scatter(-1, joint_order, shared) \
            | in_floor.reshape(b, h * n)
        # from ranks back to entries, plus each head's window
        keep = torch.zeros_like(candidates).scatter(-1, order, chosen.view(b, h, n))
        keep |= (slots >= (lengths - recent)[..., None]) & (slots < lengths[..., None])
        index = torch.where(keep, slots, n).sort(dim=-1).values  # kept first, ascending
        return RaggedKeep(index, keep.sum(-1))

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
