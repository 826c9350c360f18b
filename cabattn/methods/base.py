"""What a method is: a small class with a rule for each protocol.

Like NVIDIA kvpress's presses, one class per method, registered by name. The protocols only
talk to this interface, so adding a method touches neither the protocols nor the kernels.

- mask protocol: `mask_plan(ctx)` tells the selection operator how to pick each query-block
  row's key blocks (how many recent, how many sink, how many by which score). The shared code
  in cabattn.sparse turns the plan into a layout with ops.select_blocks and runs
  block-sparse attention over it.
- kv protocol: `kv_keep(state)` returns, for one layer's cache, the entries each KV head keeps.
"""
from dataclasses import dataclass, field
from functools import cached_property
from typing import ClassVar, Optional

import torch

from ..grid import BlockGrid


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
    """What a mask rule may read for one layer and window: post-RoPE q [B, Hq, L, d] and
    k [B, Hkv, L, d], the block grid, and block statistics computed on first use."""
    q: torch.Tensor
    k: torch.Tensor
    grid: BlockGrid
    scale: float
    layer_idx: int = 0
    window_idx: int = 0
    seed: int = 42
    pooling: int = 0  # ops.MAX_L2 or ops.MEAN
    stats_used: set = field(default_factory=set)

    @cached_property
    def coarse_q(self) -> torch.Tensor:
        from .. import ops
        self.stats_used.add("coarse")
        return ops.coarsen(self.q, self.grid.block_size, self.pooling)

    @cached_property
    def coarse_k(self) -> torch.Tensor:
        from .. import ops
        self.stats_used.add("coarse")
        return ops.coarsen(self.k, self.grid.block_size, self.pooling)

    @cached_property
    def block_scores(self):
        """(Sblk, Gblk) of the dense softmax: oracle statistics, one QK^T pass."""
        from .. import ops
        self.stats_used.add("oracle")
        return ops.block_scores(self.q, self.k, self.grid.block_size, self.scale)

    def generator(self) -> torch.Generator:
        """A generator seeded by (seed, window, layer), for randomised rules."""
        g = torch.Generator(device="cpu")
        g.manual_seed(hash((self.seed, self.window_idx, self.layer_idx)) & 0x7FFFFFFF)
        return g


@dataclass
class KVState:
    """One layer's evicting cache as a kv rule sees it, just after a chunk passed the layer.

    keys [B, Hkv, n, d] post-RoPE, positions [B, Hkv, n] int64 (absolute, ascending per head),
    mass [B, Hkv, n] float32 (attention each cached token has received since it entered, summed
    over the KV head's query heads: the H2O accumulator), block_queries [B, Hq, nb, d]: the
    coarse query of every absolute block (position // block_size) seen so far, the newest
    possibly partial. The rule must keep at most `budget` entries per KV head.
    """
    keys: torch.Tensor
    positions: torch.Tensor
    mass: torch.Tensor
    block_queries: torch.Tensor
    budget: int
    block_size: int
    scale: float
    layer_idx: int = 0
    window_idx: int = 0
    seed: int = 42

    def generator(self) -> torch.Generator:
        g = torch.Generator(device="cpu")
        g.manual_seed(hash((self.seed, self.window_idx, self.layer_idx, int(self.positions.max())))
                      & 0x7FFFFFFF)
        return g


class Method:
    """Base of every method. Subclasses set `name`, `params` (public name -> default) and
    implement `mask_plan` and `kv_keep`; `validate` checks parameter ranges."""
    name: ClassVar[str]
    params: ClassVar[dict] = {}
    oracle: ClassVar[bool] = False  # selection reads the dense softmax (priced as a QK pass)

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

    def mask_plan(self, ctx: MaskContext) -> BlockPlan:
        raise NotImplementedError

    def kv_keep(self, state: KVState) -> torch.Tensor:
        """Sorted, unique int64 indices [B, Hkv, <= budget] into the cache to keep."""
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"{type(self).__name__}({args})"
