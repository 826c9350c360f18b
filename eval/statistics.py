"""Paired statistics over windows and samples (docs/statistics.md).

Two methods scored on the same (dataset, context length) score the same windows, so every
comparison here is paired: the per-window NLL sums of both sides are resampled or sign-flipped
together. A paired difference has far less variance than either perplexity, because most of a
window's NLL (how hard its text is) is common to both methods.

- `paired_change`: the change of B's perplexity relative to A's (PPL_B / PPL_A - 1, a fraction)
  with a percentile bootstrap interval (the same resample indices for both sides) and a
  sign-flip permutation p-value on the per-window NLL differences.
- `holm`: Holm's step-down correction over the comparisons of one table.
- `windows_needed`: how many windows would resolve a given relative change at 95%, from the
  spread of the per-window paired differences.
- `paired_binary`: two methods' correct/incorrect on the same task samples: exact McNemar test
  on the discordant pairs and Wilson intervals of each accuracy; `paired_scores` takes any
  per-sample scores (McNemar for 0/1, a sign-flip test otherwise).
- `seed_spread`: the mean and the spread of one metric over runs with different seeds.

Everything is pure numpy/scipy and seeded: the same inputs give the same numbers.
"""
import functools
import math
from dataclasses import dataclass

import numpy as np

RESAMPLES = 10_000  # bootstrap resamples and sign flips (docs/statistics.md)
LEVEL = 0.95
ALPHA = 1 - LEVEL
# Resample rows per vectorised chunk: chunk x windows indices stay a few MB at any size.
_CHUNK_ELEMENTS = 2_000_000
# Two flip statistics closer than this (relative to the largest |difference| sum) count as
# equal: exact enumeration meets the observed statistic itself, only rounded differently.
_TIE_TOLERANCE = 1e-9


@dataclass(frozen=True)
class WindowScores:
    """One cell's per-window NLL sums (nats) and scored token counts, in window order."""
    nll_sum: np.ndarray
    tokens: np.ndarray

    @classmethod
    def from_record(cls, windows: dict, where: str = "cell") -> "WindowScores":
        """From R["windows"] ({"nll_sum": [...], "tokens": [...], "bytes": [...]})."""
        if not isinstance(windows, dict) or not {"nll_sum", "tokens"} <= set(windows):
            raise ValueError(f"{where} has no per-window NLL sums (R['windows']); it was "
                             "written before they were kept: rerun the same eval.run command "
                             "(such cells are recomputed once)")
        return cls(np.asarray(windows["nll_sum"], dtype=np.float64),
                   np.asarray(windows["tokens"], dtype=np.float64))

    @property
    def cross_entropy(self) -> float:
        return float(self.nll_sum.sum() / self.tokens.sum())


def _check_paired(a: WindowScores, b: WindowScores) -> None:
    if len(a.nll_sum) != len(b.nll_sum) or not np.array_equal(a.tokens, b.tokens):
        raise ValueError(
            f"the two cells did not score the same windows ({len(a.nll_sum)} and "
            f"{len(b.nll_sum)} windows, or different token counts); a paired comparison "
            "needs the same (dataset, context length, max_windows)")
    if len(a.nll_sum) == 0:
        raise ValueError("a paired comparison needs at least one window")
    for name, side in (("A", a), ("B", b)):
        if not np.isfinite(side.nll_sum).all():
            raise ValueError(f"side {name} has a non-finite window NLL")


def bootstrap_change_interval(a: WindowScores, b: WindowScores, resamples: int = RESAMPLES,
                              seed: int = 0, level: float = LEVEL) -> tuple:
    """Percentile bootstrap interval of PPL_B / PPL_A - 1 over windows.

    Each resample draws n window indices with replacement and uses them for both sides, so
    the interval is of the paired ratio; each side's PPL in a resample is token-weighted
    (exp of summed NLL over summed tokens), like the point estimate."""
    _check_paired(a, b)
    n = len(a.nll_sum)
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ELEMENTS // n)
    log_ratios = []
    for first in range(0, resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, resamples - first), n))
        tokens = a.tokens[idx].sum(axis=1)
        log_ratios.append((b.nll_sum[idx].sum(axis=1) - a.nll_sum[idx].sum(axis=1)) / tokens)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(np.expm1(np.concatenate(log_ratios)), [tail, 100 - tail])
    return float(low), float(high)


