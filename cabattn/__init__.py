"""cabattn: block-sparse attention and KV-cache eviction methods, measured by perplexity."""
from . import ops, reference
from .grid import BlockGrid, auto_block_size, realised_density, resolve_block_size, token_budget
from .stats import DenseStats, ProtocolStats
from . import methods
from .protocols import (PROTOCOLS, ModelAttention, apply, get_protocol, model_attention,
                        protocol_options)
from .sparse import Layout, select_blocks, sparse_attention
from .kv_protocol import KVProtocol
from .mask_protocol import MaskProtocol
from .prefill_protocol import PrefillProtocol, PrefillStore
