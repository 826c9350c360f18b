"""tova (Oren et al. 2024, Token Omission Via Attention): keep the keys the newest query
attends to most, its attention averaged over the layer's query heads (docs/baselines.md, tova)."""
from dataclasses import dataclass

import torch

from ..checks import boolean
from .base import BlockPlan, KVState, MaskContext, Method, param
from .registry import register


def head_mean(p: torch.Tensor, kv_heads: int, per_head: bool) -> torch.Tensor:
    """p [B, Hq, ...] averaged over all query heads ([B, 1, ...]) or, per_head, over each KV
    head's group ([B, Hkv, ...])."""
    b, hq = p.shape[:2]
    groups = kv_heads if per_head else 1
    return p.view(b, groups, hq // groups, *p.shape[2:]).mean(2)


@register
@dataclass
class TOVA(Method):
    """Keeps what the newest (source) query attends to most, averaged over the layer's query
    heads: one choice for the whole layer unless per_head."""
    name = "tova"
    per_head: bool = param(False, "average the attention over each KV head's own query heads "
                           "(one choice per KV head) instead of over all the layer's heads",
                           boolean)

    def mask_plan(self, ctx: MaskContext) -> BlockPlan:
        grid = ctx.grid
        b, hq, length, _ = ctx.q.shape
        hkv, m, bs = ctx.k.shape[1], grid.num_blocks, grid.block_size
        # t: the last token of each block, the source row's last query
        last = (torch.arange(1, m + 1, device=ctx.q.device) * bs).clamp(max=length) - 1
        future = torch.arange(length, device=ctx.q.device) > last[:, None]
        group, pad = hq // hkv, m * bs - length
        masses = []
        for g in range(hkv):  # one KV head's group at a time: P is [B, group, M, L]
            logits = ctx.q[:, g * group:(g + 1) * group, last].float() @ \
                ctx.k[:, g:g + 1].float().transpose(-1, -2)
            p = torch.softmax(ctx.logits(logits).masked_fill(future, float("-inf")), dim=-1)
            # each head's mass per key block (summing over J commutes with the head mean)
            masses.append(torch.nn.functional.pad(p, (0, pad)).view(b, group, m, m, bs).sum(-1))
        mass = head_mean(torch.cat(masses, dim=1), hkv, self.per_head)  # [B, 1 or Hkv, M, M]
        score = mass.repeat_interleave(hq // mass.shape[1], dim=1)
        rule = grid.rule_budget(ctx.q.device)
        # the rule's own diagonal (the source row's block, under strict the previous one)
        recent = rule.clamp(max=1)
        by_mass = rule - recent
        zeros = torch.zeros_like(rule)
        return BlockPlan(n_recent=recent, n_sink=zeros, n_score1=by_mass, n_score2=zeros,
                         score1=score.contiguous())

    @property
    def recent_query_window(self) -> int:
        return 1  # the newest query

    def kv_keep(self, state: KVState) -> torch.Tensor:
        """The K entries of highest attention from the newest query (it sees the whole
        cache), nothing forced in: as the TOVA paper, the newest entry competes too."""
        b, hkv, n, d = state.keys.shape
        newest = state.recent_queries[:, :, -1]  # [B, Hq, d]
        hq = newest.shape[1]
        logits = newest.float().view(b, hkv, hq // hkv, d) @ state.keys.float().transpose(-1, -2)
        p = torch.softmax(state.logits(logits), dim=-1).view(b, hq, n)
        score = head_mean(p, hkv, self.per_head)  # [B, 1 or Hkv, n]
        keep = score.topk(min(state.budget, n), dim=-1).indices.sort(dim=-1).values
        return keep.expand(b, hkv, -1).contiguous()
