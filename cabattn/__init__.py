"""cabattn: block-sparse attention and KV-cache eviction methods, measured by perplexity."""
from . import ops, reference
from .grid import BlockGrid, auto_block_size, realised_density, token_budget
from .stats import ProtocolStats
from . import methods
from .apply import apply
from .sparse import Layout, select_blocks, sparse_attention
from .kv_protocol import KVProtocol