def sign_flip_p_value(differences, flips: int = RESAMPLES, seed: int = 0) -> float:
    """Two-sided paired permutation p-value of the per-window differences d_i (here the NLL
    sum of B minus that of A on window i).

    Under the null hypothesis (the two methods are exchangeable on every window) each d_i is
    as likely to be -d_i, so the statistic |sum_i e_i d_i| over random signs e_i in {-1, +1} is
    the null distribution of |sum_i d_i|. With 2^n <= flips every sign vector is enumerated
    and p is exact (count / 2^n, the observed signs included); otherwise `flips` random sign
    vectors give p = (1 + count) / (1 + flips), which is never 0."""
    d = np.asarray(differences, dtype=np.float64).reshape(-1)
    n = len(d)
    if n == 0:
        raise ValueError("a sign-flip test needs at least one difference")
    observed = abs(d.sum())
    tolerance = _TIE_TOLERANCE * max(float(np.abs(d).sum()), 1e-300)
    if 2 ** n <= flips:
        # Row j's signs are the bits of j: every sign vector once.
        bits = (np.arange(2 ** n)[:, None] >> np.arange(n)) & 1
        stats = np.abs((1 - 2 * bits) @ d)
        return float((stats >= observed - tolerance).sum() / 2 ** n)
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ELEMENTS // n)
    count = 0
    for first in range(0, flips, chunk):
        signs = rng.integers(0, 2, size=(min(chunk, flips - first), n)) * 2 - 1
        count += int((np.abs(signs @ d) >= observed - tolerance).sum())
    return (1 + count) / (1 + flips)


def smallest_sign_flip_p(windows: int, flips: int = RESAMPLES) -> float:
    """The smallest p-value sign_flip_p_value can return for that many windows, whatever their
    numbers: 2 / 2^n when every sign vector is enumerated (the observed signs and their mirror
    image always count), else 1 / (1 + flips)."""
    return 2 / 2 ** windows if 2 ** windows <= flips else 1 / (1 + flips)


def windows_to_resolve(tests: int, alpha: float = ALPHA, flips: int = RESAMPLES):
    """The fewest windows a cell with which the smallest of `tests` sign-flip p-values could
    pass Holm's first step (tests x p < alpha); below that no test of the family can be
    significant. None when no number of windows can (flips too few for that many tests)."""
    windows = 1
    while tests * smallest_sign_flip_p(windows, flips) >= alpha:
        if 2 ** windows > flips:  # the smallest p no longer falls with more windows
            return None
        windows += 1
    return windows


def paired_change(a: WindowScores, b: WindowScores, resamples: int = RESAMPLES,
                  seed: int = 0) -> dict:
    """B against A on the same windows: change (PPL_B / PPL_A - 1), its paired 95% bootstrap
    interval ci95 [low, high], the sign-flip p_value, and the windows that would resolve a 1%
    and a 0.5% change (see windows_needed)."""
    low, high = bootstrap_change_interval(a, b, resamples, seed)
    differences = b.nll_sum - a.nll_sum
    per_token = differences / a.tokens
    return {"change": math.expm1(b.cross_entropy - a.cross_entropy), "ci95": [low, high],
            "p_value": sign_flip_p_value(differences, resamples, seed),
            "num_windows": int(len(differences)),
            "windows_needed_1pct": windows_needed(per_token, 0.01),
            "windows_needed_0.5pct": windows_needed(per_token, 0.005)}


