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
from .stats import DenseStats

PROTOCOLS = {protocol.name: protocol for protocol in (MaskProtocol, KVProtocol)}


def get_protocol(name: str) -> type:
    return lookup("protocol", name, PROTOCOLS)


def protocol_options() -> dict:
    """{name: Option} of every protocol's own options (cabattn.checks.Option)."""
    return {option.name: option for protocol in PROTOCOLS.values()
            for option in protocol.OPTIONS}


@contextmanager
def apply(model, method: Union[str, Method] = "dense", sparsity: float = 0.0,
          protocol: str = "mask", **options):
    """Context manager yielding cabattn.ProtocolStats. Options are the protocol's (block_size,
    k_min, seed; causal_selection for mask; kv_chunk, positions for kv) and the method's own
    parameters (see cabattn.methods.get_method). Everything is validated before the model is
    touched; the model's own attention is restored on exit, also after an exception."""
    # The protocol takes its own options by keyword and builds the method from the rest.
    with get_protocol(protocol)(model, method, sparsity, **options) as stats:
        yield stats


@contextmanager
def model_attention(model):
    """The model's own attention, untouched; yields DenseStats (the record of a dense run)."""
    yield DenseStats()
