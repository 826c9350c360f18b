"""What every protocol shares (docs/protocols.md): a method and its options, checked before the
model is touched; the split of a sequence into a context and a continuation; what the
model's forward returns under a split; greedy generation.

A protocol says what happens to a sequence's *context* (its first `context_length` tokens)
and to its *continuation* (the rest):

| protocol | context | continuation |
|---|---|---|
| mask | block-sparse attention (the method's blocks) | dense (`decoding: dense`) or block-sparse |
| kv | streamed through an evicting cache | streamed through the same cache |
| prefill | dense; then each layer's cache is compressed once | attends to the compressed cache |
| dense (`cabattn.model_attention`) | the model's own attention | the model's own attention |

The split is the keyword `context_length` of the constructor and of the model's forward
(`model(ids, context_length=n)`; the forward's wins); without one, mask, kv and dense run the
whole sequence as context and prefill splits off its last L // 8 tokens. The forward returns
the logits of every position it computes: all of them, except under prefill, whose context is
prefilled densely (and may be shared): there, those of positions n - 1 .. L - 1 (the
continuation's predictions, the first from the context's last position) and, with labels,
their mean NLL as the loss. A caller reads the first position from the shape (L minus the
logits' length). `generate` decodes greedily after a prompt under the same split, so a
teacher-forced continuation and a generated one see the same attention.
"""
import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar, Optional, Union

import torch
from transformers import AttentionInterface

from .checks import positive_int, require
from .grid import check_options
from .methods import Method
from .sparse import resolve_method
from .stats import ProtocolStats

# The keyword of the model's forward that says where a sequence's context ends.
CONTEXT_KWARG = "context_length"


def check_context_length(value) -> None:
    """None (the protocol's default split) or a positive integer."""
    if value is not None:
        require(CONTEXT_KWARG, value, positive_int)


