"""local_strided: a local window plus evenly strided history (Sparse Transformer style)."""
import math
from dataclasses import dataclass

import torch

from ..checks import one_of, positive_int
from .base import BlockPlan, KVState, MaskContext, Method, param
from .common import ceil_ratio, keep_mask_indices
from .registry import register

PATTERNS = ("budget", "fixed")


@register
@dataclass
class LocalStrided(Method):
    """A local window plus evenly strided history (Sparse Transformer style)."""
    name = "local_strided"
    pattern: str = param("budget", "budget: half the budget recent, half evenly strided "
                         "history; fixed: local_window + every stride-th token, ignoring s "
                         "(mask protocol only)", one_of(*PATTERNS))
    local_window: int = param(256, "recent tokens of the fixed pattern", positive_int)
    stride: int = param(64, "history stride of the fixed pattern (tokens)", positive_int)

    def token_budget(self, length: int, sparsity: float, k_min: int = 64) -> int:
        if self.pattern == "fixed":  # the fixed pattern ignores s
            return length
        return super().token_budget(length, sparsity, k_min)

    def mask_plan(self, ctx: MaskContext) -> BlockPlan:
        grid = ctx.grid
        m, bs = grid.num_blocks, grid.block_size
        rule = grid.rule_budget()
        # score1[src, J] = 1 marks the strided history blocks of source row src.
        strided = torch.zeros(m, m)
        if self.pattern == "fixed":
            starts = torch.arange(m) * bs
            ends = starts + grid.block_lengths() - 1  # the last block may be partial
            holds_multiple = ends // self.stride > (starts - 1) // self.stride
            strided[:, holds_multiple] = 1.0
            # The window counts the diagonal, which strict selection adds outside the rule.
            window = max(math.ceil(self.local_window / bs) - grid.shift, 0)
            recent = torch.where(rule > 0, window, 0).int()
            # Strided blocks older than the window: strided blocks J <= src - recent.
            strided_upto = torch.cumsum(holds_multiple.int(), 0)
            src = torch.arange(m) - grid.shift
            oldest_recent = src - recent
            n_strided = torch.where((rule > 0) & (oldest_recent >= 0),
                                    strided_upto[oldest_recent.clamp(min=0)], 0).int()
        else:
            recent = ceil_ratio(rule, 0.5)
            n_strided = rule - recent
            for row in range(grid.shift, m):
                src, n = row - grid.shift, int(n_strided[row])
                if n > 0:  # evenly spaced over 0..src-recent, block 0 included
                    last = src - int(recent[row])
                    picks = torch.linspace(0, last, n).round().long() if n > 1 else torch.zeros(1).long()
                    strided[src, picks] = 1.0
        device = ctx.q.device
        zeros = torch.zeros(m, dtype=torch.int32, device=device)
        scores = strided.to(device).expand(ctx.q.shape[0], ctx.q.shape[1], m, m).contiguous()
        return BlockPlan(n_recent=recent.to(device), n_sink=zeros, n_score1=n_strided.to(device),
                         n_score2=zeros, score1=scores)

    def check_protocol(self, protocol: str) -> None:
        super().check_protocol(protocol)
        if protocol != "mask" and self.pattern == "fixed":
            raise ValueError("local_strided pattern='fixed' is a mask-protocol pattern (it "
                             f"ignores the budget); the {protocol} protocol needs "
                             "pattern='budget'")

    def kv_keep(self, state: KVState) -> torch.Tensor:
        n = state.positions.shape[-1]
        recent = math.ceil(state.budget / 2)
        index = torch.arange(n, device=state.positions.device)
        # History = positions before the recent window; keep its multiples of the smallest
        # power-of-two stride whose multiples fit the rest of the budget.
        history = int(state.positions[0, 0, n - recent])
        stride = 1
        while math.ceil(history / stride) > state.budget - recent:
            stride *= 2
        keep = (index >= n - recent) | ((state.positions % stride == 0) &
                                        (state.positions < history))
        return keep_mask_indices(keep)
