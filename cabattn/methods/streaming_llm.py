"""streaming_llm: attention sinks (the first tokens) plus a recent window."""
import math
from dataclasses import dataclass

import torch

from ..checks import non_negative_int
from .base import BlockPlan, KVState, MaskContext, Method, param
from .common import keep_mask_indices
from .registry import register


@register
@dataclass
class StreamingLLM(Method):
    """Attention sinks (the first tokens) plus a recent window."""
    name = "streaming_llm"
    n_sink: int = param(4, "attention-sink tokens always kept (the blocks holding them under "
                        "the mask protocol)", non_negative_int)

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
