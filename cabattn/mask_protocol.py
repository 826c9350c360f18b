"""The mask protocol inside a Hugging Face model (docs/protocols.md, Mask).

Every attention layer runs through one function registered with transformers'
AttentionInterface: it selects key blocks from that layer's post-RoPE q and k with the method's
rule and runs ops.block_sparse_attention. The protocol object is attached to each attention
module while active, so the registered function knows which method and sparsity to use.

With a split (cabattn.protocol), the context's queries attend block-sparsely and, under
`decoding: dense` (the default), the continuation's queries attend to every earlier key: the
teacher-forced form of a block-sparse prefill followed by dense decoding. The context's rows
are computed exactly as without a split (the same layout and kernel call over the whole
sequence); the continuation's rows are then replaced by dense attention.
"""
import contextlib

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import sdpa_mask

from typing import Union

from . import ops, ties
from .checks import Option, boolean, choice
from .grid import CAUSAL_SELECTIONS, causal_pairs, kept_pairs
from .methods import MaskContext, Method
from .protocol import CONTEXT_KWARG, Protocol, cached_greedy, sequence_length
from .sparse import layout_from_plan, make_grid
from .stats import ProtocolStats

ATTENTION_NAME = "cabattn_mask"
_ATTRIBUTE = "_cabattn_mask_protocol"


def _mask_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                    **kwargs):
    protocol = getattr(module, _ATTRIBUTE, None)
    if protocol is None:
        raise RuntimeError("the cabattn mask attention runs only inside cabattn.apply(...)")
    return protocol.attend(module, query, key, value, attention_mask, scaling)


AttentionInterface.register(ATTENTION_NAME, _mask_attention)
# Without a mask function of its own, transformers hands a custom attention function None even
# for a padded batch; sdpa's gives None for a plain causal batch and a boolean keep-mask
# [B, 1, Lq, Lk] otherwise, which `attend` checks.
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def attention_modules(model):
    """The modules transformers calls the attention function from (they carry layer_idx)."""
    return [m for m in model.modules()
            if hasattr(m, "layer_idx") and hasattr(m, "config") and hasattr(m, "scaling")]


DECODINGS = ("dense", "sparse")


