"""Block selection and block-sparse attention for any registered method (the mask protocol's
core, usable on plain tensors).

    out = cabattn.sparse_attention(q, k, v, "cab_v3", sparsity=0.9)
    layout = cabattn.select_blocks(q, k, "h2o", sparsity=0.9); layout.density

The method only says how to pick (a BlockPlan); this module turns any plan into a layout with
ops.select_blocks, so no method has a branch here.
"""
from dataclasses import dataclass
from typing import Union

import torch

from . import ops
from .reference import default_scale
from .grid import BlockGrid, check_options, realised_density, resolve_block_size
from .methods import BlockPlan, MaskContext, Method, get_method


@dataclass
class Layout:
    """A padded CSR block layout (see cabattn.reference) and the grid it was made on."""
    block_count: torch.Tensor  # int32 [B, Hq, M]
    block_index: torch.Tensor  # int32 [B, Hq, M, max_count]
    grid: BlockGrid

    @property
    def density(self) -> float:
        return realised_density(self.block_count, self.block_index, self.grid)

    def keeps_first_block(self) -> torch.Tensor:
        """bool [B, Hq, M]: which query-block rows keep key block 0 (indices ascend)."""
        return (self.block_count > 0) & (self.block_index[..., 0] == 0)

    def kept_mass(self, block_mass: torch.Tensor) -> torch.Tensor:
        """The dense causal softmax mass inside the layout, summed over each (batch row,
        head)'s query rows, float64 [B, Hq]; block_mass is block_scores' Sblk [B, Hq, M, M]
        (a query row's mass sums to 1, so the mass of a whole window is L)."""
        slots = torch.arange(self.block_index.shape[-1], device=self.block_index.device)
        valid = slots < self.block_count[..., None].long()
        mass = block_mass.double().gather(-1, self.block_index.long().clamp(min=0))
        return (mass * valid).sum((-1, -2))


def resolve_method(method: Union[str, Method], **params) -> Method:
    if isinstance(method, Method):
        if params:
            raise ValueError(f"parameters {sorted(params)} were given with an already built "
                             f"method {method!r}; pass them to its constructor instead")
        return method
    return get_method(method, **params)


def make_grid(method: Method, length: int, sparsity: float, block_size="auto",
              k_min: int = 64, causal_selection: str = "strict", layer_idx: int = 0,
              num_layers: int = 1, budget_length: int = None) -> BlockGrid:
    """The grid of layer `layer_idx` of `num_layers` over `length` tokens: its budget is the
    method's layer budget (Method.layer_budget; the run's budget unless the method sets
    budgets per layer). Budget and block size are those of a window of `budget_length` tokens
    (default `length`): a prompt generated from is sized as the window it will become."""
    budget_length = length if budget_length is None else budget_length
    budget = method.layer_budget(method.token_budget(budget_length, sparsity, k_min), layer_idx,
                                 num_layers, budget_length)
    return BlockGrid(length, resolve_block_size(block_size, budget_length), budget,
                     causal_selection)


def layout_from_plan(plan: BlockPlan, grid: BlockGrid, batch: int, heads: int,
                     device, own_row: bool = False) -> Layout:
    """own_row (Method.reads_own_row): the plan's scores are read at the output row I, not at
    the source row I - shift, while the candidates stay those of the source row."""
    score1, score2 = plan.score1, plan.score2
    if own_row and grid.shift:
        score1, score2 = (_own_rows(score, grid.shift) for score in (score1, score2))
    if score1 is None and score2 is None:  # position-only rules: the op still needs [B, H]
        score1 = torch.zeros(batch, heads, grid.num_blocks, grid.num_blocks, device=device)
    # Counts per head ([H, M] or [B, H, M]: per-head budgets) in any of them: all four share
    # that shape (ops.select_blocks takes one shape).
    counts = [c.int().contiguous() for c in torch.broadcast_tensors(
        plan.n_recent, plan.n_sink, plan.n_score1, plan.n_score2)]
    picks = 1 + sum(counts)
    rows = torch.arange(1, grid.num_blocks + 1, device=picks.device)
    max_count = int(torch.minimum(picks, rows).max())
    count, index = ops.select_blocks(score1, score2, *counts, grid.shift, max_count)
    return Layout(count, index, grid)


def _own_rows(score, shift: int):
    """score [B, H, M, M] moved up `shift` rows, so that ops.select_blocks, which reads row
    I - shift, reads row I (the last `shift` rows are never a source row)."""
    if score is None:
        return None
    return torch.cat([score[..., shift:, :], score[..., -shift:, :]], dim=-2)


def plan_layout(method: Method, ctx: MaskContext) -> Layout:
    """The layout `method` picks for one layer's q and k (ctx keeps the oracle statistics
    the rule computed, for diagnostics that read them after)."""
    return layout_from_plan(method.mask_plan(ctx), ctx.grid, ctx.q.shape[0], ctx.q.shape[1],
                            ctx.q.device, method.reads_own_row)


def select_blocks(q: torch.Tensor, k: torch.Tensor, method: Union[str, Method], sparsity: float,
                  *, block_size="auto", k_min: int = 64, causal_selection: str = "strict",
                  scale: float = None, seed: int = 42, **params) -> Layout:
    """The layout `method` picks for q [B, Hq, L, d], k [B, Hkv, L, d] at `sparsity`."""
    check_options(sparsity, block_size, k_min, causal_selection)
    method = resolve_method(method, **params)
    q, k = q.contiguous(), k.contiguous()  # e.g. [B, L, H, d] inputs transposed to [B, H, L, d]
    grid = make_grid(method, q.shape[2], sparsity, block_size, k_min, causal_selection)
    scale = default_scale(q.shape[-1]) if scale is None else scale
    return plan_layout(method, MaskContext(q, k, grid, scale, seed=seed))


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     method: Union[str, Method], sparsity: float, *, block_size="auto",
                     k_min: int = 64, causal_selection: str = "strict", scale: float = None,
                     seed: int = 42, **params) -> torch.Tensor:
    """Causal attention [B, Hq, L, d] over the key blocks `method` selects at `sparsity`."""
    scale = default_scale(q.shape[-1]) if scale is None else scale
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # once, for selection and attention
    layout = select_blocks(q, k, method, sparsity, block_size=block_size, k_min=k_min,
                           causal_selection=causal_selection, scale=scale, seed=seed, **params)
    out, _ = ops.block_sparse_attention(q, k, v, layout.block_count, layout.block_index,
                                        layout.grid.block_size, scale)
    return out
