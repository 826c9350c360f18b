"""cabattn.apply: run a Hugging Face model under a method, with either protocol.

    with cabattn.apply(model, method="cab_v4", sparsity=0.9) as stats:
        loss = model(input_ids, labels=input_ids).loss
    stats.density, stats.record()

cabattn.dense(model) is the same context for the model's own attention (its stats record
dense), so a caller runs every cell through one path.
"""
import inspect
from contextlib import contextmanager
from typing import Union

from . import ops
from .kv_protocol import KVProtocol
from .mask_protocol import MaskProtocol
from .methods import Method
from .sparse import resolve_method
from .stats import DenseStats

PROTOCOLS = {protocol.name: protocol for protocol in (MaskProtocol, KVProtocol)}


def get_protocol(name: str) -> type:
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; valid: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


@contextmanager
def apply(model, method: Union[str, Method] = "dense", sparsity: float = 0.0,
          protocol: str = "mask", kernels: str = "extension", **options):
    """Context manager yielding cabattn.ProtocolStats. Options are the protocol's (block_size,
    k_min, seed; causal_selection for mask; kv_chunk, positions for kv) and the method's own
    parameters (see cabattn.methods.get_method). kernels: "extension" (the compiled operators)
    or "reference" (plain PyTorch and FlexAttention, cabattn.reference_path; recorded as the
    stats' `kernels`). Everything is validated before the model is touched; the model's own
    attention is restored on exit, also after an exception."""
    ops.check_kernel_path(kernels)
    Protocol = get_protocol(protocol)
    # The protocol's own options are the named keyword parameters of its constructor.
    names = {name for name, p in inspect.signature(Protocol).parameters.items()
             if p.kind is p.POSITIONAL_OR_KEYWORD or p.kind is p.KEYWORD_ONLY} - {
        "model", "method", "sparsity"}
    protocol_options = {k: v for k, v in options.items() if k in names}
    method = resolve_method(method, **{k: v for k, v in options.items() if k not in names})
    with ops.use_kernels(kernels), Protocol(model, method, sparsity,
                                            **protocol_options) as stats:
        stats.kernels = kernels
        yield stats


@contextmanager
def dense(model):
    """The model's own attention, untouched; yields DenseStats (the record of a dense run)."""
    yield DenseStats()
