"""What a method is: a small class with a rule for each protocol.

Like NVIDIA kvpress's presses, one class per method, registered by name. The protocols only
talk to this interface, so adding a method touches neither the protocols nor the kernels.

- mask protocol: `mask_plan(ctx)` tells the selection operator how to pick each query-block
  row's key blocks (how many recent, how many sink, how many by which score). The shared code
  in cabattn.sparse turns the plan into a layout with ops.select_blocks and runs
  block-sparse attention over it.
- kv protocol: a method declares its `kv_mode`. "evict" (the default): `kv_keep(state)` returns,
  for one layer's cache, the entries each KV head keeps (the same number per head, or a
  RaggedKeep: a number per head). "select": the cache keeps every token
  and `kv_select(pages)` returns, for each chunk, the pages each query head attends to (memory
  is not bounded, the attended keys are).
"""
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import ClassVar, Optional

import torch

from .. import ops
from ..grid import BlockGrid, token_budget


def scaled_logits(raw: torch.Tensor, scale: float, softcap: float = 0.0) -> torch.Tensor:
    """scale * raw, soft-capped to softcap * tanh(. / softcap) when softcap > 0 (a layer's
    logits as its softmax sees them: docs/protocols.md, models beyond Llama)."""
    logits = raw * scale
    return logits if not softcap else softcap * torch.tanh(logits / softcap)


@dataclass
class BlockPlan:
    """Per-row instructions for ops.select_blocks (see cabattn.reference.select_blocks).

    The n_* are int [M], indexed by the output row I, or [H, M] / [B, H, M] for per-head
    budgets (each head its own counts; docs/baselines.md); they are broadcast to one shape.
    The scores are float [B, H, M, M] read at the source row I - shift, or None when unused.
    """
    n_recent: torch.Tensor
    n_sink: torch.Tensor
    n_score1: torch.Tensor
    n_score2: torch.Tensor
    score1: Optional[torch.Tensor] = None
    score2: Optional[torch.Tensor] = None


