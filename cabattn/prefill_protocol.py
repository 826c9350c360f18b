"""The prefill protocol (docs/protocols.md, Prefill): one-shot compression after a dense
prefill, the setting of SnapKV, PyramidKV, Ada-KV, TOVA, key-norm and NVIDIA kvpress.

A sequence is split into a context (its first `context_length` tokens; by default all but the
last L // 8) and a continuation. The context is prefilled with dense attention, through the
streaming machinery the kv protocol uses (cabattn.kv_protocol.StreamingProtocol: every layer
attends with ops.attention_with_scores over a cache that holds the whole context, which also
sums the attention each key receives, and the cache tracks the recent and block queries the
rules read). Then every layer's cache is compressed once, by the method's kv rule (the same
kv_keep the kv protocol evicts with), to K = max(k_min, floor((1 - s) n_c)) entries per KV
head (or the method's per-layer and per-head budgets with that mean). The continuation then
attends to the compressed cache plus its own tokens, and nothing more is evicted. Kept keys
keep their positions; the continuation's positions continue at n_c.

Compressing every layer after the whole dense prefill gives the same caches as compressing
each right after its own prefill attention: the prefill of later layers is dense either way,
so no layer's compression reaches another's prefill. That lets a dense prefill be shared: a
PrefillStore passed as `prefill_store` keeps captured dense prefills (keyed by their tokens and
by what the rules read), so runs that differ only in method and sparsity prefill each context
once and each pays for its rule and its continuation alone.
"""
import hashlib
from dataclasses import dataclass
from typing import Optional, Union

import torch

from . import ops
from .kv_cache import KVEvictionCache
from .kv_protocol import StreamingProtocol
from .methods import Method


@dataclass
class _Prefilled:
    """A context's dense prefill: the uncompressed cache, the logits of its last position
    [B, 1, V] and each layer's attention scale."""
    cache: KVEvictionCache
    last_logits: torch.Tensor
    scales: list


class PrefillStore:
    """Dense prefills of contexts kept for the next protocol that prefills the same tokens
    (docs/protocols.md, Sharing the dense prefill). Holds at most `max_bytes` of caches:
    prefills that do not fit are not kept (and are recomputed when asked for again), never
    evicted, so a set of cells that visits the same contexts in the same order shares every
    one that fits.

    recent_query_window, block_query_pooling: what a captured prefill tracks besides the
    keys, values and received attention, for every method that will read it (the largest
    observation window among the methods, their block query pooling); a method that reads a
    wider window or another pooling captures a prefill of its own."""

    def __init__(self, max_bytes: int, recent_query_window: Optional[int] = None,
                 block_query_pooling: Optional[str] = None):
        if max_bytes < 0:
            raise ValueError(f"max_bytes {max_bytes!r} must be >= 0")
        self.max_bytes = max_bytes
        self.recent_query_window = recent_query_window
        self.block_query_pooling = block_query_pooling
        self.entries: dict = {}
        self.bytes = 0
        self.hits = self.misses = 0

    @classmethod
    def for_methods(cls, methods: list, max_bytes: int) -> "PrefillStore":
        """A store whose prefills serve every one of `methods` (Method instances)."""
        windows = [m.recent_query_window for m in methods if m.recent_query_window]
        poolings = [m.block_query_pooling for m in methods if m.block_query_pooling]
        return cls(max_bytes, max(windows, default=None),
                   max(set(poolings), key=poolings.count) if poolings else None)

    def get(self, key) -> Optional[_Prefilled]:
        entry = self.entries.get(key)
        if entry is None:
            self.misses += 1
        else:
            self.hits += 1
        return entry

    def put(self, key, entry: _Prefilled) -> bool:
        """Keeps `entry` when it fits; True when kept."""
        size = entry.cache.nbytes() + entry.last_logits.numel() * entry.last_logits.element_size()
        if key in self.entries or self.bytes + size > self.max_bytes:
            return False
        self.entries[key] = entry
        self.bytes += size
        return True

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0


