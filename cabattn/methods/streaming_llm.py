"""streaming_llm: attention sinks (the first tokens) plus a recent window."""
import math

import torch

from . import register
from .base import BlockPlan, KVState, MaskContext, Method
from .common import keep_mask_indices


@register
class StreamingLLM(Method):
    name = "streaming_llm"
    params = {"n_sink": 4}

    def validate(self) -> None:
        if isinstance(self.n_sink, bool) or not isinstance(self.n_sink, int) or self.n_sink < 0:
            raise ValueError(f"streaming_llm: n_sink={self.n_sink!r} must be an integer >= 0")

    def mask_plan(self, ctx: MaskContext) -> BlockPlan:
        rule = ctx.grid.rule_budget(ctx.q.device)
        sink_blocks = math.ceil(self.n_sink / ctx.grid.block_size)
        recent = torch.where(rule > 0, (rule - sink_blocks).clamp(min=1), 0)
        zeros = torch.zeros_like(rule)
        return BlockPlan(n_recent=recent, n_sink=rule - recent, n_score1=zeros, n_score2=zeros)

    def kv_keep(self, state: KVState) -> torch.Tensor:
        n = state.positions.shape[-1]
        n_sink = min(self.n_sink, state.budget)
        index = torch.arange(n, device=state.positions.device)
        keep = (state.positions < n_sink) | (index >= n - (state.budget - n_sink))
        return keep_mask_indices(keep)