def windows_needed(per_token_differences, change: float, level: float = LEVEL):
    """Windows whose paired interval would be +-change wide: n = (z sd / log(1 + change))^2,
    with sd the standard deviation over windows of the per-token NLL difference (B - A) of
    each window and z the normal quantile of the level. A true change of that size is then
    resolved (its interval excludes 0) in about half of the runs; for 80% of runs take about
    2x as many. None with fewer than two windows (no spread to measure)."""
    from scipy.stats import norm
    d = np.asarray(per_token_differences, dtype=np.float64).reshape(-1)
    if len(d) < 2:
        return None
    sd = float(d.std(ddof=1))
    z = float(norm.ppf(0.5 + level / 2))
    return max(2, math.ceil((z * sd / math.log1p(change)) ** 2))


def holm(p_values, alpha: float = ALPHA) -> tuple:
    """Holm's step-down correction: (adjusted p-values, significant flags), in input order.
    Sorted ascending, p_(i) is adjusted to max over j <= i of min(1, (m - j + 1) p_(j))
    (i, j from 1) and is significant when the adjusted value is below alpha. None entries (no
    comparison) stay None and do not count in m."""
    present = [i for i, p in enumerate(p_values) if p is not None]
    adjusted, significant = [None] * len(p_values), [None] * len(p_values)
    m = len(present)
    running = 0.0
    for rank, i in enumerate(sorted(present, key=lambda i: p_values[i])):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i], significant[i] = running, running < alpha
    return adjusted, significant


def wilson_interval(successes: int, trials: int, level: float = LEVEL) -> list:
    """Wilson score interval [low, high] of a proportion (scipy.stats.binomtest)."""
    from scipy.stats import binomtest
    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials and trials >= 1; got {successes} of "
                         f"{trials}")
    ci = binomtest(int(successes), int(trials)).proportion_ci(level, method="wilson")
    return [float(ci.low), float(ci.high)]


def paired_binary(a_correct, b_correct, level: float = LEVEL) -> dict:
    """Two methods' outcomes (True = correct) on the same samples, in the same order.

    McNemar's exact test: only the discordant samples (one method right, the other wrong)
    carry information on the difference; under the null hypothesis each is equally likely to
    favour either side, so p is the two-sided binomial test of a_only among a_only + b_only at
    1/2 (scipy.stats.binomtest). p = 1 when there is no discordant sample. Each accuracy gets
    its Wilson interval (wilson_interval)."""
    from scipy.stats import binomtest
    a = np.asarray(a_correct, dtype=bool).reshape(-1)
    b = np.asarray(b_correct, dtype=bool).reshape(-1)
    if len(a) != len(b) or len(a) == 0:
        raise ValueError(f"need the same non-zero number of samples on both sides; got "
                         f"{len(a)} and {len(b)}")
    a_only, b_only = int((a & ~b).sum()), int((b & ~a).sum())
    discordant = a_only + b_only
    p = float(binomtest(a_only, discordant, 0.5).pvalue) if discordant else 1.0
    return {"accuracy_a": float(a.mean()), "accuracy_b": float(b.mean()),
            "ci95_a": wilson_interval(int(a.sum()), len(a), level),
            "ci95_b": wilson_interval(int(b.sum()), len(b), level),
            "difference": float(b.mean() - a.mean()), "a_only": a_only, "b_only": b_only,
            "p_value": p, "samples": int(len(a))}


