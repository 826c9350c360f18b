"""quest (Tang et al. 2024): query-aware selection of key pages by an upper bound of q.k
(docs/baselines.md, quest).

Per KV head and page (a block of block_size keys), m and M are the elementwise minimum and
maximum of its keys; for a query q, U(q, page) = sum_d max(q_d m_d, q_d M_d) bounds q.k from
above over the page. Since M >= m, max(q_d m_d, q_d M_d) is q_d M_d where q_d >= 0 and q_d m_d
where q_d < 0, so U = max(q, 0) . M + min(q, 0) . m: two small matrix products per head (L x M
x d each, 2 / B of a causal QK^T pass), which is why no kernel of its own is needed.
"""
from dataclasses import dataclass

import torch

from .base import BlockPlan, KVPages, MaskContext, Method
from .registry import register


def page_upper_bound(queries: torch.Tensor, page_min: torch.Tensor,
                     page_max: torch.Tensor) -> torch.Tensor:
    """U float32 [B, Hq, n, P] of queries [B, Hq, n, d] against pages bounded by
    page_min/page_max [B, Hkv, P, d] (query head h reads KV head h // (Hq / Hkv))."""
    group = queries.shape[1] // page_min.shape[1]
    q = queries.float()
    lower = page_min.float().repeat_interleave(group, dim=1)
    upper = page_max.float().repeat_interleave(group, dim=1)
    return q.clamp(min=0) @ upper.transpose(-1, -2) + q.clamp(max=0) @ lower.transpose(-1, -2)


@register
@dataclass
class Quest(Method):
    """Each row (mask) or chunk (kv) attends to the pages of highest U, the maximum over its
    queries of a bound of q.k from the pages' elementwise key minima and maxima. Under the kv
    protocol it selects rather than evicts: the cache keeps every token."""
    name = "quest"
    kv_mode = "select"

    def mask_plan(self, ctx: MaskContext) -> BlockPlan:
        grid = ctx.grid
        b, hq, length, d = ctx.q.shape
        m, bs = grid.num_blocks, grid.block_size
        pad = m * bs - length
        keys = ctx.k.float()
        # the last block may be partial: padding takes no part in its minimum or maximum
        page_min = torch.nn.functional.pad(keys, (0, 0, 0, pad), value=float("inf"))
        page_max = torch.nn.functional.pad(keys, (0, 0, 0, pad), value=float("-inf"))
        page_min = page_min.view(b, -1, m, bs, d).amin(3)
        page_max = page_max.view(b, -1, m, bs, d).amax(3)
        hkv = ctx.k.shape[1]
        group = hq // hkv
        scores = []
        for g in range(hkv):  # one KV head's group at a time: U is [B, group, L, M]
            bound = page_upper_bound(ctx.q[:, g * group:(g + 1) * group],
                                     page_min[:, g:g + 1], page_max[:, g:g + 1])
            # score[I, J] = max over the queries of block I of U(q, J)
            bound = torch.nn.functional.pad(bound, (0, 0, 0, pad), value=float("-inf"))
            scores.append(bound.view(b, group, m, bs, m).amax(3))
        score = torch.cat(scores, dim=1)
        rule = grid.rule_budget(ctx.q.device)
        # the rule's own diagonal (the source row's block, under strict the previous one)
        recent = rule.clamp(max=1)
        by_bound = rule - recent
        zeros = torch.zeros_like(rule)
        return BlockPlan(n_recent=recent, n_sink=zeros, n_score1=by_bound, n_score2=zeros,
                         score1=score)

    def kv_select(self, pages: KVPages) -> torch.Tensor:
        # U of every query of the chunk, maximised over the chunk, per query head
        score = page_upper_bound(pages.queries, pages.page_min, pages.page_max).amax(2)
        return score.topk(pages.n_pick, dim=-1).indices
