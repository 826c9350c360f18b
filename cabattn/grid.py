"""Token budgets and the block grid of one window (docs/methods.md, Notation)."""
import math
from dataclasses import dataclass

import torch

from .checks import is_integer, is_number, one_of, positive_int, require

BLOCK_SIZES = (16, 32, 64, 128)
CAUSAL_SELECTIONS = ("strict", "block")


def auto_block_size(length: int) -> int:
    """The power of two nearest length / 64, clamped to 16..128 (about 64 blocks a window)."""
    target = max(length / 64, 1.0)
    nearest = 2 ** round(math.log2(target))
    return int(min(max(nearest, BLOCK_SIZES[0]), BLOCK_SIZES[-1]))


def resolve_block_size(block_size, length: int) -> int:
    """The block size a window of `length` tokens runs with ("auto": auto_block_size)."""
    return auto_block_size(length) if block_size == "auto" else int(block_size)


def token_budget(length: int, sparsity: float, k_min: int = 64) -> int:
    """K = max(k_min, floor((1 - s) * L)), never more than L. The product is rounded to 9
    decimals first: (1 - 0.9) * 1000 is 99.99999999999997 in floating point, and K is 100."""
    return min(length, max(k_min, math.floor(round((1.0 - sparsity) * length, 9))))


def sparsity_for_budget(budget: int, length: int, k_min: int = 64) -> float:
    """The sparsity whose token budget at `length` is exactly `budget` tokens (0.0, dense,
    when the budget holds the whole window): a fixed cache size as a sparsity."""
    if not is_integer(budget) or budget < k_min:
        raise ValueError(f"token budget {budget!r} must be an integer >= k_min = {k_min} (the "
                         "smallest budget any sparsity gives)")
    if budget >= length:
        return 0.0
    sparsity = 1.0 - budget / length
    assert token_budget(length, sparsity, k_min) == budget, (budget, length, sparsity)
    return sparsity


@dataclass(frozen=True)
class BlockGrid:
    """The blocks of one window and each query-block row's budget."""
    length: int
    block_size: int
    budget: int  # K, in tokens
    causal_selection: str = "strict"

    @property
    def num_blocks(self) -> int:
        return (self.length + self.block_size - 1) // self.block_size

    @property
    def shift(self) -> int:
        """How many rows back a row's selection rule looks: 1 for strict, 0 for block."""
        return 1 if self.causal_selection == "strict" else 0

    def row_budget(self, device=None) -> torch.Tensor:
        """k_b = min(I + 1, ceil(K / B)) blocks for each query-block row I, int32 [M]."""
        rows = torch.arange(self.num_blocks, device=device, dtype=torch.int32)
        return torch.clamp(rows + 1, max=math.ceil(self.budget / self.block_size))

    def rule_budget(self, device=None) -> torch.Tensor:
        """Blocks the method's rule picks for row I from candidates 0..I-shift, the source
        row's own diagonal included; 0 where the source row does not exist (int32 [M])."""
        return torch.clamp(self.row_budget(device) - self.shift, min=0)

    def max_count(self) -> int:
        return int(self.row_budget().max())

    def block_lengths(self, device=None) -> torch.Tensor:
        """Tokens in each block (the last one may be partial), int64 [M]."""
        starts = torch.arange(self.num_blocks, device=device) * self.block_size
        return torch.clamp(self.length - starts, max=self.block_size)


def kept_pairs(block_count: torch.Tensor, block_index: torch.Tensor,
               grid: BlockGrid, queries: int = None) -> torch.Tensor:
    """Kept (query, key) pairs of a layout per batch row and head, float64 [B, H], over its
    first `queries` query rows (default all)."""
    sizes = grid.block_lengths(block_count.device).double()
    starts = torch.arange(grid.num_blocks, device=block_count.device) * grid.block_size
    queries = grid.length if queries is None else queries
    rows_counted = (queries - starts).clamp(min=0).double().minimum(sizes)
    slots = torch.arange(block_index.shape[-1], device=block_count.device)
    valid = slots < block_count[..., None].long()
    idx = block_index.long().clamp(min=0)
    rows = torch.arange(grid.num_blocks, device=block_count.device)[:, None]
    key_tokens = (sizes[idx] * (valid & (idx < rows))).sum(-1)
    diagonal = (valid & (idx == rows)).any(-1) * rows_counted * (rows_counted + 1) / 2
    return (rows_counted * key_tokens + diagonal).sum(-1)


def causal_pairs(length: int) -> float:
    return length * (length + 1) / 2


def realised_density(block_count: torch.Tensor, block_index: torch.Tensor,
                     grid: BlockGrid) -> float:
    """Kept (query, key) pairs / causal pairs of a layout, over every batch row and head."""
    kept = kept_pairs(block_count, block_index, grid)
    return float(kept.sum() / (causal_pairs(grid.length) * kept.numel()))


def check_options(sparsity, block_size="auto", k_min: int = 64,
                  causal_selection: str = "strict") -> None:
    """Rejects out-of-range protocol options before any model work, naming the valid ones."""
    if not is_number(sparsity) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity {sparsity!r} is outside [0, 1) (0 = dense, 0.9 = keep 10% "
                         "of the tokens)")
    if block_size != "auto" and block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size {block_size!r} is not supported; valid: auto, "
                         + ", ".join(map(str, BLOCK_SIZES)))
    require("k_min", k_min, positive_int)
    require("causal_selection", causal_selection, one_of(*CAUSAL_SELECTIONS))
