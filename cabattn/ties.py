"""How close a block selection came to a tie (docs/block_statistics.md, Near-tie diagnostics).

A method's number rests on its picks; a pick decided by a rounding-level difference is not a
property of the method. Two places can tie:
- max_l2 pooling: a block whose representative was chosen by the first-index rule because
  another token's squared norm lies inside the dtype's tolerance of the largest
  (`tie_decided`);
- a score stage of the selection: a row whose last kept and first dropped blocks have nearly
  the same score (`row_margins`).
The mask protocol records both per cell (cabattn.stats.ProtocolStats); the kv protocol records
the pooling ties of its query blocks and cached key blocks.
"""
import torch

from . import reference


def tie_decided(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """bool [B, H, M]: blocks of x [B, H, L, d] with two or more tokens inside max_l2's
    tolerance of the largest norm (the first-index rule, not the norms, chose the token)."""
    inside = reference.max_l2_candidates(reference.block_squared_norms(x, block_size),
                                         reference.max_l2_tolerance(x.dtype))
    return inside.sum(-1) > 1


def kept_blocks(block_count: torch.Tensor, block_index: torch.Tensor) -> torch.Tensor:
    """bool [B, H, M, M]: the layout as a dense block mask (row I, key block J)."""
    m = block_count.shape[-1]
    slots = torch.arange(block_index.shape[-1], device=block_index.device)
    valid = slots < block_count[..., None]
    dense = torch.zeros(*block_count.shape, m + 1, dtype=torch.bool, device=block_count.device)
    dense.scatter_(-1, torch.where(valid, block_index.long(), m), True)
    return dense[..., :m]


def source_rows(x: torch.Tensor, shift: int, fill) -> torch.Tensor:
    """x [..., M, ...] read at source row I - shift for output row I (`fill` before row 0)."""
    if shift == 0:
        return x
    pad = torch.full_like(x[..., :shift, :], fill)
    return torch.cat([pad, x[..., :-shift, :]], dim=-2)


def picks_near_ties(kept: torch.Tensor, q_ties: torch.Tensor, k_ties: torch.Tensor,
                    shift: int) -> tuple:
    """(kept off-diagonal blocks whose score read a tie-decided representative, all kept
    off-diagonal blocks), summed: kept [B, Hq, M, M]; q_ties [B, Hq, M]; k_ties [B, Hkv, M]."""
    m = kept.shape[-1]
    off_diagonal = kept & ~torch.eye(m, dtype=torch.bool, device=kept.device)
    k_ties = k_ties.repeat_interleave(kept.shape[1] // k_ties.shape[1], dim=1)
    q_src = source_rows(q_ties[..., None], shift, False)  # [B, Hq, M, 1]
    near = off_diagonal & (q_src | k_ties[:, :, None, :])
    return near.sum(), off_diagonal.sum()


def row_margins(score: torch.Tensor, kept: torch.Tensor, shift: int,
                scored_rows: torch.Tensor) -> torch.Tensor:
    """The margin of each scored row, float64 [n]: (score of the lowest kept candidate at or
    above the first dropped one - the first dropped one's) / (the candidates' score range).

    score [B, H, M, M] is read at the source row I - shift over candidates J <= I - shift;
    kept [B, H, M, M] is the layout; scored_rows bool [M], [H, M] or [B, H, M] (the plan's
    per-row or per-head counts): rows whose last stage picked by this score. Rows with no dropped candidate, a flat score, or a non-finite score are left out.
    """
    m = kept.shape[-1]
    s = source_rows(score.double(), shift, float("nan"))
    cols = torch.arange(m, device=score.device)
    rows = torch.arange(m, device=score.device)
    candidate = (cols[None, :] <= (rows - shift)[:, None]) & scored_rows[..., None]  # [.., M, M]
    dropped = candidate & ~kept
    kept_candidate = candidate & kept
    first_dropped = s.masked_fill(~dropped, float("-inf")).amax(-1, keepdim=True)
    above = kept_candidate & (s >= first_dropped)
    last_kept = s.masked_fill(~above, float("inf")).amin(-1, keepdim=True)
    span = (s.masked_fill(~candidate, float("-inf")).amax(-1, keepdim=True)
            - s.masked_fill(~candidate, float("inf")).amin(-1, keepdim=True))
    margin = ((last_kept - first_dropped) / span).squeeze(-1)
    return margin[margin.isfinite()]
