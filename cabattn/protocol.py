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
from typing import ClassVar, Optional, Union

import torch

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
