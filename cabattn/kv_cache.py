"""A bounded, evicting KV cache on transformers' Cache API (the kv protocol's storage).

Each layer preallocates room for `budget + chunk` entries per KV head, so a chunk is appended
by copying into the buffer and eviction compacts the buffer in place with ops.kv_compact_:
nothing is reallocated or rebuilt per token. Keys (post-RoPE, or un-rotated under the kv
protocol's positions="cache"), values, absolute positions and the H2O mass
accumulator live in parallel buffers and are always compacted together, so entry i of each
describes the same token. Each KV head has its own keep set.

KV heads may hold different numbers of entries (a rule's RaggedKeep; docs/baselines.md,
per-head budgets): the layer then keeps each (batch row, KV head)'s live length on the host,
a chunk is appended after each head's own entries, compaction gathers each head's kept entries
to the front of its slots, and the buffers grow (by half, amortised) when a head outgrows them.
The views `keys` / `values` then span the longest head; the slots past a head's length are
stale, and the kv protocol's attention reads each head's live entries only.

The layer also keeps, per query head, the coarse query of every absolute block seen so far,
pooled as the method asks (Method.block_query_pooling: max_l2, by ops.coarsen over the block's
queries so far, or the mean): the block statistic block-level kv rules (cab_v3/cab_v4) score
cached blocks with; and, when the method asks (Method.recent_query_window), a rolling buffer of
the last w post-RoPE queries per query head across chunks: the observation window SnapKV-style
rules score the cache with.

Under kv_mode "select" (Method.kv_mode) nothing is evicted: each layer has room for the whole
window and keeps, per KV head and page (block of block_size positions), the elementwise minimum
and maximum of the page's keys as attended, the statistic page-selection rules read.
"""
import math
from typing import Optional

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from . import ops, ties
from .methods.base import KVState

BLOCK_QUERY_POOLINGS = (None, "max_l2", "mean")
KV_MODES = ("evict", "select")


