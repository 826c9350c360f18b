"""The correctness bar (docs/operators.md), one definition for the tests and the self-check.

A kernel's output is compared with a float64 `exact` value and with the plain-PyTorch reference
at the kernel's own precision (`same`): the kernel's error must be at most twice the
reference's, element-wise (a few wrong rows show) and in norm, plus a few units of the
accumulation precision at the largest exact value (errors at rounding level come in whole
units, and a reference that happens to round well must not fail a kernel one unit off). In
float64 the reference is the exact value itself, so those units (16: sums over a few hundred
keys) are the whole bar.
"""
from typing import Optional

import torch


def errors(got: torch.Tensor, exact: torch.Tensor) -> tuple:
    """(largest element-wise error, norm of the error / norm of the exact value)."""
    diff = got.double().cpu() - exact.double().cpu()
    scale = exact.double().norm().item()
    return diff.abs().max().item(), diff.norm().item() / (scale if scale else 1.0)


def bar_problem(got: torch.Tensor, exact: torch.Tensor, same: torch.Tensor,
                ulps: Optional[int] = None) -> Optional[str]:
    """None when `got` meets the bar against `exact` given the reference `same`, else what
    failed (with the numbers). NaN in `got` (an unwritten, poisoned element) fails."""
    if torch.isnan(got).any():
        return "unwritten (NaN) elements"
    ulps = ulps or (16 if got.dtype == torch.float64 else 2)
    unit = ulps * torch.finfo(torch.float64 if got.dtype == torch.float64 else torch.float32).eps
    kernel_max, kernel_norm = errors(got, exact)
    ref_max, ref_norm = errors(same, exact)
    bar_max = 2 * ref_max + unit * exact.double().abs().max().item()
    bar_norm = 2 * ref_norm + unit
    if kernel_max > bar_max:
        return (f"largest error {kernel_max:.3e} > {bar_max:.3e} (2 x the reference's "
                f"{ref_max:.3e} + {ulps} units)")
    if kernel_norm > bar_norm:
        return (f"relative error {kernel_norm:.3e} > {bar_norm:.3e} (2 x the reference's "
                f"{ref_norm:.3e} + {ulps} units)")
    return None
