"""What a method is: a small class with a rule for each protocol.

Like NVIDIA kvpress's presses, one class per method, registered by name. The protocols only
talk to this interface, so adding a method touches neither the protocols nor the kernels.

- mask protocol: `mask_plan(ctx)` tells the selection operator how to pick each query-block
  row's key blocks (how many recent, how many sink, how many by which score). The shared code
  in cabattn.sparse turns the plan into a layout with ops.select_blocks and runs
  block-sparse attention over it.
- kv protocol: `kv_keep(state)` returns, for one layer's cache, the entries each KV head keeps.
"""
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar, Optional

import torch

from ..grid import BlockGrid, token_budget


@dataclass
class BlockPlan:
    """Per-row instructions for ops.select_blocks (see cabattn.reference.select_blocks).

    The n_* are int32 [M], indexed by the output row I; the scores are float [B, H, M, M]
    read at the source row I - shift, or None when unused.
    """
    n_recent: torch.Tensor
    n_sink: torch.Tensor
    n_score1: torch.Tensor
    n_score2: torch.Tensor
    score1: Optional[torch.Tensor] = None
    score2: Optional[torch.Tensor] = None


@dataclass
class MaskContext:
    """What a mask rule may read for one layer and batch of windows: post-RoPE q [B, Hq, L, d]
    and k [B, Hkv, L, d] (row b is window window_idx + b), the block grid, the attention scale,
    and the oracle block statistics, computed on first use."""
    q: torch.Tensor
    k: torch.Tensor
    grid: BlockGrid
    scale: float
    layer_idx: int = 0
    window_idx: int = 0
    seed: int = 42

    @cached_property
    def block_scores(self):
        """(Sblk, Gblk) of the dense softmax: oracle statistics, one QK^T pass."""
        from .. import ops
        return ops.block_scores(self.q, self.k, self.grid.block_size, self.scale)

    def generator(self, row: int = 0) -> torch.Generator:
        """A CPU generator seeded by (seed, window, layer) for batch row `row`, for randomised
        rules: a window draws the same numbers whatever batch it is scored in."""
        g = torch.Generator(device="cpu")
        g.manual_seed(hash((self.seed, self.window_idx + row, self.layer_idx)) & 0x7FFFFFFF)
        return g


@dataclass
class KVState:
    """One layer's evicting cache as a kv rule sees it, just after a chunk passed the layer.

    keys [B, Hkv, n, d] post-RoPE, positions [B, Hkv, n] int64 (absolute, ascending per head),
    mass [B, Hkv, n] float32 (attention each cached token has received since it entered, summed
    over the KV head's query heads: the H2O accumulator), block_queries [B, Hq, nb, d]: the
    coarse query of every absolute block (position // block_size) seen so far, the newest
    possibly partial (None unless the method sets reads_block_queries). The rule must keep at
    most `budget` entries per KV head.
    """
    keys: torch.Tensor
    positions: torch.Tensor
    mass: torch.Tensor
    block_queries: Optional[torch.Tensor]
    budget: int
    block_size: int
    scale: float
    layer_idx: int = 0
    window_idx: int = 0
    seed: int = 42

    def generator(self, row: int = 0) -> torch.Generator:
        """As MaskContext.generator, also seeded by the newest cached position."""
        g = torch.Generator(device="cpu")
        g.manual_seed(hash((self.seed, self.window_idx + row, self.layer_idx,
                            int(self.positions.max()))) & 0x7FFFFFFF)
        return g


class Method:
    """Base of every method. Subclasses set `name`, `params` (public name -> default) and
    implement `mask_plan` and `kv_keep`; `validate` checks parameter ranges."""
    name: ClassVar[str]
    params: ClassVar[dict] = {}
    oracle: ClassVar[bool] = False  # selection reads the dense softmax (priced as a QK pass)
    # kv rule reads KVState.block_queries; the cache tracks them (a few small ops per layer and
    # chunk) only for methods that do.
    reads_block_queries: ClassVar[bool] = False

    def __init__(self, **params):
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            valid = ", ".join(sorted(self.params)) or "none"
            raise ValueError(f"method {self.name!r} has no parameter(s) {unknown}; "
                             f"its parameters are: {valid}")
        self.config = {**self.params, **params}
        for key, value in self.config.items():
            setattr(self, key, value)
        self.validate()

    def validate(self) -> None:
        pass

    def _check_ratio(self, name: str) -> None:
        value = getattr(self, name)
        if not _is_number(value) or not 0.0 <= value <= 1.0:
            raise ValueError(f"{self.name}: {name}={value!r} must be a number in [0, 1]")

    def _check_non_negative(self, name: str) -> None:
        value = getattr(self, name)
        if not _is_number(value) or value < 0:
            raise ValueError(f"{self.name}: {name}={value!r} must be a number >= 0")

    def _check_positive(self, name: str) -> None:
        value = getattr(self, name)
        if not _is_number(value) or value <= 0:
            raise ValueError(f"{self.name}: {name}={value!r} must be a number > 0")

    def _check_positive_int(self, name: str) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{self.name}: {name}={value!r} must be a positive integer")

    def _check_choice(self, name: str, choices) -> None:
        value = getattr(self, name)
        if value not in choices:
            raise ValueError(f"{self.name}: {name}={value!r} is not valid; valid choices: "
                             f"{', '.join(map(str, choices))}")

    def token_budget(self, length: int, sparsity: float, k_min: int = 64) -> int:
        """K for a window of `length` tokens; a method that ignores sparsity overrides it."""
        return token_budget(length, sparsity, k_min)

    def check_protocol(self, protocol: str) -> None:
        """Raises ValueError when this configuration has no rule for `protocol` ("mask" or
        "kv"); called before a protocol touches the model."""

    def mask_plan(self, ctx: MaskContext) -> BlockPlan:
        raise NotImplementedError

    def kv_keep(self, state: KVState) -> torch.Tensor:
        """Sorted, unique int64 indices [B, Hkv, <= budget] into the cache to keep."""
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"{type(self).__name__}({args})"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
