"""The kv protocol (docs/protocols.md, KV): teacher-forced streaming through an evicting KV cache,
and the streaming machinery it shares with the prefill protocol (StreamingProtocol).

Inside `with KVProtocol(model, method, sparsity) as stats:`, `model(input_ids, labels=...)`
scores each window as a stream: the first min(K, L) tokens are prefilled densely, the rest
are fed in chunks of `kv_chunk` tokens, and after a chunk passes a layer that layer's cache is
evicted down to K entries per KV head by `method.kv_keep`. The loss counts every prediction,
prefill included.

RoPE positions (`positions`): "absolute" (default) rotates every token at its true position
(position_ids are passed explicitly), so a window cannot exceed the model's positions.
"cache" is StreamingLLM's pos-shift: a cached entry is rotated at its index inside the cache,
so positions never exceed K + c - 1 and a stream can run past the model's window. The cache
holds keys *before* rotation (the model is run at position 0, where its rotary embedding is the
identity) and every attention step rotates the live keys at 0..n-1 and the chunk's queries at
their indices, with the model's own rotary embedding. Rotating on every step rather than
re-rotating stored keys by the shift at each eviction costs one elementwise pass over the
cache per layer and chunk (small next to attention's c x n x Hq dot products) and keeps each
key exactly one rounding away from its un-rotated value, however long the stream: re-rotation
by deltas would compound one rounding per eviction (thousands over a 32K-token stream, visible
in bf16). Methods still see each entry's absolute position (token identity: sinks, blocks) and
the keys as they were attended, rotated at their cache indices.

Attention runs through a function registered with transformers' AttentionInterface, so no
model code is edited: it calls ops.attention_with_scores (output and the H2O mass in one pass),
folds the mass and the chunk's queries (coarse block queries, the recent-query buffer: each only
for a method that reads it) into the layer's cache and evicts. The method's kv_keep
is the only rule; the protocol has no method-specific code.

A rule may give KV heads different numbers of entries (a RaggedKeep whose counts average to at
most the layer's budget; docs/baselines.md, per-head budgets). While the heads' lengths differ,
a chunk attends per run of neighbouring KV heads of equal length in each batch row (one
ops.attention_with_scores call over those heads' live entries), and the kept pairs are counted
per KV head; when they agree again the single call over every head is back. A layer is
evicted once a batch row holds more than its budget per KV head on average.

A method whose kv_mode is "select" (Quest's setting) is never evicted from: the cache keeps
every token, and each chunk attends to its own pages (blocks of block_size positions) plus the
ceil(K_l / B) - 1 older pages each query head's kv_select picks (K_l: the layer's budget,
Method.layer_budget), so memory grows with the window while the attended keys stay bounded.
Every record says which mode ran (kv_mode; see docs/baselines.md, select mode).
"""
import functools
import math
import sys
from dataclasses import dataclass
from typing import ClassVar, Optional, Union

import torch
from tqdm.auto import tqdm
from transformers import AttentionInterface
from transformers.modeling_outputs import CausalLMOutputWithPast

from . import ops, ties
from .checks import Option, positive_int
from .grid import resolve_block_size
from .kv_cache import KVEvictionCache
from .methods import KVPages, Method, RaggedKeep
from .protocol import (CONTEXT_KWARG, LayerAttention, Protocol, cache_keyword,
                       check_max_new_tokens)
from .reference import default_scale
from .stats import ProtocolStats

ATTENTION_NAME = "cabattn_kv"
POSITIONS = ("absolute", "cache")
# The keyword that carries a window's stream from the model's forward down to the attention
# function: transformers forwards unknown keyword arguments to the attention interface.
_STREAM_KWARG = "cabattn_kv_stream"


def _kv_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                  **kwargs):
    stream = kwargs.get(_STREAM_KWARG)
    if stream is None:
        raise RuntimeError(f"attention implementation {ATTENTION_NAME!r} only runs inside "
                           "cabattn's kv or prefill protocol (it needs the protocol's cache)")
    if dropout:
        raise ValueError(f"the kv protocol evaluates a model; got attention dropout {dropout} "
                         "(call model.eval())")
    if attention_mask is not None:
        raise ValueError("the kv protocol streams unpadded windows; got an attention mask")
    return stream.attend(module.layer_idx, query, key, value, scaling)


AttentionInterface.register(ATTENTION_NAME, _kv_attention)