class MaskProtocol(Protocol):
    """Context manager: inside it, the model's attention is the method's block-sparse
    attention; __enter__ returns the ProtocolStats that every forward adds to."""
    name = "mask"
    # The protocol's own options, recorded with every cell next to the shared ones
    # (block_size, k_min).
    OPTIONS = (
        choice("causal_selection", "strict", "strict: a row's selection reads earlier blocks "
               "only; block: it reads the row's own block too", CAUSAL_SELECTIONS),
        Option("diagnostics", False, "also measure each cell's attention recall (the dense "
               "softmax mass the kept blocks hold; one more QK^T pass per layer for a method "
               "whose rule does not compute it)", boolean),
        choice("decoding", "dense", "what a continuation's queries attend to (a task's "
               "answer, a window's continuation): dense, every earlier key (block-sparse "
               "prefill, dense decoding); sparse, the method's blocks like the context's",
               DECODINGS),
        ops.KERNEL_PATH_OPTION,
    )

    def __init__(self, model, method: Union[Method, str], sparsity: float, block_size="auto",
                 k_min: int = 64, causal_selection: str = "strict", seed: int = 42,
                 diagnostics: bool = False, decoding: str = "dense",
                 kernels: str = "extension", context_length: int = None, **method_params):
        super().__init__(model, method, sparsity, block_size=block_size, k_min=k_min,
                         seed=seed, context_length=context_length,
                         options=dict(causal_selection=causal_selection,
                                      diagnostics=diagnostics, decoding=decoding,
                                      kernels=kernels),
                         method_params=method_params)
        self.stats.context_attention = "block-sparse (the method's blocks)"
        self.stats.continuation_attention = ("dense (every earlier key)" if decoding == "dense"
                                             else self.stats.context_attention)
        self.stats.oracle_selection = self.method.oracle
        self.stats.oracle = "upper_bound" if self.method.reads_own_row else None
        self.windows_seen = 0
        self._saved = None
        self._context = None  # the split of the forward running now (None: no split)
        self._budget_length = None  # generate(): the length the grid is sized for

    def __enter__(self) -> ProtocolStats:
        modules = attention_modules(self.model)
        if not modules:
            raise ValueError(f"{type(self.model).__name__} has no attention modules that use "
                             "transformers' attention-function registry")
        self.read_layers()
        self._saved = self.model.config._attn_implementation
        self.num_layers = len(modules)
        for module in modules:
            setattr(module, _ATTRIBUTE, self)
        self.model.set_attn_implementation(ATTENTION_NAME)
        # Each forward runs its operators on the chosen path, and the CUDA kernels' input
        # checks are read back once per forward, not once per layer.
        self._hooks = (self.model.register_forward_pre_hook(self._begin_forward,
                                                            with_kwargs=True),
                       self.model.register_forward_hook(self._end_forward, always_call=True))
        return self.stats

    def _begin_forward(self, model, args, kwargs):
        length = sequence_length(args, kwargs)
        self._context = self.context_of(length, kwargs.pop(CONTEXT_KWARG, None))
        self._forward_context = contextlib.ExitStack()
        self._forward_context.enter_context(ops.use_kernels(self.kernels))
        self._forward_context.enter_context(ops.deferred_checks())
        return args, kwargs

    def _end_forward(self, model, args, output):
        context, self._forward_context = self._forward_context, None
        context.close()

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()
        self.model.set_attn_implementation(self._saved)
        for module in attention_modules(self.model):
            if hasattr(module, _ATTRIBUTE):
                delattr(module, _ATTRIBUTE)
        self._saved = None
        return False

    def generate(self, input_ids, max_new_tokens, budget_length=None, context_length=None):
        if self._saved is None:
            raise RuntimeError("MaskProtocol.generate runs inside `with MaskProtocol(...)`")
        if self.decoding != "dense":
            raise ValueError("the mask protocol decodes densely after its block-sparse prefill; "
                             "decoding='sparse' is scored teacher-forced only (a cached "
                             "decoding step has one query, not a block)")
        self._budget_length = budget_length or input_ids.shape[1] + max_new_tokens
        try:  # the prompt block-sparse, each new token under the model's own attention
            return cached_greedy(self.model, input_ids, max_new_tokens, self._saved,
                                 context_length)
        finally:
            self._budget_length = None

    def attend(self, module, query, key, value, attention_mask, scaling):
        length = query.shape[2]
        if key.shape[2] != length:
            raise ValueError(
                f"the mask protocol scores one teacher-forced forward per window (queries = "
                f"keys), got {length} queries against {key.shape[2]} cached keys; use "
                "protocol='kv' for cached decoding")
        layer_idx = module.layer_idx
        features = self.layers[layer_idx]
        if attention_mask is not None and not _is_plain_causal(attention_mask, length,
                                                               features.window):
            raise ValueError("the mask protocol scores unpadded windows; got an attention mask "
                             "that is not plain causal (padding?); pass input_ids without "
                             "padding or an attention_mask of ones")
        scale = module.scaling if scaling is None else scaling
        if layer_idx == 0:  # a new batch of windows: rows are windows_seen - batch + row
            self.windows_seen += query.shape[0]
        q, k, v = query.contiguous(), key.contiguous(), value.contiguous()
        # the rows the method's layout serves: the context's under dense decoding
        rows = length
        if self._context is not None and self._context < length and self.decoding == "dense":
            rows = self._context
            self.stats.density_rows = "context"
        if features.window and features.window < length:
            return self._attend_window(layer_idx, q, k, v, scale, features, rows)
        budget_length = self._budget_length or length
        grid = make_grid(self.method, length, self.sparsity, self.block_size, self.k_min,
                         self.causal_selection, layer_idx, self.num_layers, budget_length)
        self.stats.block_size = grid.block_size
        self.stats.budget_tokens = self.method.token_budget(budget_length, self.sparsity,
                                                            self.k_min)
        ctx = MaskContext(q, k, grid, scale, layer_idx, self.windows_seen - query.shape[0],
                          self.seed, features.softcap)
        with torch.no_grad(), self.stats.timing("selection", q.device):
            plan = self.method.mask_plan(ctx)
            layout = layout_from_plan(plan, grid, q.shape[0], q.shape[1], q.device)
        with self.stats.timing("attention", q.device):
            out, _ = ops.block_sparse_attention(q, k, v, layout.block_count, layout.block_index,
                                                grid.block_size, scale, features.softcap)
            if rows < length:  # the continuation attends to every earlier key
                out[:, :, rows:] = ops.attention_with_scores(
                    q[:, :, rows:].contiguous(), k, v, scale, features.softcap)[0]
        kept = kept_pairs(layout.block_count, layout.block_index, grid, rows).sum(0)
        self.stats.add_pairs(layer_idx, kept, torch.full_like(kept, causal_pairs(rows)
                                                              * q.shape[0]))
        sink_rows = layout.keeps_first_block()
        self.stats.add_sink(sink_rows.sum(), sink_rows.numel())
        with torch.no_grad():
            self._record_near_ties(q, k, plan, layout, grid)
        if self.diagnostics:
            with torch.no_grad():  # ctx.block_scores: the rule's own, or one more QK^T pass
                self.stats.add_recall(layer_idx, layout.kept_mass(ctx.block_scores[0]).sum(),
                                      q.shape[0] * q.shape[1] * length)
                # The attention output error (docs/metrics.md): the layer's dense output on
                # the same q, k, v against the block-sparse one.
                dense = torch.nn.functional.scaled_dot_product_attention(
                    q.float(), k.float(), v.float(), is_causal=True, scale=scale,
                    enable_gqa=True)
                self.stats.add_output_error(layer_idx, (dense - out.float()).square().sum(),
                                            dense.square().sum())
        return out.transpose(1, 2).contiguous(), None

    def _attend_window(self, layer_idx, q, k, v, scale, features, rows):
        """A layer with a sliding window keeps the model's own attention (docs/protocols.md,
        models beyond Llama): every query attends to its window; the method's budget is the
        full-attention layers'. Its pairs count as kept against the same pairs."""
        with self.stats.timing("attention", q.device):
            out = ops.attention_with_scores(q, k, v, scale, features.softcap, features.window)[0]
        pairs = torch.full((q.shape[1],), float(features.pairs(rows, rows) * q.shape[0]),
                           dtype=torch.float64)
        self.stats.add_pairs(layer_idx, pairs, pairs)
        return out.transpose(1, 2).contiguous(), None

    def _record_near_ties(self, q, k, plan, layout, grid) -> None:
        """cabattn.ties: tie-decided max_l2 representatives (for a method that pools by
        max_l2), the kept blocks whose score read one, and the margins of the last score
        stage's rows."""
        kept = ties.kept_blocks(layout.block_count, layout.block_index)
        if self.method.block_query_pooling == "max_l2":
            q_ties = ties.tie_decided(q, grid.block_size)
            k_ties = ties.tie_decided(k, grid.block_size)
            self.stats.add_pooling_ties(q_ties.sum() + k_ties.sum(),
                                        q_ties.numel() + k_ties.numel())
            self.stats.add_picks_near_ties(*ties.picks_near_ties(kept, q_ties, k_ties, grid.shift))
        score, picks = ((plan.score2, plan.n_score2) if plan.score2 is not None
                        else (plan.score1, plan.n_score1))
        if score is not None:
            self.stats.add_margins(ties.row_margins(score, kept, grid.shift, picks > 0))


def _is_plain_causal(mask: torch.Tensor, length: int, window: int = 0) -> bool:
    """True for a causal mask (within the layer's sliding window, when it has one) with
    nothing else masked (bool keep-mask or float 0/-inf)."""
    keep = mask if mask.dtype == torch.bool else mask == 0
    causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    if window:
        causal = causal.triu(1 - window)
    return bool((keep[..., -length:, -length:] == causal).all())
