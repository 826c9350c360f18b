"""pyramidkv (Cai et al. 2024): snapkv's scores with budgets that shrink from the bottom layer
to the top one (docs/baselines.md, pyramidkv).

Every layer keeps snapkv's window of w tokens; the pyramid shares out what the mean budget K
holds beyond it, as PyramidKV's own code does: with m layers and P = K - w, the top layer
keeps w + P / beta, the bottom one w + 2P - P / beta, the layers between lie on the line; each
share is floored (9 decimals first, as for the token budget) and the remainder that makes the
layers sum to m*K goes one token each to the lowest layers. A budget is never more than the
window's L tokens: what the cap cuts goes to the lowest layers with room, so at s = 0 every
layer is dense. With K <= w there is nothing to share and every layer keeps K.
"""
import math
from dataclasses import dataclass

from ..checks import is_number
from .base import param
from .registry import register
from .snapkv import SnapKV


def at_least_one(value):
    return (None if is_number(value) and value >= 1 else
            "must be a number >= 1 (the top layer keeps (K - w) / beta beyond the window)")


def pyramid_budgets(budget: int, num_layers: int, beta: float, length: int,
                    window: int) -> list:
    """K_l of each of `num_layers` layers; they sum to num_layers * min(budget, length)."""
    if budget <= window or num_layers == 1:
        return [min(budget, length)] * num_layers
    share, room = budget - window, length - window
    total = num_layers * min(share, room)
    top = share / beta
    bottom = 2 * share - top
    shares = [min(room, max(1, math.floor(round(
        bottom + (top - bottom) * layer / (num_layers - 1), 9)))) for layer in range(num_layers)]
    missing = total - sum(shares)
    for layer in range(num_layers):  # remainder (or surplus) to (from) the lowest layers
        change = (min(missing, room - shares[layer]) if missing > 0
                  else max(missing, 1 - shares[layer]))
        shares[layer] += change
        missing -= change
    return [window + s for s in shares]


@register
@dataclass
class PyramidKV(SnapKV):
    """snapkv with per-layer budgets: the lower layers keep more, the top ones fewer."""
    name = "pyramidkv"
    beta: float = param(20, "of the budget beyond the window (P = K - w), the top layer keeps "
                        "P / beta, the bottom one 2P - P / beta; the layers between on a line",
                        at_least_one)

    def layer_budget(self, budget: int, layer_idx: int, num_layers: int, length: int) -> int:
        return pyramid_budgets(budget, num_layers, self.beta, length,
                               self.window_size)[layer_idx]
