"""The protocols by name, and cabattn.apply: a Hugging Face model under a method.

    with cabattn.apply(model, method="cab_v4", sparsity=0.9) as stats:
        loss = model(input_ids, labels=input_ids).loss
    stats.density, stats.record()

cabattn.model_attention(model) is the same context for the model's own attention (its stats record
dense), so a caller runs every cell through one path.
"""
from contextlib import contextmanager
from typing import Union

from .checks import lookup
from .kv_protocol import KVProtocol
from .mask_protocol import MaskProtocol
from .methods import Method
from .prefill_protocol import PrefillProtocol
from .protocol import CONTEXT_KWARG, cached_greedy, check_context_length, sequence_length
from .stats import DenseStats

PROTOCOLS = {protocol.name: protocol for protocol in (MaskProtocol, KVProtocol, PrefillProtocol)}


def get_protocol(name: str) -> type:
    return lookup("protocol", name, PROTOCOLS)


def protocol_options() -> dict:
    """{name: Option} of every protocol's own options (cabattn.checks.Option)."""
    return {option.name: option for protocol in PROTOCOLS.values()
            for option in protocol.OPTIONS}


@contextmanager
def apply(model, method: Union[str, Method] = "dense", sparsity: float = 0.0,
          protocol: str = "mask", **options):
    """Context manager yielding cabattn.ProtocolStats. protocol: "mask", "kv" or "prefill"
    (docs/protocols.md). Options are the protocol's (block_size, k_min, seed, kernels,
    context_length for all; causal_selection, diagnostics, decoding for mask; kv_chunk,
    positions for kv; prefill_store for prefill; kernels "reference" runs the reference path,
    docs/selfcheck.md) and the method's own parameters (see cabattn.methods.get_method).
    Everything is validated before the model is touched; the model's own attention is
    restored on exit, also after an exception."""
    # The protocol takes its own options by keyword and builds the method from the rest.
    with get_protocol(protocol)(model, method, sparsity, **options) as stats:
        yield stats


class ModelAttention:
    """The model's own attention, untouched, behind the protocols' interface: a context
    manager yielding DenseStats (the record of a dense run), a forward that takes (and
    ignores: nothing is split) `context_length` as the protocols' do, and greedy
    `generate`."""
    name = "dense"

    def __init__(self, model):
        self.model = model
        self.stats = DenseStats()
        self._hook = None

    def __enter__(self) -> DenseStats:
        self._hook = self.model.register_forward_pre_hook(self._take_context,
                                                          with_kwargs=True)
        return self.stats

    def __exit__(self, *exc) -> bool:
        self._hook.remove()
        self._hook = None
        return False

    @staticmethod
    def _take_context(model, args, kwargs):
        context = kwargs.pop(CONTEXT_KWARG, None)
        check_context_length(context)
        if context is not None and context > sequence_length(args, kwargs):
            raise ValueError(f"{CONTEXT_KWARG}={context} exceeds the sequence's "
                             f"{sequence_length(args, kwargs)} tokens")
        return args, kwargs

    def generate(self, input_ids, max_new_tokens, budget_length=None, context_length=None):
        """Greedy decoding with the model's own cache (budget_length has no effect)."""
        return cached_greedy(self.model, input_ids, max_new_tokens,
                             self.model.config._attn_implementation, context_length)


def model_attention(model) -> ModelAttention:
    """The model's own attention, untouched; entered, it yields DenseStats."""
    return ModelAttention(model)