class _WindowStream:
    """The state of one window's streaming pass: its cache and per-layer pair counts."""

    def __init__(self, protocol: "StreamingProtocol", cache: KVEvictionCache, window_idx: int):
        self.protocol, self.cache, self.window_idx = protocol, cache, window_idx
        self.first_position = 0
        self.evicting = True  # evict after each step (the prefill protocol's steps do not)
        self.scales = [None] * len(cache.layers)  # each layer's attention scale, once seen
        self.kept_pairs = [0] * len(cache.layers)  # per (batch row, query head)
        # steps whose KV heads held different numbers of entries: per layer, per KV head,
        # summed over the batch rows
        self.head_pairs = [None] * len(cache.layers)
        # positions="cache": (cos, sin) [1, n, d] of cache indices 0..n-1, the model's function
        # that rotates by them, its rotary embedding and a tensor of the model's dtype
        self.rope = None
        self.rotate = self.rotary_emb = self.like = None

    def use_cache_positions(self, rotary_emb, rotate, like: torch.Tensor) -> None:
        """like: a tensor of the model's dtype and device."""
        self.rotary_emb, self.rotate, self.like = rotary_emb, rotate, like
        self.rope_upto(self.cache.layers[0].capacity)

    def rope_upto(self, n: int):
        """(cos, sin) of cache indices 0..n-1 at least (recomputed when a ragged cache grew)."""
        if self.rope is None or self.rope[0].shape[1] < n:
            indices = torch.arange(n, device=self.like.device)
            self.rope = self.rotary_emb(self.like, indices[None])  # batch 1 broadcasts
        return self.rope

    def attend(self, layer_idx: int, query, key, value, scale: Optional[float]):
        protocol, layer = self.protocol, self.cache.layers[layer_idx]
        scale = default_scale(query.shape[-1]) if scale is None else scale
        self.scales[layer_idx] = scale
        timing = protocol.stats.timing
        ragged = layer.head_lengths is not None
        if self.rope is not None:  # positions="cache": rotate at the entries' cache indices
            n, chunk = key.shape[2], query.shape[2]
            cos, sin = self.rope_upto(n)
            if not ragged:  # a ragged cache's queries sit at their own heads' indices
                query = self.rotate(query, cos[:, n - chunk:n], sin[:, n - chunk:n])
            key = self.rotate(key, cos[:, :n], sin[:, :n])
        features = protocol.layers[layer_idx]
        # a sliding-window layer attends within its window and keeps it (never ragged, never
        # selecting pages): docs/protocols.md, models beyond Llama
        if protocol.method.kv_mode == "select" and not features.window:
            return self.attend_selected(layer_idx, query, key, value, scale, features)
        with timing("attention", query.device):
            if ragged:
                out, mass, query = self.attend_ragged(layer_idx, query, key, value, scale,
                                                      features.softcap)
            else:
                # A full buffer view is contiguous; a partial one (prefill, last chunk) is
                # copied.
                out, _, mass = ops.attention_with_scores(query.contiguous(), key.contiguous(),
                                                         value.contiguous(), scale,
                                                         features.softcap, features.window)
        with timing("selection", query.device):
            layer.add_mass(mass)
            if layer.block_query_pooling is not None:
                closed = layer.note_queries(query, self.first_position)
                if closed is not None:  # max_l2: the blocks' tie diagnostics
                    protocol.stats.add_pooling_ties(closed.sum(), closed.numel())
            if layer.recent_query_window is not None:
                layer.note_recent_queries(query)
            if not ragged:
                self.kept_pairs[layer_idx] += features.pairs(query.shape[2], layer.length)
            if self.evicting:
                self.evict(layer_idx, key, scale)
        return out.transpose(1, 2), None

    def evict(self, layer_idx: int, keys, scale: float) -> None:
        """Evicts layer `layer_idx`'s cache down to its budget with the method's kv_keep when
        it holds more (keys: the live keys as attended), then counts what the cache holds."""
        protocol, layer = self.protocol, self.cache.layers[layer_idx]
        budget = protocol.layer_budgets[layer_idx]
        features = protocol.layers[layer_idx]
        if layer.over_budget(budget) and features.window:  # the model's window, no rule
            n = layer.length
            newest = torch.arange(n - budget, n, device=keys.device)
            layer.compact(newest.expand(*layer.positions.shape[:2], -1).contiguous())
        elif layer.over_budget(budget):
            ragged = layer.head_lengths is not None
            keep = protocol.method.kv_keep(layer.state(
                budget, scale, layer_idx, self.window_idx, protocol.seed, keys=keys,
                recent_query_window=protocol.method.recent_query_window,
                softcap=features.softcap))
            if protocol.method.block_query_pooling == "max_l2" and not ragged:
                # its rule pools the cached key blocks by max_l2 too (as in the mask
                # protocol): their tie diagnostics, at every eviction
                decided = ties.tie_decided(keys, layer.block_size)
                protocol.stats.add_pooling_ties(decided.sum(), decided.numel())
            if isinstance(keep, RaggedKeep) or ragged:
                counts = protocol.check_ragged_keep(keep, layer, layer_idx, budget)
                layer.compact_ragged(keep.index if isinstance(keep, RaggedKeep) else keep,
                                     counts)
            else:
                protocol.check_keep(keep, layer.positions.shape, layer_idx, budget)
                layer.compact(keep)
        # ascending per KV head: [..., 0] oldest, a head's last live entry its newest
        positions, live = layer.positions, layer.live_mask()
        protocol.stats.add_sink((positions[..., 0] == 0).sum(), positions[..., 0].numel())
        if live is None:
            protocol.stats.add_cached_age((positions[..., -1:] - positions).sum(),
                                          positions.numel())
        else:
            newest = positions.gather(-1, layer.length_tensor[..., None] - 1)
            protocol.stats.add_cached_age(((newest - positions) * live).sum(),
                                          sum(map(sum, layer.head_lengths)))

    def attend_ragged(self, layer_idx: int, query, key, value, scale: float, softcap: float):
        """The chunk's attention when the KV heads hold different numbers of entries: per
        batch row, one ops.attention_with_scores call per run of neighbouring KV heads of equal
        length, over their live entries (the chunk last). Returns (out [B, Hq, c, d], mass
        [B, Hkv, n] float32, 0 past each head's entries, the queries as attended) and counts
        the kept pairs per KV head."""
        layer = self.cache.layers[layer_idx]
        b, hq, chunk, _ = query.shape
        hkv = key.shape[1]
        group = hq // hkv
        out = query.new_empty(b, hq, chunk, value.shape[-1])
        mass = torch.zeros(b, hkv, key.shape[2], dtype=torch.float32, device=query.device)
        attended = query if self.rope is None else torch.empty_like(query)
        pairs = self.head_pairs[layer_idx]
        if pairs is None:
            pairs = self.head_pairs[layer_idx] = [0] * hkv
        for row, lengths in enumerate(layer.head_lengths):
            first = 0
            while first < hkv:
                n = lengths[first]
                last = first + 1
                while last < hkv and lengths[last] == n:
                    last += 1
                heads = slice(first * group, last * group)
                q = query[row:row + 1, heads]
                if self.rope is not None:
                    cos, sin = self.rope
                    q = self.rotate(q, cos[:, n - chunk:n], sin[:, n - chunk:n])
                    attended[row:row + 1, heads] = q
                o, _, m = ops.attention_with_scores(
                    q.contiguous(), key[row:row + 1, first:last, :n].contiguous(),
                    value[row:row + 1, first:last, :n].contiguous(), scale, softcap)
                out[row:row + 1, heads] = o
                mass[row:row + 1, first:last, :n] = m
                for g in range(first, last):
                    pairs[g] += chunk * (n - chunk) + chunk * (chunk + 1) // 2
                first = last
        return out, mass, attended

    def attend_selected(self, layer_idx: int, query, key, value, scale: float,
                        features: LayerAttention):
        """kv_mode "select": the chunk attends to its own pages and the method's picks among
        the older ones (every older page while they fit the layer budget's ceil(K_l / B) - 1)."""
        protocol, layer = self.protocol, self.cache.layers[layer_idx]
        timing = protocol.stats.timing
        chunk, n, bs = query.shape[2], key.shape[2], layer.block_size
        first_page = (n - chunk) // bs  # the page of the chunk's first token
        # the layer's own budget (Method.layer_budget) bounds its attended keys
        n_pick = math.ceil(protocol.layer_budgets[layer_idx] / bs) - 1
        with timing("selection", query.device):
            layer.note_keys(key[:, :, n - chunk:], n - chunk)
            if first_page > n_pick:
                pages = protocol.method.kv_select(KVPages(
                    query, layer.page_min[:, :, :first_page], layer.page_max[:, :, :first_page],
                    n_pick, bs, scale, layer_idx, self.window_idx))
                protocol.check_pages(pages, query.shape[:2], n_pick, first_page, layer_idx)
                # per query head: the picked pages' tokens, then the chunk's own pages
                picked = (pages[..., None] * bs + torch.arange(bs, device=pages.device))
                own = torch.arange(first_page * bs, n, device=pages.device)
                index = torch.cat([picked.flatten(2), own.expand(*pages.shape[:2], -1)], -1)
                key, value = (_gather_per_query_head(x, index) for x in (key, value))
        with timing("attention", query.device):
            out, _, _ = ops.attention_with_scores(query.contiguous(), key.contiguous(),
                                                  value.contiguous(), scale, features.softcap)
        # the chunk's queries against the picked keys they saw (the chunk's own causally)
        self.kept_pairs[layer_idx] += features.pairs(chunk, key.shape[2])
        return out.transpose(1, 2), None