def paired_scores(a_scores, b_scores, seed: int = 0, level: float = LEVEL) -> dict:
    """Two methods' per-sample task scores on the same samples, in the same order: for 0/1
    scores paired_binary (McNemar), otherwise (shares of answers, F1, ROUGE-L) the sign-flip
    p-value of the per-sample differences (sign_flip_p_value). Both give the two mean scores,
    their difference (B - A), the p-value and the test's name; a_only/b_only (the discordant
    samples) only for 0/1 scores."""
    a = np.asarray(a_scores, dtype=np.float64).reshape(-1)
    b = np.asarray(b_scores, dtype=np.float64).reshape(-1)
    if len(a) != len(b) or len(a) == 0:
        raise ValueError(f"need the same non-zero number of samples on both sides; got "
                         f"{len(a)} and {len(b)}")
    if np.isin(a, (0.0, 1.0)).all() and np.isin(b, (0.0, 1.0)).all():
        return {**paired_binary(a == 1, b == 1, level), "test": "McNemar"}
    return {"accuracy_a": float(a.mean()), "accuracy_b": float(b.mean()),
            "difference": float(b.mean() - a.mean()), "a_only": None, "b_only": None,
            "p_value": sign_flip_p_value(b - a, seed=seed), "samples": int(len(a)),
            "test": "sign-flip"}


def seed_spread(values) -> dict:
    """Mean over seeds and the spread between them: sample standard deviation (None for one
    seed), min and max."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(v) == 0:
        raise ValueError("need at least one value")
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else None,
            "min": float(v.min()), "max": float(v.max()), "seeds": int(len(v))}


# -- cells of a results file (R with R["windows"]) ------------------------------------------

@functools.lru_cache(maxsize=4096)
def _cached_change(a_nll: tuple, b_nll: tuple, tokens: tuple, seed: int) -> dict:
    # The runner rewrites the results after every cell: each pair is computed once.
    return paired_change(WindowScores(np.array(a_nll), np.array(tokens)),
                         WindowScores(np.array(b_nll), np.array(tokens)), seed=seed)


def compare_cells(a: dict, b: dict, seed: int = 0, where: str = "cell") -> dict:
    """paired_change of two cells' R (B against A), from their R["windows"]."""
    sides = [WindowScores.from_record(r.get("windows"), where) for r in (a, b)]
    _check_paired(*sides)
    change = _cached_change(tuple(sides[0].nll_sum.tolist()), tuple(sides[1].nll_sum.tolist()),
                            tuple(sides[0].tokens.tolist()), int(seed))
    return {**change, "ci95": list(change["ci95"])}  # the cached one stays unchanged


def versus_dense(result: dict, dense: dict | None, seed: int = 0) -> dict:
    """A sparse cell's paired interval and p-value of its change vs dense (the fields beside
    delta_vs_dense); None where either cell is missing, failed or lacks its windows."""
    none = {"delta_vs_dense_ci95": None, "delta_vs_dense_p": None}
    if dense is None or result.get("error") or dense.get("error") \
            or "windows" not in result or "windows" not in dense:
        return none
    change = compare_cells(dense, result, seed)
    return {"delta_vs_dense_ci95": change["ci95"], "delta_vs_dense_p": change["p_value"]}


def over_seeds(outcomes: list, seeds: list) -> dict:
    """One cell's R from the R of each of its seeds (a randomised method run with --seeds N).

    The cell's metrics are those of the per-window NLL averaged over the seeds (each window's
    expected loss under the method's random draws), so the cell stays paired with every other
    cell on the same windows; with equal windows its perplexity is the geometric mean of the
    seeds' perplexities. R["perplexity_over_seeds"] holds each seed's perplexity and their
    mean and spread (seed_spread). A failed seed fails the cell."""
    from .metrics import summarize
    failed = next((r for r in outcomes if r.get("error")), None)
    if failed is not None:
        return failed
    first = outcomes[0]["windows"]
    nll = np.mean([r["windows"]["nll_sum"] for r in outcomes], axis=0)
    merged = dict(outcomes[0])  # the protocol's record: block size, parameters, ...
    merged.update(summarize(nll, first["tokens"], first["bytes"], seed=seeds[0]))
    ppl = [r["perplexity"] for r in outcomes]
    merged.update(density=float(np.mean([r["density"] for r in outcomes])),
                  wall_seconds=float(sum(r.get("wall_seconds") or 0 for r in outcomes)),
                  perplexity_over_seeds={**seed_spread(ppl), "values": ppl,
                                         "seed_list": list(seeds)})
    return merged