@dataclass
class KVPages:
    """One layer's cache as a page-selection rule (kv_mode "select") sees it when a chunk
    arrives: the chunk's post-RoPE queries [B, Hq, c, d] and, per KV head, the elementwise
    minimum and maximum of the keys of every candidate page [B, Hkv, P, d] (pages are blocks
    of block_size tokens by position; the candidates are the whole pages before the chunk's
    first page). The rule picks `n_pick` < P of them per query head; the chunk then attends to
    those and to its own pages."""
    queries: torch.Tensor
    page_min: torch.Tensor
    page_max: torch.Tensor
    n_pick: int
    block_size: int
    scale: float
    layer_idx: int = 0
    window_idx: int = 0


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
    softcap: float = 0.0  # the layer's logit soft-cap (0: none): rules softmax through logits()

    @cached_property
    def block_scores(self):
        """(Sblk, Gblk) of the dense softmax: oracle statistics, one QK^T pass."""
        return ops.block_scores(self.q, self.k, self.grid.block_size, self.scale, self.softcap)

    def logits(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw q.k products as the layer's softmax sees them: scaled, and soft-capped."""
        return scaled_logits(raw, self.scale, self.softcap)

    def generator(self, row: int = 0) -> torch.Generator:
        """A CPU generator seeded by (seed, window, layer) for batch row `row`, for randomised
        rules: a window draws the same numbers whatever batch it is scored in."""
        g = torch.Generator(device="cpu")
        g.manual_seed(hash((self.seed, self.window_idx + row, self.layer_idx)) & 0x7FFFFFFF)
        return g


@dataclass
class KVState:
    """One layer's evicting cache as a kv rule sees it, just after a chunk passed the layer.

    keys [B, Hkv, n, d] post-RoPE (as attended: at the tokens' positions, or at their cache
    indices under positions="cache"), positions [B, Hkv, n] int64 (absolute, ascending per head),
    mass [B, Hkv, n] float32 (attention each cached token has received since it entered, summed
    over the KV head's query heads: the H2O accumulator), block_queries [B, Hq, nb, d]: the
    coarse query of every absolute block (position // block_size) seen so far, the newest
    possibly partial, pooled as the method's block_query_pooling says (None when that is None).
    recent_queries [B, Hq, n, d]: the last n <= recent_query_window queries seen (post-RoPE, as
    attended, across chunks), oldest first: the queries of the n newest positions of the
    stream, the last one at positions.max() (None when the method's recent_query_window is
    None).
    lengths [B, Hkv] int64: each KV head's number of live entries when the heads hold different
    numbers (after a rule returned a RaggedKeep; docs/baselines.md, per-head budgets), None when
    every head holds n. Head (b, g)'s live entries are then 0..lengths[b, g] - 1, the newest
    last; keys, positions and mass past them are stale slots a rule must not read.
    The rule must keep at most `budget` entries per KV head, or, as a RaggedKeep, at most
    Hkv * budget per batch row over its KV heads.
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
    recent_queries: Optional[torch.Tensor] = None
    lengths: Optional[torch.Tensor] = None
    softcap: float = 0.0  # the layer's logit soft-cap (0: none): rules softmax through logits()

    def logits(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw q.k products as the layer's softmax sees them: scaled, and soft-capped."""
        return scaled_logits(raw, self.scale, self.softcap)

    def head_lengths(self) -> torch.Tensor:
        """int64 [B, Hkv]: each KV head's live entries (lengths, or n for every head)."""
        if self.lengths is not None:
            return self.lengths
        b, h, n = self.positions.shape
        return torch.full((b, h), n, dtype=torch.long, device=self.positions.device)

    def live(self) -> torch.Tensor:
        """bool [B, Hkv, n]: which slots hold live entries (all of them unless lengths)."""
        n = self.positions.shape[-1]
        slots = torch.arange(n, device=self.positions.device)
        return slots < self.head_lengths()[..., None]

    def generator(self, row: int = 0) -> torch.Generator:
        """As MaskContext.generator, also seeded by the newest cached position."""
        g = torch.Generator(device="cpu")
        g.manual_seed(hash((self.seed, self.window_idx + row, self.layer_idx,
                            int(self.positions.max()))) & 0x7FFFFFFF)
        return g


@dataclass
class RaggedKeep:
    """A kv keep set whose KV heads keep different numbers of entries (docs/baselines.md,
    per-head budgets): head (b, g) keeps index[b, g, :counts[b, g]] (int64, ascending, unique,
    each of its live entries); the slots after its count are ignored. counts int64 [B, Hkv],
    each at least 1, at most index.shape[-1], summing to at most Hkv * budget per batch row."""
    index: torch.Tensor
    counts: torch.Tensor


def param(default, doc: str, check=None):
    """A method parameter: a dataclass field with its default, a one-line doc (shown by
    `python -m eval.run --help`) and a check (a function value -> None when valid, else the
    requirement it breaks, e.g. "must be a number in [0, 1]")."""
    return field(default=default, metadata={"doc": doc, "check": check})


@dataclass
class Method:
    """Base of every method. A subclass is a dataclass: it sets `name`, declares its parameters
    as fields made with `param(default, doc, check)`, and implements `mask_plan` and `kv_keep`.
    Parameters are checked when the method is built."""
    name: ClassVar[str]
    oracle: ClassVar[bool] = False  # selection reads the dense softmax (priced as a QK pass)
    randomised: ClassVar[bool] = False  # its selection draws from the seed (runs --seeds N)
    # The mask rule reads its scores at the output row I itself even under strict selection:
    # it sees the queries it serves, so it is an upper bound, never a method (recorded as
    # oracle: upper_bound).
    reads_own_row: ClassVar[bool] = False
    # "evict" (kv_keep bounds the cache) or "select" (kv_select bounds the attended pages).
    kv_mode: ClassVar[str] = "evict"

    def __post_init__(self) -> None:
        for spec in fields(self):
            check = spec.metadata.get("check")
            value = getattr(self, spec.name)
            problem = check(value) if check is not None else None
            if problem:
                raise ValueError(f"{self.name}: {spec.name}={value!r} {problem}")

    @classmethod
    def parameters(cls) -> dict:
        """{name: (default, doc)} of the declared parameters, in declaration order."""
        return {spec.name: (spec.default, spec.metadata.get("doc", "")) for spec in fields(cls)}

    @property
    def config(self) -> dict:
        """The parameters this instance runs with (defaults filled in)."""
        return {spec.name: getattr(self, spec.name) for spec in fields(self)}

    @property
    def block_query_pooling(self) -> Optional[str]:
        """How the kv rule wants each block's queries pooled into KVState.block_queries
        ("max_l2" or "mean"), or None when it does not read them (the cache then tracks
        nothing)."""
        return None

    @property
    def recent_query_window(self) -> Optional[int]:
        """How many of the newest post-RoPE queries per query head the kv rule reads
        (KVState.recent_queries: SnapKV's observation window), or None when it reads none (the
        cache then keeps none)."""
        return None

    def token_budget(self, length: int, sparsity: float, k_min: int = 64) -> int:
        """K for a window of `length` tokens; a method that ignores sparsity overrides it."""
        return token_budget(length, sparsity, k_min)

    def layer_budget(self, budget: int, layer_idx: int, num_layers: int, length: int) -> int:
        """K_l, the token budget of layer `layer_idx` of `num_layers` in a run whose budget
        is `budget` for a window of `length` tokens (docs/baselines.md, per-layer and per-head
        budgets). Both protocols size each layer with it; the layers' budgets must average to
        `budget` (up to the cap at `length`). Default: every layer gets `budget`."""
        return budget

    def check_protocol(self, protocol: str) -> None:
        """Raises ValueError when this configuration has no rule for `protocol` ("mask", "kv"
        or "prefill", which compresses once with the kv rule); the protocol calls it once,
        before it touches the model. A subclass that refuses more calls this first."""
        if protocol == "prefill" and self.kv_mode != "evict":
            raise ValueError(f"{self.name} chooses what each step attends to (kv_mode "
                             f"{self.kv_mode!r}) instead of evicting: it has no one-shot "
                             "compression; run it with protocol='kv'")

    def mask_plan(self, ctx: MaskContext) -> BlockPlan:
        raise NotImplementedError

    def kv_keep(self, state: KVState):
        """Sorted, unique int64 indices [B, Hkv, <= budget] into the cache to keep, or a
        RaggedKeep when the KV heads keep different numbers of entries."""
        raise NotImplementedError

    def kv_select(self, pages: KVPages) -> torch.Tensor:
        """kv_mode "select": distinct int64 page indices [B, Hq, pages.n_pick] (any order) of
        the candidate pages each query head of the chunk attends to."""
        raise NotImplementedError
