"""The kv protocol (METHODS.md 1.3): teacher-forced streaming through an evicting KV cache.

Inside `with KVProtocol(model, method, sparsity) as stats:`, `model(input_ids, labels=...)`
scores each window as a stream: the first min(K, L) tokens are prefilled densely, the rest
are fed in chunks of `kv_chunk` tokens, and after a chunk passes a layer that layer's cache is
evicted down to K entries per KV head by `method.kv_keep`. Every token keeps its absolute
position (position_ids are passed explicitly). The loss counts every prediction, prefill
included.

Attention runs through a function registered with transformers' AttentionInterface, so no
model code is edited: it calls ops.attention_with_scores (output and the H2O mass in one pass),
folds the mass and the chunk's queries into the layer's cache and evicts. The method's kv_keep
is the only rule; the protocol has no method-specific code.
"""
import inspect
from typing import Optional, Union

import torch
from transformers import AttentionInterface
from transformers.modeling_outputs import CausalLMOutputWithPast

from . import ops
from .grid import check_options, resolve_block_size
from .kv_cache import KVEvictionCache
from .methods import Method
from .reference import default_scale
from .sparse import resolve_method
from .stats import ProtocolStats

ATTENTION_NAME = "cabattn_kv"
POSITIONS = ("absolute",)  # "cache" (StreamingLLM pos-shift) is not implemented, see below
# The keyword that carries a window's stream from the model's forward down to the attention
# function: transformers forwards unknown keyword arguments to the attention interface.
_STREAM_KWARG = "cabattn_kv_stream"


def _kv_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                  **kwargs):
    stream = kwargs.get(_STREAM_KWARG)
    if stream is None:
        raise RuntimeError(f"attention implementation {ATTENTION_NAME!r} only runs inside "
                           "cabattn.KVProtocol (it needs the protocol's evicting cache)")
    if dropout:
        raise ValueError(f"the kv protocol evaluates a model; got attention dropout {dropout} "
                         "(call model.eval())")
    if attention_mask is not None:
        raise ValueError("the kv protocol streams unpadded windows; got an attention mask")
    return stream.attend(module.layer_idx, query, key, value, scaling)


AttentionInterface.register(ATTENTION_NAME, _kv_attention)


class _WindowStream:
    """The state of one window's streaming pass: its cache and per-layer pair counts."""

    def __init__(self, protocol: "KVProtocol", cache: KVEvictionCache, window_idx: int):
        self.protocol, self.cache, self.window_idx = protocol, cache, window_idx
        self.first_position = 0
        self.kept_pairs = [0] * len(cache.layers)  # per (batch row, query head)

    def attend(self, layer_idx: int, query, key, value, scale: Optional[float]):
        protocol, layer = self.protocol, self.cache.layers[layer_idx]
        scale = default_scale(query.shape[-1]) if scale is None else scale
        timing = protocol.stats.timing
        with timing("attention", query.device):
            # A full buffer view is contiguous; a partial one (prefill, last chunk) is copied.
            out, _, mass = ops.attention_with_scores(query.contiguous(), key.contiguous(),
                                                     value.contiguous(), scale)
        with timing("selection", query.device):
            layer.add_mass(mass)
            if layer.block_query_pooling is not None:
                layer.note_queries(query, self.first_position)
            chunk, length = query.shape[2], layer.length
            self.kept_pairs[layer_idx] += chunk * (length - chunk) + chunk * (chunk + 1) // 2
            if length > protocol.budget:
                keep = protocol.method.kv_keep(layer.state(protocol.budget, scale, layer_idx,
                                                           self.window_idx, protocol.seed))
                protocol.check_keep(keep, layer.positions.shape, layer_idx)
                layer.compact(keep)
        positions = layer.positions  # ascending per KV head: [..., 0] oldest, [..., -1] newest
        protocol.stats.add_sink((positions[..., 0] == 0).sum(), positions[..., 0].numel())
        protocol.stats.add_cached_age((positions[..., -1:] - positions).sum(), positions.numel())
        return out.transpose(1, 2), None