class EvictingLayer(CacheLayerMixin):
    """One layer's cache: preallocated buffers plus the live length `length`.

    `keys` / `values` (the attributes transformers reads) are always views of the live
    entries [B, Hkv, length, d].
    """
    is_sliding = False
    is_compileable = False

    def __init__(self, capacity: int, block_size: int, num_blocks: int,
                 block_query_pooling: Optional[str] = None,
                 recent_query_window: Optional[int] = None, page_bounds: bool = False):
        super().__init__()
        if block_query_pooling not in BLOCK_QUERY_POOLINGS:
            raise ValueError(f"block query pooling {block_query_pooling!r} is not one the cache "
                             f"can track; valid: {', '.join(map(str, BLOCK_QUERY_POOLINGS))}")
        if recent_query_window is not None and (
                isinstance(recent_query_window, bool) or not isinstance(recent_query_window, int)
                or recent_query_window < 1):
            raise ValueError(f"recent query window {recent_query_window!r} must be a positive "
                             "integer, or None to keep no queries")
        self.capacity = capacity
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.block_query_pooling = block_query_pooling
        self.length = 0
        # None while every KV head holds `length` entries; else [B][Hkv] ints (host) and the
        # same as an int64 tensor on the cache's device
        self.head_lengths = self.length_tensor = None
        self.key_buffer = self.value_buffer = None
        self.position_buffer = self.mass_buffer = None
        # max_l2: the representatives and the queries of the newest block (max_l2's tolerance
        # rule needs all of them: a later, larger query can move the pick to an earlier one);
        # mean: the float32 sum and the count of queries
        self.block_query_buffer = self.block_query_count = self.open_block_queries = None
        self.blocks_seen = 0
        self.recent_query_window = recent_query_window
        self.recent_query_buffer = None  # [B, Hq, w, d], its first recent_query_count live
        self.recent_query_count = 0
        # page_bounds: [B, Hkv, num_blocks, d] elementwise min and max of each page's keys
        self.page_bounds = page_bounds
        self.page_min = self.page_max = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.device = key_states.device
        self.key_buffer = key_states.new_empty(b, h, self.capacity, d)
        self.value_buffer = value_states.new_empty(b, h, self.capacity, value_states.shape[-1])
        self.position_buffer = torch.empty(b, h, self.capacity, dtype=torch.long,
                                           device=self.device)
        self.mass_buffer = torch.empty(b, h, self.capacity, dtype=torch.float32,
                                       device=self.device)
        if self.page_bounds:
            self.page_min = torch.full((b, h, self.num_blocks, d), float("inf"),
                                       dtype=torch.float32, device=self.device)
            self.page_max = torch.full_like(self.page_min, float("-inf"))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               positions: Optional[torch.Tensor] = None, **kwargs):
        """Appends a chunk [B, Hkv, c, d] whose absolute positions are `positions` [B, c];
        returns the live keys and values, the chunk last."""
        if positions is None:
            raise ValueError("EvictingLayer.update needs the chunk's absolute positions; call "
                             "it through KVEvictionCache after KVEvictionCache.begin_chunk")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.head_lengths is not None:
            return self._append_ragged(key_states, value_states, positions)
        start, chunk = self.length, key_states.shape[2]
        end = start + chunk
        if end > self.capacity:
            raise RuntimeError(f"appending {chunk} entries to a cache holding {start} of "
                               f"{self.capacity}: the cache must be evicted to its budget first")
        self.key_buffer[:, :, start:end] = key_states
        self.value_buffer[:, :, start:end] = value_states
        self.position_buffer[:, :, start:end] = positions[:, None, :]
        self.mass_buffer[:, :, start:end] = 0.0
        self._set_length(end)
        return self.keys, self.values

    def _append_ragged(self, key_states, value_states, positions):
        """update() when the KV heads hold different numbers of entries: each (batch row, KV
        head) appends the chunk after its own live entries."""
        b, h, chunk, _ = key_states.shape
        ends = [[n + chunk for n in row] for row in self.head_lengths]
        longest = max(max(row) for row in ends)
        if longest > self.capacity:
            self._grow(max(longest, self.capacity + self.capacity // 2))
        slots = self.length_tensor[..., None] + torch.arange(chunk, device=self.device)
        new = ((self.key_buffer, key_states), (self.value_buffer, value_states),
               (self.position_buffer, positions[:, None, :].expand(b, h, chunk)),
               (self.mass_buffer, self.mass_buffer.new_zeros(b, h, chunk)))
        for buffer, values in new:
            buffer.scatter_(2, _along_entries(slots, buffer), values)
        self._set_head_lengths(ends)
        return self.keys, self.values

    def _grow(self, capacity: int) -> None:
        """Reallocates the entry buffers with room for `capacity` entries per head (a head of
        a ragged cache outgrew them), keeping the live prefix."""
        for name in ("key_buffer", "value_buffer", "position_buffer", "mass_buffer"):
            old = getattr(self, name)
            grown = old.new_empty(*old.shape[:2], capacity, *old.shape[3:])
            grown[:, :, :self.length] = old[:, :, :self.length]
            setattr(self, name, grown)
        self.capacity = capacity
        self._set_length(self.length)

    def _set_head_lengths(self, lengths: list) -> None:
        """Each (batch row, KV head)'s live length ([B][Hkv] ints); uniform ones go back to the
        one `length`."""
        flat = [n for row in lengths for n in row]
        if min(flat) == max(flat):
            self.head_lengths = self.length_tensor = None
        else:
            self.head_lengths = lengths
            self.length_tensor = torch.tensor(lengths, dtype=torch.long, device=self.device)
        self._set_length(max(flat))

    def over_budget(self, budget: int) -> bool:
        """Whether a batch row holds more than `budget` entries per KV head (on average over
        its heads when they hold different numbers)."""
        if self.head_lengths is None:
            return self.length > budget
        return any(sum(row) > len(row) * budget for row in self.head_lengths)

    def live_mask(self) -> Optional[torch.Tensor]:
        """bool [B, Hkv, length]: the live slots of a ragged cache (None when uniform)."""
        if self.head_lengths is None:
            return None
        return torch.arange(self.length, device=self.device) < self.length_tensor[..., None]

    def _set_length(self, length: int) -> None:
        self.length = length
        self.keys = self.key_buffer[:, :, :length]
        self.values = self.value_buffer[:, :, :length]

    @property
    def positions(self) -> torch.Tensor:
        return self.position_buffer[:, :, :self.length]

    @property
    def mass(self) -> torch.Tensor:
        return self.mass_buffer[:, :, :self.length]

    def add_mass(self, mass: torch.Tensor) -> None:
        """Adds the attention each live entry received from the latest chunk ([B, Hkv, n])."""
        self.mass_buffer[:, :, :self.length] += mass

    def note_queries(self, query: torch.Tensor, first_position: int) -> Optional[torch.Tensor]:
        """Folds a chunk of post-RoPE queries [B, Hq, c, d] at absolute positions
        first_position.. into each block's coarse query (block_query_pooling). Under max_l2,
        returns bool [B, Hq, n]: for the n blocks the chunk completed, whether the first-index
        rule chose their representative among tied tokens (cabattn.ties.tie_decided)."""
        closed = None
        if self.block_query_pooling == "mean":
            self._sum_queries(query, first_position)
        else:
            closed = self._best_queries(query, first_position)
        self.blocks_seen = (first_position + query.shape[2] - 1) // self.block_size + 1
        return closed

    def _sum_queries(self, query: torch.Tensor, first_position: int) -> None:
        b, h, chunk, d = query.shape
        if self.block_query_buffer is None:
            self.block_query_buffer = torch.zeros(b, h, self.num_blocks, d, dtype=torch.float32,
                                                  device=query.device)
            self.block_query_count = torch.zeros(self.num_blocks, dtype=torch.float32,
                                                 device=query.device)
        for block, lo, hi in self._block_spans(first_position, chunk):
            self.block_query_buffer[:, :, block] += query[:, :, lo:hi].float().sum(2)
            self.block_query_count[block] += hi - lo

    def _block_spans(self, first_position: int, chunk: int):
        """(block, lo, hi): the chunk's queries lo:hi that fall in each absolute block."""
        last = first_position + chunk - 1
        for block in range(first_position // self.block_size, last // self.block_size + 1):
            yield (block, max(block * self.block_size, first_position) - first_position,
                   min((block + 1) * self.block_size, last + 1) - first_position)

    def note_keys(self, keys: torch.Tensor, first_position: int) -> None:
        """Folds a chunk of keys as attended [B, Hkv, c, d] at positions first_position..
        into their pages' elementwise minima and maxima."""
        for page, lo, hi in self._block_spans(first_position, keys.shape[2]):
            part = keys[:, :, lo:hi].float()
            self.page_min[:, :, page] = torch.minimum(self.page_min[:, :, page], part.amin(2))
            self.page_max[:, :, page] = torch.maximum(self.page_max[:, :, page], part.amax(2))

    def _best_queries(self, query: torch.Tensor, first_position: int) -> torch.Tensor:
        """Each touched block's max_l2 representative, pooled by ops.coarsen over the block's
        queries so far (the same rule, in the same kernel, as the mask protocol); returns the
        tie flags of the blocks completed (note_queries)."""
        b, h, chunk, d = query.shape
        if self.block_query_buffer is None:
            self.block_query_buffer = query.new_zeros(b, h, self.num_blocks, d)
            self.open_block_queries = query.new_empty(b, h, self.block_size, d)
        closed = []
        for block, lo, hi in self._block_spans(first_position, chunk):
            start = first_position + lo - block * self.block_size  # the span's offset in block
            end = start + hi - lo
            self.open_block_queries[:, :, start:end] = query[:, :, lo:hi]
            so_far = self.open_block_queries[:, :, :end].contiguous()
            self.block_query_buffer[:, :, block] = ops.coarsen(so_far, self.block_size,
                                                               ops.MAX_L2)[:, :, 0]
            if end == self.block_size:
                closed.append(ties.tie_decided(so_far, self.block_size))
        return torch.cat(closed, dim=-1) if closed else query.new_zeros(b, h, 0, dtype=torch.bool)

    def note_recent_queries(self, query: torch.Tensor) -> None:
        """Appends a chunk of post-RoPE queries [B, Hq, c, d] to the rolling buffer of the
        last recent_query_window queries (oldest first; the oldest fall out)."""
        b, h, chunk, d = query.shape
        window = self.recent_query_window
        if self.recent_query_buffer is None:
            self.recent_query_buffer = query.new_empty(b, h, window, d)
        buffer, count = self.recent_query_buffer, self.recent_query_count
        incoming = min(chunk, window)
        survivors = min(count, window - incoming)
        if survivors and count > survivors:  # slide the survivors to the front
            buffer[:, :, :survivors] = buffer[:, :, count - survivors:count].clone()
        buffer[:, :, survivors:survivors + incoming] = query[:, :, chunk - incoming:]
        self.recent_query_count = survivors + incoming

    def state(self, budget: int, scale: float, layer_idx: int, window_idx: int,
              seed: int, keys: Optional[torch.Tensor] = None,
              recent_query_window: Optional[int] = None, softcap: float = 0.0) -> KVState:
        """What a kv rule reads: views of the live entries, no copies (block_queries is None
        unless note_queries ran; mean-pooled ones are divided out here). `keys`: the live keys
        as attended when the buffer holds them un-rotated (positions="cache").
        recent_query_window: the rule's own window, when the layer keeps more recent queries
        (a dense prefill captured for several methods): the newest that many. softcap: the
        layer's logit soft-cap, for rules that compute its softmax (KVState.logits)."""
        block_queries = None
        if self.block_query_buffer is not None:
            block_queries = self.block_query_buffer[:, :, :self.blocks_seen]
            if self.block_query_pooling == "mean":
                counts = self.block_query_count[:self.blocks_seen, None]
                block_queries = (block_queries / counts).to(self.key_buffer.dtype)
        recent_queries = None
        if self.recent_query_buffer is not None:
            count = self.recent_query_count
            first = 0 if recent_query_window is None else max(count - recent_query_window, 0)
            recent_queries = self.recent_query_buffer[:, :, first:count]
        return KVState(keys=self.keys if keys is None else keys, positions=self.positions,
                       mass=self.mass, block_queries=block_queries,
                       budget=budget, block_size=self.block_size, scale=scale,
                       layer_idx=layer_idx, window_idx=window_idx, seed=seed,
                       recent_queries=recent_queries, lengths=self.length_tensor,
                       softcap=softcap)

    def compact(self, keep: torch.Tensor) -> None:
        """Keeps entries keep [B, Hkv, n'] (sorted, unique, int64) of every head, in place."""
        keep = keep.contiguous()
        for buffer in (self.key_buffer, self.value_buffer, self.position_buffer,
                       self.mass_buffer):
            ops.kv_compact_(buffer, keep)
        self.head_lengths = self.length_tensor = None
        self._set_length(keep.shape[-1])

    def compact_ragged(self, index: torch.Tensor, counts: list) -> None:
        """Keeps index[b, g, :counts[b][g]] (sorted, unique, int64; counts [B][Hkv] ints on
        the host) of each head: one count for every head compacts as compact() does, in place
        with ops.kv_compact_; different counts gather each head's kept entries (its slots past
        its count read its first kept entry, a stale copy) and write them to the front."""
        flat = [n for row in counts for n in row]
        if min(flat) == max(flat):
            self.compact(index[..., :flat[0]])
            return
        width = max(flat)
        index = index[..., :width]
        count_tensor = torch.tensor(counts, dtype=torch.long, device=index.device)
        live = torch.arange(width, device=index.device) < count_tensor[..., None]
        index = torch.where(live, index, index[..., :1])
        for buffer in (self.key_buffer, self.value_buffer, self.position_buffer,
                       self.mass_buffer):
            buffer[:, :, :width] = buffer.gather(2, _along_entries(index, buffer))
        self._set_head_lengths([list(row) for row in counts])
    def copy(self, capacity: int) -> "EvictingLayer":
        """A layer holding this one's live entries and tracked queries, with room for
        `capacity` entries per head (at least its longest head's)."""
        copied = EvictingLayer(capacity, self.block_size, self.num_blocks,
                               self.block_query_pooling, self.recent_query_window,
                               self.page_bounds)
        if not self.is_initialized:
            return copied
        if capacity < self.length:
            raise ValueError(f"a copy with room for {capacity} entries cannot hold the "
                             f"{self.length} this layer holds")
        copied.device, copied.is_initialized = self.device, True
        for name in ("key_buffer", "value_buffer", "position_buffer", "mass_buffer"):
            old = getattr(self, name)
            new = old.new_empty(*old.shape[:2], capacity, *old.shape[3:])
            new[:, :, :self.length] = old[:, :, :self.length]
            setattr(copied, name, new)
        for name in ("block_query_buffer", "block_query_count", "open_block_queries",
                     "recent_query_buffer", "page_min", "page_max"):
            value = getattr(self, name)
            setattr(copied, name, None if value is None else value.clone())
        copied.blocks_seen, copied.recent_query_count = self.blocks_seen, self.recent_query_count
        if self.head_lengths is not None:
            copied._set_head_lengths([list(row) for row in self.head_lengths])
        else:
            copied._set_length(self.length)
        return copied

    def nbytes(self) -> int:
        """Bytes its buffers hold."""
        return sum(t.numel() * t.element_size() for t in (
            self.key_buffer, self.value_buffer, self.position_buffer, self.mass_buffer,
            self.block_query_buffer, self.block_query_count, self.open_block_queries,
            self.recent_query_buffer, self.page_min, self.page_max) if t is not None)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.capacity

    def reset(self) -> None:
        self.length = 0
        self.head_lengths = self.length_tensor = None
        self.blocks_seen = 0
        self.recent_query_count = 0
        if self.is_initialized:
            self._set_length(0)
        if self.block_query_buffer is not None:
            self.block_query_buffer.zero_()
        if self.block_query_count is not None:
            self.block_query_count.zero_()
        if self.page_min is not None:
            self.page_min.fill_(float("inf"))
            self.page_max.fill_(float("-inf"))


def _along_entries(index: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """index [B, H, m] expanded over the buffer's trailing dims, for gather/scatter_ on dim 2."""
    shape = (*index.shape, *buffer.shape[3:])
    return index.view(*index.shape, *([1] * (buffer.dim() - 3))).expand(shape)


class KVEvictionCache(Cache):
    """Per-layer EvictingLayers for one sequence of `length` tokens, layer l with room for
    capacities[l] entries per KV head (the protocol sizes them: the kv protocol its budget
    and a chunk, the prefill protocol a context and its continuation; under kv_mode "select"
    the whole sequence, whose pages' key bounds the layers then track).

    Before each forward, `begin_chunk(positions)` tells the cache the absolute positions of
    the tokens the forward appends (transformers' update() does not pass them).
    """

    def __init__(self, capacities: list, block_size: int, length: int,
                 block_query_pooling: Optional[str] = None,
                 recent_query_window: Optional[int] = None, kv_mode: str = "evict"):
        if not capacities or min(capacities) < 1:
            raise ValueError(f"each layer's capacity ({capacities}) must be at least 1")
        if kv_mode not in KV_MODES:
            raise ValueError(f"kv_mode {kv_mode!r} is not valid; valid: {', '.join(KV_MODES)}")
        self.length = length
        num_blocks = math.ceil(length / block_size)
        super().__init__(layers=[EvictingLayer(capacity, block_size, num_blocks,
                                               block_query_pooling, recent_query_window,
                                               page_bounds=kv_mode == "select")
                                 for capacity in capacities])
        self.chunk_positions: Optional[torch.Tensor] = None

    def begin_chunk(self, positions: torch.Tensor) -> None:
        """positions [B, c] int64: absolute positions of the next forward's tokens."""
        self.chunk_positions = positions

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args, **kwargs):
        return self.layers[layer_idx].update(key_states, value_states,
                                             positions=self.chunk_positions)

    def copy(self, capacities: list, length: int) -> "KVEvictionCache":
        """A cache of a sequence of `length` tokens holding what this one holds (live entries,
        block queries, recent queries), layer l with room for capacities[l] entries: the
        prefill protocol compresses a copy of a shared dense prefill."""
        copied = KVEvictionCache.__new__(KVEvictionCache)
        Cache.__init__(copied, layers=[layer.copy(capacity)
                                       for layer, capacity in zip(self.layers, capacities)])
        copied.length, copied.chunk_positions = length, None
        return copied

    def nbytes(self) -> int:
        """Bytes its layers' buffers hold."""
        return sum(layer.nbytes() for layer in self.layers)