class PrefillProtocol(StreamingProtocol):
    """Context manager that makes `model(input_ids, labels=..., context_length=n)` prefill the
    first n tokens densely, compress every layer's cache once to the method's budget and
    score the rest against it; __enter__ returns the ProtocolStats the sequences add to.

    The output's logits are those of positions n - 1 .. L - 1 (the continuation's
    predictions, the first from the context's last position), the loss their mean NLL; the
    realised density is over the continuation's queries (the context's are dense by
    definition). After a forward, `stats.kept_positions` holds, per layer, the sorted absolute
    positions each KV head kept, int64 [B, Hkv, K_l] (-1 past a head's own count when the
    heads keep different numbers).

    context_length: the constructor's default split (None: L - L // 8 of each sequence).
    prefill_store: a PrefillStore to share dense prefills through (None: none kept).
    keep_logits, progress: StreamingProtocol.
    """

    name = "prefill"
    OPTIONS = (ops.KERNEL_PATH_OPTION,)
    EVICTS_AFTER_OPEN = False
    one_shot = True

    def __init__(self, model, method: Union[Method, str], sparsity: float,
                 block_size: Union[int, str] = "auto", k_min: int = 64, seed: int = 42,
                 kernels: str = "extension", context_length: Optional[int] = None,
                 prefill_store: Optional[PrefillStore] = None, keep_logits: bool = True,
                 progress: bool = False, **method_params):
        super().__init__(model, method, sparsity, positions="absolute", keep_logits=keep_logits,
                         progress=progress, options=dict(kernels=kernels),
                         block_size=block_size, k_min=k_min, seed=seed,
                         context_length=context_length, method_params=method_params)
        self.prefill_store = prefill_store
        self.stats.density_rows = "continuation"
        self.stats.context_attention = "dense; then each layer's cache compressed once"
        self.stats.continuation_attention = "the compressed cache and its own tokens"

    @classmethod
    def default_context(cls, length: int) -> int:
        return max(length - length // 8, 1)

    def _first_logit(self, context: int) -> int:
        return context - 1

    def _counted_from(self, context: int) -> int:
        return context

    def _budget_length(self, length: int, context: int) -> int:
        return context  # the context is what is compressed, whatever follows it

    def _capacities(self, length: int, context: int) -> list:
        return [length] * len(self.layer_budgets)  # the context, then its continuation

    def _chunks(self, start: int, end: int) -> list:
        """The continuation as one step: nothing is evicted within it."""
        return [(start, end)] if start < end else []

    def _tracking(self) -> tuple:
        """(recent query window, block query pooling) a captured prefill tracks."""
        store, method = self.prefill_store, self.method
        window = max(method.recent_query_window or 0,
                     (store.recent_query_window or 0) if store else 0) or None
        pooling = method.block_query_pooling or (store.block_query_pooling if store else None)
        return window, pooling

    def _open(self, run, input_ids, context: int, first: int):
        """The dense prefill of the context (shared through the store when it holds it), then
        every layer compressed once."""
        prefilled = self._prefill(run, input_ids[:, :context])
        stream = run.stream
        with self.stats.timing("selection", input_ids.device):
            for layer_idx, layer in enumerate(run.cache.layers):
                stream.evict(layer_idx, layer.keys, prefilled.scales[layer_idx])
        self.stats.kept_positions = [_kept_positions(layer) for layer in run.cache.layers]
        # the density counts the continuation's queries alone
        stream.kept_pairs = [0] * len(run.cache.layers)
        stream.head_pairs = [None] * len(run.cache.layers)
        return context, prefilled.last_logits if first <= context - 1 else None

    def _prefill(self, run, context_ids: torch.Tensor) -> _Prefilled:
        """The context's dense prefill in run.cache (uncompressed): from the store, or run
        now (and offered to the store)."""
        context = context_ids.shape[1]
        key = self._store_key(context_ids) if self.prefill_store is not None else None
        stored = self.prefill_store.get(key) if key is not None else None
        if stored is not None:
            run.cache = run.stream.cache = self.cache = stored.cache.copy(
                [layer.capacity for layer in run.cache.layers], run.cache.length)
            return stored
        logits = self._step(run, context_ids, 0, context, context - 1, evicting=False)
        prefilled = _Prefilled(run.cache, logits, list(run.stream.scales))
        if key is not None:
            self.prefill_store.put(key, _Prefilled(
                run.cache.copy([context] * len(run.cache.layers), context), logits,
                prefilled.scales))
        return prefilled

    def _store_key(self, context_ids: torch.Tensor) -> tuple:
        """What makes two dense prefills the same: the model, the operators' path, the block
        size, what is tracked and the context's tokens."""
        ids = context_ids.detach().cpu().contiguous().numpy()
        digest = hashlib.sha256(ids.tobytes()).hexdigest()
        return (id(self.model), self.kernels, self.stats.block_size, self._tracking(),
                tuple(context_ids.shape), digest)


def _kept_positions(layer) -> torch.Tensor:
    """The sorted absolute positions each KV head holds, int64 [B, Hkv, n] (-1 past a head's
    own count)."""
    positions = layer.positions.clone()
    live = layer.live_mask()
    return positions if live is None else positions.masked_fill(~live, -1)