class KVProtocol:
    """Context manager that makes `model(input_ids, labels=...)` return the kv-protocol
    result of each window; __enter__ returns the ProtocolStats the windows add to.

    method: a Method instance, or a registered method name built with **method_params.
    sparsity: s in [0, 1); the budget per KV head and layer is
    K = method.token_budget(L, s, k_min) (grid.token_budget; dense keeps everything).
    kv_chunk: tokens per streaming step (1 = exact token-by-token streaming).
    positions: "absolute" (every token keeps its true position).
    block_size: "auto" (grid.auto_block_size(L)) or one of 16, 32, 64, 128: the block the
    block-level rules and the per-block coarse queries use.
    """

    name = "kv"
    OPTIONS = ("kv_chunk",)  # recorded with every cell, next to the shared options

    def __init__(self, model, method: Union[Method, str], sparsity: float, kv_chunk: int = 1,
                 positions: str = "absolute", block_size: Union[int, str] = "auto",
                 k_min: int = 64, seed: int = 42, **method_params):
        check_options(sparsity, block_size, k_min)  # the options both protocols share
        if isinstance(kv_chunk, bool) or not isinstance(kv_chunk, int) or kv_chunk < 1:
            raise ValueError(f"kv_chunk {kv_chunk!r} must be a positive integer "
                             "(1 = token-by-token streaming)")
        if positions == "cache":
            raise ValueError("positions='cache' (StreamingLLM's pos-shift, which re-rotates "
                             "un-rotated cached keys at their cache index) is not implemented; "
                             f"valid choices: {', '.join(POSITIONS)}")
        if positions not in POSITIONS:
            raise ValueError(f"positions {positions!r} is not supported; valid choices: "
                             f"{', '.join(POSITIONS)}")
        method = resolve_method(method, **method_params)
        method.check_protocol(self.name)
        self.model, self.method, self.sparsity = model, method, float(sparsity)
        self.kv_chunk, self.positions, self.block_size = kv_chunk, positions, block_size
        self.k_min, self.seed = k_min, seed
        self.stats = ProtocolStats(
            protocol=self.name, options={name: getattr(self, name) for name in self.OPTIONS},
            params=method.config, k_min=k_min)
        self.budget = 0  # K of the window being scored
        self.cache: Optional[KVEvictionCache] = None  # the window being (or last) scored
        self.windows_seen = 0
        self._saved = None

    # -- entering and leaving -------------------------------------------------------------
    def __enter__(self) -> ProtocolStats:
        if self._saved is not None:
            raise RuntimeError("this KVProtocol is already active")
        model = self.model
        self._saved = (model.__dict__.get("forward"), model.config._attn_implementation)
        self._model_forward = model.forward
        self._cache_kwarg = ("cache" if "cache" in inspect.signature(model.forward).parameters
                             else "past_key_values")
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

    # -- one window -----------------------------------------------------------------------
    def _forward(self, input_ids: torch.Tensor = None, labels: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, **kwargs):
        unsupported = sorted(k for k, v in kwargs.items() if v is not None)
        if unsupported:
            raise TypeError(f"under the kv protocol the model takes input_ids, labels and an "
                            f"all-ones attention_mask; got {unsupported}")
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError("the kv protocol needs input_ids [batch, length]")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("the kv protocol streams unpadded windows; the attention_mask has "
                             "padding (zeros)")
        model = self.model
        batch, length = input_ids.shape
        self.budget = self.stats.budget_tokens = self.method.token_budget(length, self.sparsity,
                                                                          self.k_min)
        block_size = self.stats.block_size = resolve_block_size(self.block_size, length)
        self.cache = cache = KVEvictionCache(model.config.num_hidden_layers, self.budget,
                                             self.kv_chunk, block_size, length,
                                             self.method.block_query_pooling)
        stream = _WindowStream(self, cache, self.windows_seen)
        prefill = min(self.budget, length)
        spans = [(0, prefill)] + [(start, min(start + self.kv_chunk, length))
                                  for start in range(prefill, length, self.kv_chunk)]
        positions = torch.arange(length, device=input_ids.device).expand(batch, length)
        logits = []
        with torch.no_grad():
            for start, end in spans:
                cache.begin_chunk(positions[:, start:end])
                stream.first_position = start
                out = self._model_forward(input_ids=input_ids[:, start:end],
                                          position_ids=positions[:, start:end], use_cache=True,
                                          **{self._cache_kwarg: cache, _STREAM_KWARG: stream})
                logits.append(out.logits)
        logits = torch.cat(logits, dim=1)
        self._record_pairs(stream, batch, length)
        self.windows_seen += batch  # row b of the batch was window windows_seen + b
        loss = None
        if labels is not None:
            loss = model.loss_function(logits=logits, labels=labels,
                                       vocab_size=model.config.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def _record_pairs(self, stream: _WindowStream, batch: int, length: int) -> None:
        heads = self.model.config.num_attention_heads
        causal = torch.full((heads,), float(batch * length * (length + 1) // 2),
                            dtype=torch.float64)
        for layer_idx, kept in enumerate(stream.kept_pairs):
            self.stats.add_pairs(layer_idx, torch.full((heads,), float(batch * kept),
                                                       dtype=torch.float64), causal)

    def check_keep(self, keep: torch.Tensor, live_shape, layer_idx: int) -> None:
        """Shape, dtype and budget of a rule's keep indices (their order and range are
        checked by ops.kv_compact_)."""
        if (keep.dtype != torch.long or keep.dim() != 3 or keep.shape[:2] != live_shape[:2]
                or not 1 <= keep.shape[2] <= self.budget):
            raise RuntimeError(
                f"{self.method!r}.kv_keep returned {keep.dtype} indices of shape "
                f"{tuple(keep.shape)} for layer {layer_idx}; expected int64 "
                f"[{live_shape[0]}, {live_shape[1]}, 1..{self.budget}] (budget K = "
                f"{self.budget} of {live_shape[2]} cached entries)")
