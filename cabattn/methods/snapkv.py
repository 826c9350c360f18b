"""snapkv (Li et al. 2024): keys that an observation window of recent queries attends to.

mask protocol (docs/baselines.md, snapkv): the n_w = ceil(window_size / B) source blocks just
before (strict) or ending at (block) row I are kept, plus the diagonal, plus the key blocks of
largest window mass: the dense softmax mass Sblk that those source blocks' queries put on them.
The window mass is oracle-priced (one QK^T pass, cabattn.ops.block_scores).

kv protocol: the protocol keeps the last window_size post-RoPE queries per query head
(KVState.recent_queries). At each eviction they are softmaxed over the cache entries each may
see, their probabilities summed over the window and averaged over the KV head's query heads,
then pooled over neighbouring entries (SnapKV's clustering: avg or max pooling of kernel_size,
stride 1, zero padding kernel_size // 2, over the entries older than the window, as SnapKV pools
the prefix only). The window_size newest entries are always kept, the rest of K by that score.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..checks import one_of, positive_int
from .base import BlockPlan, KVState, MaskContext, Method, param
from .common import keep_recent_and_top
from .registry import register

POOLINGS = ("avg", "max")


def odd_positive_int(value):
    problem = positive_int(value)
    if problem is None and value % 2 == 0:
        problem = "must be odd (the pooled score keeps one value per entry)"
    return problem


def window_mass(block_mass: torch.Tensor, source_blocks: int) -> torch.Tensor:
    """score[..., src, J] = sum of block_mass[..., I', J] over the source rows
    I' = src - source_blocks + 1 .. src (those that exist), float64 [B, H, M, M]."""
    padded = F.pad(block_mass.double(), (0, 0, source_blocks - 1, 0))
    return padded.unfold(-2, source_blocks, 1).sum(-1)


def window_attention(state: KVState) -> torch.Tensor:
    """The window mass of every cache entry [B, Hkv, n] (float32; float64 for float64 inputs):
    the window queries' softmax over the live entries each may see (cache positions <= its
    own), summed over the window, averaged over the KV head's query heads (0 at the stale
    slots of a cache whose heads hold different numbers of entries, KVState.lengths)."""
    queries, keys = state.recent_queries, state.keys
    b, h, n = state.positions.shape
    group, window = queries.shape[1] // h, queries.shape[2]
    dtype = torch.promote_types(keys.dtype, torch.float32)  # float32, or float64 inputs' own
    logits = torch.einsum("bgqtd,bgnd->bgqtn",
                          queries.to(dtype).view(b, h, group, window, -1), keys.to(dtype))
    live = None if state.lengths is None else state.live()
    positions = state.positions if live is None else state.positions.masked_fill(~live, -1)
    newest = positions.max()
    query_positions = newest - window + 1 + torch.arange(window, device=keys.device)
    visible = positions[:, :, None, None, :] <= query_positions[:, None]
    if live is not None:
        visible &= live[:, :, None, None, :]
    probs = torch.softmax(state.logits(logits).masked_fill(~visible, float("-inf")), dim=-1)
    return probs.sum(3).mean(2)


def pool_scores(mass: torch.Tensor, pooling: str, kernel_size: int) -> torch.Tensor:
    """SnapKV's clustering of scores [B, H, m] over neighbouring entries: avg or max pooling
    of kernel_size, stride 1, zero padding kernel_size // 2, counted in the average."""
    b, h, m = mass.shape
    flat = mass.reshape(b * h, 1, m)
    if pooling == "avg":
        pooled = F.avg_pool1d(flat, kernel_size, 1, kernel_size // 2, count_include_pad=True)
    else:  # max pooling pads with -inf: the padding never wins
        pooled = F.max_pool1d(flat, kernel_size, 1, kernel_size // 2)
    return pooled.view(b, h, m)


def observation_scores(state: KVState, pooling: str, kernel_size: int,
                       candidates: int) -> torch.Tensor:
    """SnapKV's score of the cache's `candidates` oldest entries [B, Hkv, candidates]: their
    window mass (window_attention) pooled over neighbouring candidates."""
    return pool_scores(window_attention(state)[..., :candidates], pooling, kernel_size)


@register
@dataclass
class SnapKV(Method):
    """An observation window of recent queries picks the keys to keep (oracle-priced under the
    mask protocol: the window mass comes from the dense block statistics)."""
    name = "snapkv"
    oracle = True
    window_size: int = param(32, "observation window in tokens: the newest queries whose "
                             "attention scores the keys (ceil(w / block_size) blocks under "
                             "the mask protocol); they are always kept", positive_int)
    kernel_size: int = param(7, "odd width of the 1-D pooling over neighbouring cache entries "
                             "of the window's attention (kv protocol)", odd_positive_int)
    pooling: str = param("avg", "pooling of the window's attention over neighbouring entries "
                         "(kv protocol): avg or max", one_of(*POOLINGS))

    @property
    def recent_query_window(self) -> int:
        return self.window_size

    def source_blocks(self, block_size: int) -> int:
        return -(-self.window_size // block_size)

    def mask_plan(self, ctx: MaskContext) -> BlockPlan:
        rule = ctx.grid.rule_budget(ctx.q.device)
        recent = rule.clamp(max=self.source_blocks(ctx.grid.block_size))
        zeros = torch.zeros_like(rule)
        score = window_mass(ctx.block_scores[0], self.source_blocks(ctx.grid.block_size))
        return BlockPlan(n_recent=recent, n_sink=zeros, n_score1=rule - recent, n_score2=zeros,
                         score1=score)

    def kv_scores(self, state: KVState) -> torch.Tensor:
        """float32 [B, Hkv, n]: the pooled window attention of the entries older than the
        window_size newest, 0 for those (they are kept whatever their score)."""
        n = state.positions.shape[-1]
        candidates = max(n - self.window_size, 0)
        score = observation_scores(state, self.pooling, self.kernel_size, candidates)
        return F.pad(score, (0, n - candidates))

    def kv_keep(self, state: KVState) -> torch.Tensor:
        recent = min(self.window_size, state.budget)
        if recent == state.budget:  # K <= w: the K newest, no score needed
            return keep_recent_and_top(state.mass, recent, 0)
        return keep_recent_and_top(self.kv_scores(state), recent, state.budget - recent)
