"""Perplexity metrics of one cell (docs/metrics.md), from per-window sums.

Everything is token-weighted: windows contribute by their number of scored predictions, so
cross_entropy = total NLL / total predicted tokens, never a mean of window means.
bits_per_byte divides the total NLL in bits by the UTF-8 bytes of the scored text, which makes
models with different tokenizers comparable (lm-evaluation-harness's definition).
"""
import math

import numpy as np


class NonFiniteLossError(ValueError):
    """A window's loss is NaN or infinite: the cell has failed and must say so."""


def summarize(nll_sums, token_counts, byte_counts, seed: int = 0, n_boot: int = 1000) -> dict:
    """Metrics of a cell whose window i has NLL sum nll_sums[i] (nats) over token_counts[i]
    predictions covering byte_counts[i] UTF-8 bytes.

    ppl_ci95 is a percentile bootstrap over windows (resampled with replacement, n_boot
    times, seeded), each resample token-weighted like the point estimate.
    """
    nll = np.asarray(nll_sums, dtype=np.float64).reshape(-1)
    tokens = np.asarray(token_counts, dtype=np.float64).reshape(-1)
    num_bytes = np.asarray(byte_counts, dtype=np.float64).reshape(-1)
    if not (len(nll) == len(tokens) == len(num_bytes)) or len(nll) == 0:
        raise ValueError(f"need one NLL sum, token count and byte count per window, at least "
                         f"one window; got {len(nll)}, {len(tokens)}, {len(num_bytes)}")
    bad = np.flatnonzero(~np.isfinite(nll))
    if len(bad):
        raise NonFiniteLossError(f"{len(bad)} of {len(nll)} windows have a non-finite loss "
                                 f"(first: window {bad[0]}, NLL {nll[bad[0]]}); the cell "
                                 "fails rather than averaging it away")
    if (tokens <= 0).any() or (num_bytes <= 0).any():
        raise ValueError("every window needs a positive token count and byte count")
    if n_boot < 1:
        raise ValueError(f"n_boot {n_boot} must be >= 1")

    total_nll, total_tokens, total_bytes = nll.sum(), tokens.sum(), num_bytes.sum()
    cross_entropy = total_nll / total_tokens
    resamples = np.random.default_rng(seed).integers(0, len(nll), size=(n_boot, len(nll)))
    boot_ppl = np.exp(nll[resamples].sum(axis=1) / tokens[resamples].sum(axis=1))
    low, high = np.percentile(boot_ppl, [2.5, 97.5])
    return {
        "perplexity": float(math.exp(cross_entropy)),
        "cross_entropy": float(cross_entropy),
        "bits_per_token": float(cross_entropy / math.log(2)),
        "bits_per_byte": float(total_nll / math.log(2) / total_bytes),
        "num_tokens": int(total_tokens),
        "num_samples": int(len(nll)),
        "ppl_ci95": [float(low), float(high)],
    }