def _gather_per_query_head(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, Hkv, n, d] read at index [B, Hq, m] (query head h reads KV head h // group):
    [B, Hq, m, d], one gather, without expanding x to the query heads."""
    b, hq, m = index.shape
    hkv, d = x.shape[1], x.shape[-1]
    flat = index.reshape(b, hkv, hq // hkv * m)
    return x.gather(2, flat[..., None].expand(-1, -1, -1, d)).view(b, hq, m, d)


def _rotary_embedding(model):
    """(rotary embedding module, rotate(x, cos, sin)) of the model, for positions="cache"."""
    found = [m for name, m in model.named_modules() if name.split(".")[-1] == "rotary_emb"]
    modeling = sys.modules[type(model).__module__]
    apply = getattr(modeling, "apply_rotary_pos_emb", None)
    if len(found) != 1 or apply is None:
        raise ValueError(f"positions='cache' needs a model with one rotary_emb module and "
                         f"{type(model).__module__}.apply_rotary_pos_emb (RoPE models such as "
                         f"Llama); {type(model).__name__} has neither or several; use "
                         "positions='absolute'")
    rotary_emb = found[0]
    scaling = getattr(rotary_emb, "attention_scaling", 1.0)
    if scaling != 1.0:
        raise ValueError(f"positions='cache' runs the model at position 0 to get un-rotated "
                         f"keys, which needs a rotary embedding that is the identity there; "
                         f"this one scales by attention_scaling={scaling}; use "
                         "positions='absolute'")
    return rotary_emb, functools.partial(_rotate_one, apply)


def _rotate_one(apply, x, cos, sin):
    """The model's apply_rotary_pos_emb on one tensor (it rotates a (q, k) pair at the same
    positions; here queries and keys sit at different cache indices)."""
    return apply(x, x, cos, sin)[0]


@dataclass
class _Run:
    """One sequence being fed through the model: its cache and stream, and the positions of
    its tokens (true ones, and those the model is run at)."""
    cache: KVEvictionCache
    stream: _WindowStream
    positions: torch.Tensor  # [B, length] absolute
    model_positions: torch.Tensor  # what the model rotates at (0 under positions="cache")


class StreamingProtocol(Protocol):
    """What the kv and prefill protocols share: a context manager that replaces the model's
    forward with one that feeds each sequence through the model in steps over a
    KVEvictionCache (cabattn.kv_cache), every layer attending through this module's registered
    attention function (ops.attention_with_scores over the cache and the step's tokens, the
    method's kv_keep evicting); __enter__ returns the ProtocolStats the sequences add to.

    A subclass says how a sequence begins (`_open`: the tokens fed before the rest, and
    whether and when the cache is evicted to its budget), how the rest is cut into steps
    (`_chunks`) and whether those steps evict (`EVICTS_AFTER_OPEN`).

    keep_logits: False scores a sequence without holding its [L, vocab] logits (a long
    stream's do not fit in memory): the forward then needs labels, returns logits=None and the
    loss, and leaves the NLL of every counted prediction in `token_nll` float32.
    progress: a tqdm bar over each sequence's tokens (long streams).
    """
    EVICTS_AFTER_OPEN: ClassVar[bool] = True

    def __init__(self, model, method, sparsity, *, positions: str, keep_logits: bool,
                 progress: bool, options: dict, **shared):
        if positions not in POSITIONS:
            raise ValueError(f"positions {positions!r} is not supported; valid choices: "
                             f"{', '.join(POSITIONS)}")
        super().__init__(model, method, sparsity, options=options, **shared)
        self.positions, self.keep_logits, self.progress = positions, keep_logits, progress
        self.token_nll: Optional[torch.Tensor] = None
        self.rotary_emb, self.rotate = ((None, None) if positions == "absolute"
                                        else _rotary_embedding(model))
        if positions != "absolute":  # recorded when used; absolute records stay as they were
            self.stats.options["positions"] = positions
        self.stats.kv_mode = self.method.kv_mode
        self.budget = 0  # K of the sequence being scored
        self.layer_budgets = []  # K_l of each layer for that sequence
        self.cache: Optional[KVEvictionCache] = None  # the sequence being (or last) scored
        self.windows_seen = 0
        self._saved = None

    # -- entering and leaving -------------------------------------------------------------
    def __enter__(self) -> ProtocolStats:
        if self._saved is not None:
            raise RuntimeError(f"this {type(self).__name__} is already active")
        model = self.model
        self.read_layers()
        if self.rotary_emb is not None and any(f.window for f in self.layers):
            raise ValueError("positions='cache' re-indexes a cache whose layers keep different "
                             "windows of the model's sliding-window attention; use "
                             "positions='absolute'")
        self._saved = (model.__dict__.get("forward"), model.config._attn_implementation)
        self._model_forward = model.forward
        self._cache_kwarg = cache_keyword(model)
        model.set_attn_implementation(ATTENTION_NAME)
        model.forward = self._forward
        return self.stats

    def __exit__(self, *exc) -> bool:
        own_forward, attn_implementation = self._saved
        model = self.model
        if own_forward is None:
            del model.forward
        else:
            model.forward = own_forward
        model.set_attn_implementation(attn_implementation)
        self._saved = None
        return False

    # -- what a subclass says -------------------------------------------------------------
    def _budget_length(self, length: int, context: Optional[int]) -> int:
        """The length a sequence's token budget and block size are sized for, given the
        sequence's (or the window a generation is sized as: generate's budget_length)."""
        return length

    def _capacities(self, length: int, context: Optional[int]) -> list:
        """Entries each layer's cache must have room for."""
        raise NotImplementedError

    def _tracking(self) -> tuple:
        """(recent query window, block query pooling) the cache tracks: the method's."""
        return self.method.recent_query_window, self.method.block_query_pooling

    def _open(self, run: _Run, input_ids: torch.Tensor, context: Optional[int], first: int):
        """Feeds the sequence's first tokens; returns (tokens fed, logits of the positions
        from `first` on among them, or None)."""
        raise NotImplementedError

    def _chunks(self, start: int, end: int) -> list:
        """The steps (start, end) that feed tokens start..end-1 after the opening."""
        raise NotImplementedError

    # -- one sequence ---------------------------------------------------------------------
    def _forward(self, input_ids: torch.Tensor = None, labels: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None,
                 context_length: Optional[int] = None, **kwargs):
        unsupported = sorted(k for k, v in kwargs.items() if v is not None)
        if unsupported:
            raise TypeError(f"under the {self.name} protocol the model takes input_ids, labels, "
                            f"an all-ones attention_mask and {CONTEXT_KWARG}; got {unsupported}")
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError(f"the {self.name} protocol needs input_ids [batch, length]")
        if not self.keep_logits and labels is None:
            raise ValueError(f"a {type(self).__name__} with keep_logits=False scores windows: "
                             "it needs labels")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(f"the {self.name} protocol streams unpadded windows; the "
                             "attention_mask has padding (zeros)")
        batch, length = input_ids.shape
        context = self.context_of(length, context_length)
        first = self._first_logit(context)
        run = self._begin(input_ids, length, self._budget_length(length, context), context)
        pieces = []

        def keep(logits, start, end):
            """The logits of positions start..end-1 (those from `first` on), or their NLL."""
            if logits is None:
                return
            start = end - logits.shape[1]
            if self.keep_logits:
                pieces.append(logits)
            else:  # predictions start..end-1 of tokens start+1..end (the last has none)
                predicted = labels[:, start + 1:end + 1]
                pieces.append(torch.nn.functional.cross_entropy(
                    logits[:, :predicted.shape[1]].float().transpose(1, 2), predicted,
                    reduction="none"))

        bar = tqdm(total=length, desc=f"{self.method.name} stream", unit="token",
                   disable=not self.progress, leave=False)
        # the operators on the chosen path; the CUDA kernels' input checks are read back once
        # per sequence, not per layer and step
        with torch.no_grad(), ops.use_kernels(self.kernels), ops.deferred_checks(), bar:
            fed, logits = self._open(run, input_ids, context, first)
            keep(logits, 0, fed)
            bar.update(fed)
            for start, end in self._chunks(fed, length):
                keep(self._step(run, input_ids[:, start:end], start, end, first,
                                self.EVICTS_AFTER_OPEN), start, end)
                bar.update(end - start)
        self._record_pairs(run.stream, batch, self._counted_from(context), length)
        self.windows_seen += batch  # row b of the batch was window windows_seen + b
        model = self.model
        if not self.keep_logits:
            self.token_nll = torch.cat(pieces, dim=1)
            return CausalLMOutputWithPast(loss=self.token_nll.mean(), logits=None)
        logits = torch.cat(pieces, dim=1)
        loss = None
        if labels is not None:
            loss = model.loss_function(logits=logits, labels=labels[:, first:],
                                       vocab_size=model.config.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def _first_logit(self, context: Optional[int]) -> int:
        """The first position whose logits the forward returns (cabattn.protocol)."""
        return 0

    def _counted_from(self, context: Optional[int]) -> int:
        """The first query position the realised density counts (docs/protocols.md)."""
        return 0

    def _begin(self, input_ids: torch.Tensor, length: int, budget_length: int,
               context: Optional[int]) -> _Run:
        """A sequence of `length` tokens whose first input_ids.shape[1] are given: its budget
        (from `budget_length` tokens), cache, stream and positions."""
        batch = input_ids.shape[0]
        self.budget = self.stats.budget_tokens = self.method.token_budget(
            budget_length, self.sparsity, self.k_min)
        block_size = self.stats.block_size = resolve_block_size(self.block_size, budget_length)
        layers = self.model.config.num_hidden_layers
        # a sliding-window layer keeps the model's window; the method's budget is the others'
        self.layer_budgets = [features.window or self.method.layer_budget(
            self.budget, layer, layers, budget_length)
            for layer, features in enumerate(self.layers)]
        window, pooling = self._tracking()
        self.cache = cache = KVEvictionCache(self._capacities(length, context), block_size,
                                             length, pooling, window, self.method.kv_mode)
        stream = _WindowStream(self, cache, self.windows_seen)
        positions = torch.arange(length, device=input_ids.device).expand(batch, length)
        if self.rotary_emb is not None:
            stream.use_cache_positions(self.rotary_emb, self.rotate,
                                       self.model.get_input_embeddings().weight)
            # the model rotates at position 0 (the identity): the cache keeps un-rotated keys
            model_positions = torch.zeros_like(positions)
        else:
            model_positions = positions
        return _Run(cache, stream, positions, model_positions)

    def _step(self, run: _Run, chunk_ids, start: int, end: int, first: int, evicting: bool):
        """One step (tokens start..end-1) through the model, evicting inside when asked;
        returns the logits of its positions from `first` on (None when it has none)."""
        wanted = end - max(start, first)
        run.cache.begin_chunk(run.positions[:, start:end])
        run.stream.first_position, run.stream.evicting = start, evicting
        out = self._model_forward(input_ids=chunk_ids,
                                  position_ids=run.model_positions[:, start:end],
                                  use_cache=True, logits_to_keep=max(wanted, 1),
                                  **{self._cache_kwarg: run.cache, _STREAM_KWARG: run.stream})
        return out.logits if wanted > 0 else None

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int,
                 budget_length: Optional[int] = None,
                 context_length: Optional[int] = None) -> torch.Tensor:
        """Greedy decoding (cabattn.protocol.Protocol.generate): the prompt is fed as a
        sequence of the same split is, then each new token as a step of its own, evicting
        when the protocol's steps after the opening evict (kv: decode-time eviction, memory
        bounded throughout; prefill: nothing more is evicted). With kv_chunk=1 and
        budget_length equal to the length of a teacher-forced window, the tokens a generation
        is fed reproduce that window's stream step for step."""
        if self._saved is None:
            raise RuntimeError(f"{type(self).__name__}.generate runs inside "
                               f"`with {type(self).__name__}(...)`")
        check_max_new_tokens(max_new_tokens)
        batch, given = input_ids.shape
        length = given + max_new_tokens
        context = self.context_of(given, context_length)
        run = self._begin(input_ids, length,
                          self._budget_length(budget_length or length, context), context)
        last = given - 1
        with torch.no_grad(), ops.use_kernels(self.kernels), ops.deferred_checks():
            fed, logits = self._open(run, input_ids, context, last)
            for start, end in self._chunks(fed, given):
                logits = self._step(run, input_ids[:, start:end], start, end, last,
                                    self.EVICTS_AFTER_OPEN)
            new_tokens = [logits[:, -1].argmax(-1, keepdim=True)]
            for position in range(given, length - 1):
                logits = self._step(run, new_tokens[-1], position, position + 1, position,
                                    self.EVICTS_AFTER_OPEN)
                new_tokens.append(logits[:, -1].argmax(-1, keepdim=True))
        self._record_pairs(run.stream, batch, self._counted_from(context), length - 1)
        self.windows_seen += batch
        return torch.cat(new_tokens, dim=1)

    def _record_pairs(self, stream: _WindowStream, batch: int, first: int, end: int) -> None:
        """The pairs the stream kept against the causal pairs of query positions first..end-1."""
        heads = self.model.config.num_attention_heads
        causal = torch.full((heads,), float(batch * (end * (end + 1) - first * (first + 1)) // 2),
                            dtype=torch.float64)
        for layer_idx, kept in enumerate(stream.kept_pairs):
            pairs = torch.full((heads,), float(batch * kept), dtype=torch.float64)
            per_kv_head = stream.head_pairs[layer_idx]
            if per_kv_head is not None:  # query head h read KV head h // group
                pairs += torch.tensor(per_kv_head, dtype=torch.float64).repeat_interleave(
                    heads // len(per_kv_head))
            # a sliding-window layer kept the model's own pairs: it counts against those
            self.stats.add_pairs(layer_idx, pairs, pairs if self.layers[layer_idx].window
                                 else causal)

    def check_pages(self, pages: torch.Tensor, heads_shape, n_pick: int, candidates: int,
                    layer_idx: int) -> None:
        """A select rule's picks: int64 [B, Hq, n_pick], distinct pages of 0..candidates-1."""
        ordered = pages.sort(dim=-1).values if pages.dim() == 3 else pages
        if (pages.dtype != torch.long or pages.dim() != 3
                or tuple(pages.shape) != (*heads_shape, n_pick)
                or bool((ordered[..., 1:] == ordered[..., :-1]).any())
                or (pages.numel() and (int(pages.min()) < 0
                                       or int(pages.max()) >= candidates))):
            raise RuntimeError(
                f"{self.method!r}.kv_select returned {pages.dtype} pages of shape "
                f"{tuple(pages.shape)} for layer {layer_idx}; expected distinct int64 pages "
                f"[{heads_shape[0]}, {heads_shape[1]}, {n_pick}] of 0..{candidates - 1}")

    def check_ragged_keep(self, keep, layer, layer_idx: int, budget: int) -> list:
        """A keep set of a layer whose KV heads hold (or will hold) different numbers of
        entries: a RaggedKeep, or plain indices into a ragged cache. Each head keeps 1..m
        ascending, unique entries of its live ones, at most Hkv * budget per batch row.
        Returns the counts [B][Hkv] as host ints (one read of the device per eviction)."""
        index = keep.index if isinstance(keep, RaggedKeep) else keep
        shape = tuple(layer.positions.shape[:2])
        counts = (keep.counts if isinstance(keep, RaggedKeep)
                  else torch.full(shape, index.shape[-1], dtype=torch.long,
                                  device=index.device))
        problem = None
        if (index.dtype != torch.long or index.dim() != 3 or tuple(index.shape[:2]) != shape
                or counts.dtype != torch.long or tuple(counts.shape) != shape):
            problem = (f"{index.dtype} indices of shape {tuple(index.shape)} and "
                       f"{counts.dtype} counts of shape {tuple(counts.shape)}")
        else:
            lengths = (layer.length_tensor if layer.length_tensor is not None
                       else torch.full(shape, layer.length, device=index.device))
            live = torch.arange(index.shape[-1], device=index.device) < counts[..., None]
            ascending = (index[..., 1:] > index[..., :-1]) | ~live[..., 1:]
            in_range = ((index >= 0) & (index < lengths[..., None])) | ~live
            host = counts.tolist()
            if min(min(row) for row in host) < 1 or max(max(row) for row in host) > index.shape[-1]:
                problem = f"counts {host} outside 1..{index.shape[-1]}"
            elif max(sum(row) for row in host) > shape[1] * budget:
                problem = f"counts {host} keep more than {shape[1]} x {budget} in a batch row"
            elif not bool(ascending.all() & in_range.all()):
                problem = "kept indices that are not ascending, unique live entries"
        if problem is not None:
            raise RuntimeError(
                f"{self.method!r}.kv_keep returned {problem} for layer {layer_idx}; expected "
                f"int64 indices [{shape[0]}, {shape[1]}, m] with int64 counts [{shape[0]}, "
                f"{shape[1]}] in 1..m, summing to at most {shape[1]} x {budget} (budget K) "
                "per batch row, each head's kept indices ascending and among its live entries")
        return host

    def check_keep(self, keep: torch.Tensor, live_shape, layer_idx: int, budget: int) -> None:
        """Shape, dtype and budget of a rule's keep indices (their order and range are
        checked by ops.kv_compact_)."""
        if (keep.dtype != torch.long or keep.dim() != 3 or keep.shape[:2] != live_shape[:2]
                or not 1 <= keep.shape[2] <= budget):
            raise RuntimeError(
                f"{self.method!r}.kv_keep returned {keep.dtype} indices of shape "
                f"{tuple(keep.shape)} for layer {layer_idx}; expected int64 "
                f"[{live_shape[0]}, {live_shape[1]}, 1..{budget}] (budget K = "
                f"{budget} of {live_shape[2]} cached entries)")


class KVProtocol(StreamingProtocol):
    """Context manager that makes `model(input_ids, labels=...)` return the kv-protocol
    result of each window; __enter__ returns the ProtocolStats the windows add to.

    method: a Method instance, or a registered method name built with **method_params.
    sparsity: s in [0, 1); the budget per KV head and layer is
    K = method.token_budget(L, s, k_min) (grid.token_budget; dense keeps everything), or
    method.layer_budget(K, layer, ...) for a method with per-layer budgets (their mean is K;
    the prefill is still the first min(K, L) tokens).
    kv_chunk: tokens per streaming step (1 = exact token-by-token streaming).
    positions: "absolute" (every token keeps its true position) or "cache" (StreamingLLM's
    pos-shift: RoPE at the entries' indices inside the cache, so a window may be longer than
    the model's positions; see the module's doc).
    block_size: "auto" (grid.auto_block_size(L)) or one of 16, 32, 64, 128: the block the
    block-level rules and the per-block coarse queries use.
    context_length: the whole window is streamed either way; with a split, only the
    continuation's predictions are returned and scored (cabattn.protocol).
    keep_logits, progress: StreamingProtocol.
    """

    name = "kv"
    # The protocol's own options, recorded with every cell next to the shared ones
    # (block_size, k_min).
    OPTIONS = (Option("kv_chunk", 1, "tokens fed per step (1: token by token, exact "
                      "streaming; larger chunks evict less often)", positive_int),
               ops.KERNEL_PATH_OPTION)

    def __init__(self, model, method: Union[Method, str], sparsity: float, kv_chunk: int = 1,
                 positions: str = "absolute", block_size: Union[int, str] = "auto",
                 k_min: int = 64, seed: int = 42, keep_logits: bool = True,
                 progress: bool = False, kernels: str = "extension",
                 context_length: Optional[int] = None, **method_params):
        super().__init__(model, method, sparsity, positions=positions, keep_logits=keep_logits,
                         progress=progress, options=dict(kv_chunk=kv_chunk, kernels=kernels),
                         block_size=block_size, k_min=k_min, seed=seed,
                         context_length=context_length, method_params=method_params)
        self.stats.context_attention = self.stats.continuation_attention = (
            "streamed through the cache, evicted after every step" if self.method.kv_mode ==
            "evict" else "streamed; each step attends to the pages the method selects")

    def _capacities(self, length: int, context: Optional[int]) -> list:
        if self.method.kv_mode == "select":  # nothing is evicted
            return [length] * len(self.layer_budgets)
        # the prefill (budget) or the layer's own budget, whichever is more, + a chunk
        return [max(self.budget, budget) + self.kv_chunk for budget in self.layer_budgets]

    def _open(self, run, input_ids, context, first):
        """The first min(K, given) tokens, prefilled densely (the cache is not full yet)."""
        fed = min(self.budget, input_ids.shape[1])
        return fed, self._step(run, input_ids[:, :fed], 0, fed, first, evicting=True)

    def _chunks(self, start: int, end: int) -> list:
        return [(first, min(first + self.kv_chunk, end))
                for first in range(start, end, self.kv_chunk)]