def check_max_new_tokens(value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_new_tokens {value!r} must be a positive integer")


def sequence_length(args: tuple, kwargs: dict) -> int:
    """The length of the sequence a model's forward was called with (input_ids or
    inputs_embeds, by position or keyword)."""
    x = args[0] if args else kwargs.get("input_ids")
    return (x if x is not None else kwargs["inputs_embeds"]).shape[1]


# Keyword arguments transformers passes to an attention function that change nothing it
# computes: the scale arrives as `scaling` (read by every protocol), dropout must be 0 (a model
# in eval mode), the rest is bookkeeping.
NEUTRAL_KWARGS = frozenset({"scaling", "dropout", "position_ids", "use_cache", "cache_position",
                            "output_attentions", "output_router_logits", "is_causal",
                            "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"})
# What an attention function may be asked to do that the protocols cannot, in words.
UNSUPPORTED_FEATURES = {"s_aux": "attention sinks (s_aux: a learned per-head logit added to "
                                 "the softmax's denominator, as in GPT-OSS)"}


@dataclass(frozen=True)
class LayerAttention:
    """What one layer's own attention computes besides softmax(scaling * q.k) over the causal
    keys (docs/protocols.md, models beyond Llama), read from what transformers passes to the
    attention function: a sliding window (`window`: the layer sees its last `window` keys,
    itself included; 0: every earlier key) and logit soft-capping (`softcap`: scaled logits
    become softcap * tanh(logit / softcap); 0: none). Everything else that would change the
    attention is refused, naming it."""
    window: int = 0
    softcap: float = 0.0

    @classmethod
    def from_kwargs(cls, kwargs: dict, layer_idx: int) -> "LayerAttention":
        if kwargs.get("dropout"):
            raise ValueError(f"layer {layer_idx} runs attention dropout {kwargs['dropout']}; "
                             "cabattn evaluates a model: call model.eval()")
        refused = [name for name, value in kwargs.items()
                   if name not in NEUTRAL_KWARGS and name not in ("sliding_window", "softcap")
                   and not name.startswith("cabattn_") and value is not None
                   and value is not False]
        if refused:
            features = "; ".join(UNSUPPORTED_FEATURES.get(name, f"{name}={kwargs[name]!r}")
                                 for name in refused)
            raise ValueError(f"layer {layer_idx}'s attention is asked for {features}, which "
                             "cabattn's protocols cannot honour (they honour sliding windows "
                             "and logit soft-capping); run this model without a cabattn "
                             "protocol (method dense), or another model")
        return cls(window=int(kwargs.get("sliding_window") or 0),
                   softcap=float(kwargs.get("softcap") or 0.0))

    def pairs(self, queries: int, keys: int) -> int:
        """The (query, key) pairs this layer's own attention has when the last `queries` of
        `keys` consecutive positions attend: query t sees min(t + 1, window) keys."""
        window = self.window or keys
        low, high = keys - queries + 1, keys  # the counts t + 1 of the first and last query
        top = min(high, window)  # below the window a query sees t + 1 keys, above it window
        below = (low + top) * (top - low + 1) // 2 if top >= low else 0
        return below + max(0, high - max(low - 1, window)) * window


_PROBED = {}


def _probe(module, query, key, value, attention_mask, **kwargs):
    _PROBED[module.layer_idx] = kwargs
    return torch.zeros_like(query).transpose(1, 2), None


AttentionInterface.register("cabattn_probe", _probe)


def layer_attention(model) -> list:
    """Each attention layer's LayerAttention, from the keyword arguments transformers passes
    to the attention function in a forward of two tokens (which computes no attention);
    ValueError naming a feature the protocols cannot honour, before any window is scored."""
    device = next(model.parameters()).device
    own = model.config._attn_implementation
    _PROBED.clear()
    model.set_attn_implementation("cabattn_probe")
    try:
        with torch.no_grad():
            model(torch.zeros(1, 2, dtype=torch.long, device=device), use_cache=False)
    finally:
        model.set_attn_implementation(own)
    return [LayerAttention.from_kwargs(_PROBED[layer], layer) for layer in sorted(_PROBED)]


def cache_keyword(model) -> str:
    """The name of the forward's cache argument: `cache` from transformers 5.x on,
    `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters \
        else "past_key_values"


@contextmanager
def attention_implementation(model, implementation: str):
    """The model runs under `implementation` for a while, then under what it had."""
    current = model.config._attn_implementation
    model.set_attn_implementation(implementation)
    try:
        yield
    finally:
        model.set_attn_implementation(current)


def cached_greedy(model, input_ids: torch.Tensor, max_new_tokens: int, decode_with: str,
                  context_length: Optional[int] = None) -> torch.Tensor:
    """Greedy decoding with the model's own KV cache: the prompt under whatever attention is
    active (block-sparse under the mask protocol, split at context_length), each new token
    under `decode_with`, an attention implementation of the model's own (dense decoding of
    the prefilled cache). Returns [B, max_new_tokens]."""
    check_max_new_tokens(max_new_tokens)
    cache, keyword = {}, cache_keyword(model)  # the output's field has the argument's name
    kwargs = {} if context_length is None else {CONTEXT_KWARG: context_length}
    with torch.no_grad():
        out = model(input_ids, use_cache=True, logits_to_keep=1, **kwargs)
        new = [out.logits[:, -1].argmax(-1, keepdim=True)]
        with attention_implementation(model, decode_with):
            for _ in range(max_new_tokens - 1):
                cache[keyword] = getattr(out, keyword)
                out = model(new[-1], use_cache=True, **cache)
                new.append(out.logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat(new, dim=1)


class Protocol:
    """Base of the protocols: the method (a Method instance, or a registered name built with
    **method_params), the sparsity, the options every protocol takes (block_size, k_min,
    seed, kernels; checked by cabattn.grid.check_options and each declared Option), the
    constructor's default split (`context_length`) and the ProtocolStats its forwards fill.
    A subclass declares its own OPTIONS and passes their values as `options`."""
    name: ClassVar[str]
    OPTIONS: ClassVar[tuple] = ()
    # Its context is prefilled densely and compressed once (the prefill protocol): the
    # caller may share dense prefills with it (prefill_store) and decides whether a task's
    # question is part of the context.
    one_shot: ClassVar[bool] = False

    def __init__(self, model, method: Union[Method, str], sparsity: float, *,
                 block_size: Union[int, str], k_min: int, seed: int,
                 context_length: Optional[int], options: dict, method_params: dict,
                 record: Optional[dict] = None):
        check_options(sparsity, block_size, k_min)  # the options every protocol shares
        for option in self.OPTIONS:  # each declared option is a keyword of the constructor
            option.require(options[option.name])
        check_context_length(context_length)
        method = resolve_method(method, **method_params)
        method.check_protocol(self.name)
        self.model, self.method, self.sparsity = model, method, float(sparsity)
        self.block_size, self.k_min, self.seed = block_size, k_min, seed
        self.context_length = context_length
        for name, value in options.items():
            setattr(self, name, value)
        self.stats = ProtocolStats(protocol=self.name, options=dict(options),
                                   params=method.config, k_min=k_min, **(record or {}))

    def read_layers(self) -> None:
        """self.layers: each layer's own window and soft-cap (layer_attention), read and noted
        in the record before the protocol changes the model; a feature it cannot honour is
        refused here, naming it."""
        self.layers = layer_attention(self.model)
        self.stats.note_layers(self.layers)

    @classmethod
    def default_context(cls, length: int) -> Optional[int]:
        """The split of a `length`-token sequence when no context_length is given (None: no
        split, the whole sequence is context)."""
        return None

    def context_of(self, length: int, context_length: Optional[int] = None) -> Optional[int]:
        """Where a forward of `length` tokens splits: the forward's context_length, else the
        constructor's, else default_context; None for no split."""
        check_context_length(context_length)
        context = self.context_length if context_length is None else context_length
        if context is None:
            context = self.default_context(length)
        if context is not None and context > length:
            raise ValueError(f"{CONTEXT_KWARG}={context} exceeds the sequence's {length} tokens")
        return context

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int,
                 budget_length: Optional[int] = None,
                 context_length: Optional[int] = None) -> torch.Tensor:
        """Greedy decoding: the prompt input_ids [B, P] under the protocol (split at
        context_length as a forward would be), then max_new_tokens new tokens, each the argmax
        of the last prediction. budget_length: the length the token budget and the block grid
        are sized for (default P + max_new_tokens; give the length of a teacher-forced window
        to decode exactly as that window is scored). Returns [B, max_new_tokens] (no early
        stop)."""
        raise NotImplementedError
