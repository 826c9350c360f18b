"""The mask protocol inside a Hugging Face model (docs/protocols.md, Mask).

Every attention layer runs through one function registered with transformers'
AttentionInterface: it selects key blocks from that layer's post-RoPE q and k with the method's
rule and runs ops.block_sparse_attention. The protocol object is attached to each attention
module while active, so the registered function knows which method and sparsity to use.
"""
import contextlib

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import sdpa_mask

from typing import Union

from . import ops, ties
from .checks import Option, boolean, choice
from .grid import CAUSAL_SELECTIONS, causal_pairs, check_options, kept_pairs
from .methods import MaskContext, Method
from .sparse import layout_from_plan, make_grid, resolve_method
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


class MaskProtocol:
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
        ops.KERNEL_PATH_OPTION,
    )

    def __init__(self, model, method: Union[Method, str], sparsity: float, block_size="auto",
                 k_min: int = 64, causal_selection: str = "strict", seed: int = 42,
                 diagnostics: bool = False, kernels: str = "extension", **method_params):
        check_options(sparsity, block_size, k_min)  # the options both protocols share
        for option in self.OPTIONS:  # each declared option is a keyword of this constructor
            option.require(locals()[option.name])
        method = resolve_method(method, **method_params)
        method.check_protocol(self.name)
        self.model, self.method, self.sparsity = model, method, float(sparsity)
        self.block_size, self.k_min, self.causal_selection = block_size, k_min, causal_selection
        self.seed, self.diagnostics, self.kernels = seed, diagnostics, kernels
        self.windows_seen = 0
        self.stats = ProtocolStats(
            protocol=self.name, options={o.name: getattr(self, o.name) for o in self.OPTIONS},
            params=method.config, k_min=k_min, oracle_selection=method.oracle,
            oracle="upper_bound" if method.reads_own_row else None)
        self._saved = None

    def __enter__(self) -> ProtocolStats:
        modules = attention_modules(self.model)
        if not modules:
            raise ValueError(f"{type(self.model).__name__} has no attention modules that use "
                             "transformers' attention-function registry")
        self._saved = self.model.config._attn_implementation
        self.num_layers = len(modules)
        for module in modules:
            setattr(module, _ATTRIBUTE, self)
        self.model.set_attn_implementation(ATTENTION_NAME)
        # Each forward runs its operators on the chosen path, and the CUDA kernels' input
        # checks are read back once per forward, not once per layer.
        self._hooks = (self.model.register_forward_pre_hook(self._begin_forward),
                       self.model.register_forward_hook(self._end_forward, always_call=True))
        return self.stats

    def _begin_forward(self, model, args):
        self._forward_context = contextlib.ExitStack()
        self._forward_context.enter_context(ops.use_kernels(self.kernels))
        self._forward_context.enter_context(ops.deferred_checks())

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

    def attend(self, module, query, key, value, attention_mask, scaling):
        length = query.shape[2]
        if key.shape[2] != length:
            raise ValueError(
                f"the mask protocol scores one teacher-forced forward per window (queries = "
                f"keys), got {length} queries against {key.shape[2]} cached keys; use "
                "protocol='kv' for cached decoding")
        if attention_mask is not None and not _is_plain_causal(attention_mask, length):
            raise ValueError("the mask protocol scores unpadded windows; got an attention mask "
                             "that is not plain causal (padding?); pass input_ids without "
                             "padding or an attention_mask of ones")
        scale = module.scaling if scaling is None else scaling
        layer_idx = module.layer_idx
        if layer_idx == 0:  # a new batch of windows: rows are windows_seen - batch + row
            self.windows_seen += query.shape[0]
        q, k, v = query.contiguous(), key.contiguous(), value.contiguous()
        grid = make_grid(self.method, length, self.sparsity, self.block_size, self.k_min,
                         self.causal_selection, layer_idx, self.num_layers)
        self.stats.block_size = grid.block_size
        self.stats.budget_tokens = self.method.token_budget(length, self.sparsity, self.k_min)
        ctx = MaskContext(q, k, grid, scale, layer_idx, self.windows_seen - query.shape[0],
                          self.seed)
        with torch.no_grad(), self.stats.timing("selection", q.device):
            plan = self.method.mask_plan(ctx)
            layout = layout_from_plan(plan, grid, q.shape[0], q.shape[1], q.device)
        with self.stats.timing("attention", q.device):
            out, _ = ops.block_sparse_attention(q, k, v, layout.block_count, layout.block_index,
                                                grid.block_size, scale)
        kept = kept_pairs(layout.block_count, layout.block_index, grid).sum(0)
        self.stats.add_pairs(layer_idx, kept, torch.full_like(kept, causal_pairs(length)
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


def _is_plain_causal(mask: torch.Tensor, length: int) -> bool:
    """True for a causal mask with nothing else masked (bool keep-mask or float 0/-inf)."""
    keep = mask if mask.dtype == torch.bool else mask == 0
    causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    return bool((keep[..., -length:, -length:] == causal).all())
