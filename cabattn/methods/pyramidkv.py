"""pyramidkv (Cai et al. 2024): snapkv's scores with budgets that shrink from the bottom layer
to the top one (docs/baselines.md, pyramidkv).

With m layers and mean budget K: the top layer keeps K_{m-1} = K / beta, the bottom one
K_0 = 2K - K_{m-1}, the layers between lie on the line from K_0 to K_{m-1}; each is floored
(9 decimals first, as for the token budget) and the remainder that makes the layers sum to m*K
goes one token each to the lowest layers. A budget is never more than the window's L tokens:
what the cap cuts goes to the lowest layers with room, so at s = 0 every layer is dense.
"""
import math
from dataclasses import dataclass

from ..checks import is_number
from .base import param
from .registry import register
from .snapkv import SnapKV


def at_least_one(value):
    return None if is_number(value) and value >= 1 else "must be a number >= 1 (the top layer keeps K / beta)"


def pyramid_budgets(budget: int, num_layers: int, beta: float, length: int) -> list:
    """K_l of each of `num_layers` layers; they sum to num_layers * min(budget, length)."""
    total = num_layers * min(budget, length)
    if num_layers == 1:
        return [total]
    top = budget / beta
    bottom = 2 * budget - top
    budgets = [min(length, max(1, math.floor(round(
        bottom + (top - bottom) * layer / (num_layers - 1), 9)))) for layer in range(num_layers)]
    missing = total - sum(budgets)
    for layer in range(num_layers):  # remainder (or surplus) to (from) the lowest layers
        change = (min(missing, length - budgets[layer]) if missing > 0
                  else max(missing, 1 - budgets[layer]))
        budgets[layer] += change
        missing -= change
    return budgets


@register
@dataclass
class PyramidKV(SnapKV):
    """snapkv with per-layer budgets: the lower layers keep more, the top ones fewer."""
    name = "pyramidkv"
    beta: float = param(20, "the top layer keeps K / beta, the bottom one 2K - K / beta; the "
                        "layers between on a line (mean K)", at_least_one)

    def layer_budget(self, budget: int, layer_idx: int, num_layers: int, length: int) -> int:
        return pyramid_budgets(budget, num_layers, self.beta, length)[layer_idx]
