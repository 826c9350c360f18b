"""eval.statistics against plain computations of the definitions (docs/statistics.md)."""
import itertools
import math
import statistics as pystats

import numpy as np
import pytest

from eval import statistics as st
from eval.metrics import summarize

TOKENS = 1023


def _scores(per_token_nll):
    """WindowScores of windows of TOKENS predictions with the given mean NLLs."""
    nll = np.asarray(per_token_nll, dtype=np.float64) * TOKENS
    return st.WindowScores(nll, np.full(len(nll), float(TOKENS)))


def _plain_bootstrap(a, b, resamples, seed):
    """The definition, one resample at a time: the same indices for both sides, each side's
    PPL token-weighted, percentiles of the ratio minus one."""
    n = len(a.nll_sum)
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    ratios = []
    for row in idx:
        ppl_a = math.exp(sum(a.nll_sum[i] for i in row) / sum(a.tokens[i] for i in row))
        ppl_b = math.exp(sum(b.nll_sum[i] for i in row) / sum(b.tokens[i] for i in row))
        ratios.append(ppl_b / ppl_a - 1)
    return np.percentile(ratios, [2.5, 97.5])


def test_bootstrap_interval_equals_the_definition():
    rng = np.random.default_rng(3)
    a = _scores(rng.normal(3.0, 0.4, size=7))
    b = _scores(a.nll_sum / TOKENS + rng.normal(0.02, 0.01, size=7))
    low, high = st.bootstrap_change_interval(a, b, resamples=2000, seed=11)
    plain = _plain_bootstrap(a, b, 2000, 11)
    assert [low, high] == pytest.approx(plain, rel=1e-9)
    change = st.paired_change(a, b, resamples=2000, seed=11)
    assert change["change"] == pytest.approx(
        math.exp((b.nll_sum.sum() - a.nll_sum.sum()) / (7 * TOKENS)) - 1, rel=1e-12)
    assert low < change["change"] < high


def _plain_sign_flip(d):
    """Exact: every sign vector, two-sided, the observed one included."""
    observed = abs(sum(d))
    stats = [abs(sum(s * x for s, x in zip(signs, d)))
             for signs in itertools.product((1, -1), repeat=len(d))]
    return sum(v >= observed - 1e-12 for v in stats) / len(stats)


def test_sign_flip_exact_on_known_inputs():
    # |+-1 +-2 +-3 +-4| reaches 10 only with all signs equal: 2 of 16.
    assert st.sign_flip_p_value([1.0, 2.0, 3.0, 4.0]) == pytest.approx(2 / 16)
    # Four windows can never reach p < 0.125: what a 4-window cell can say.
    assert st.sign_flip_p_value([5.0, 5.0, 5.0, 5.0]) == pytest.approx(0.125)
    rng = np.random.default_rng(0)
    for n in (1, 3, 9, 13):
        d = rng.normal(0.3, 1.0, size=n)
        assert st.sign_flip_p_value(d) == pytest.approx(_plain_sign_flip(d), abs=1e-12)


def test_sign_flip_monte_carlo_is_close_to_exact():
    # 2^14 > 10,000 flips: random signs, whose p is within a few standard errors of exact.
    d = np.random.default_rng(5).normal(0.25, 1.0, size=14)
    exact = _plain_sign_flip(d)
    sampled = st.sign_flip_p_value(d, flips=10_000, seed=2)
    assert 0.01 < exact < 0.5
    assert abs(sampled - exact) < 4 * math.sqrt(exact * (1 - exact) / 10_000) + 1e-4
    assert sampled == st.sign_flip_p_value(d, flips=10_000, seed=2)  # seeded


def test_paired_significant_where_unpaired_is_not():
    # Windows of very different difficulty (per-token NLL 2..4); B is worse by 0.01 nats on
    # every window, a 1% change. Paired: every difference is positive. Unpaired: the spread
    # between windows swamps it.
    rng = np.random.default_rng(7)
    difficulty = rng.uniform(2.0, 4.0, size=12)
    a = _scores(difficulty)
    b = _scores(difficulty + 0.01 + rng.normal(0, 0.002, size=12))
    paired = st.paired_change(a, b, seed=1)
    assert paired["p_value"] == pytest.approx(2 / 2 ** 12)  # every sign positive: exact
    assert paired["ci95"][0] > 0.005 and paired["ci95"][1] < 0.015
    # Unpaired: each PPL's own bootstrap interval contains the other's PPL ...
    ra, rb = (summarize(s.nll_sum, s.tokens, s.tokens * 4, seed=1, n_boot=10_000)
              for s in (a, b))
    assert ra["ppl_ci95"][0] < rb["perplexity"] < ra["ppl_ci95"][1]
    assert rb["ppl_ci95"][0] < ra["perplexity"] < rb["ppl_ci95"][1]
    # ... and a permutation test that ignores the pairing (shuffling the 24 windows between
    # the two methods) finds nothing.
    pooled = np.concatenate([a.nll_sum, b.nll_sum])
    observed = abs(b.nll_sum.mean() - a.nll_sum.mean())
    g = np.random.default_rng(0)
    hits = 0
    for _ in range(5000):
        perm = g.permutation(pooled)
        hits += abs(perm[12:].mean() - perm[:12].mean()) >= observed
    assert (hits + 1) / 5001 > 0.5


def test_holm_against_the_definition():
    p = [0.01, 0.04, 0.03, None, 0.005]
    adjusted, significant = st.holm(p)
    # Sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, max(0.06, 0.04*1) = 0.06.
    assert adjusted[3] is None
    assert [adjusted[i] for i in (0, 1, 2, 4)] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert significant == [True, False, False, None, True]
    assert st.holm([0.3, 0.2])[0] == pytest.approx([0.4, 0.4])  # monotone in rank
    assert st.holm([0.9, 0.8])[0] == pytest.approx([1.0, 1.0])  # capped at 1


def test_windows_needed_against_the_definition():
    d = [0.0, 0.03, 0.01, 0.02, -0.01, 0.04]
    z = pystats.NormalDist().inv_cdf(0.975)
    sd = pystats.stdev(d)
    assert st.windows_needed(d, 0.01) == math.ceil((z * sd / math.log(1.01)) ** 2)
    assert st.windows_needed(d, 0.005) == math.ceil((z * sd / math.log(1.005)) ** 2)
    assert st.windows_needed([0.1], 0.01) is None  # one window: no spread to measure


def _plain_wilson(k, n, z=pystats.NormalDist().inv_cdf(0.975)):
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [centre - half, centre + half]


def test_paired_binary_mcnemar_and_wilson():
    a = [1, 1, 1, 0, 1, 1, 1, 1, 0, 1]
    b = [0, 0, 0, 0, 1, 1, 1, 0, 1, 1]
    out = st.paired_binary(a, b)
    assert (out["a_only"], out["b_only"]) == (4, 1)
    # Two-sided exact binomial of 4 of 5 discordant at 1/2: P(X <= 1) + P(X >= 4) = 12/32.
    assert out["p_value"] == pytest.approx(12 / 32)
    assert out["accuracy_a"] == 0.8 and out["difference"] == pytest.approx(-0.3)
    assert out["ci95_a"] == pytest.approx(_plain_wilson(8, 10), rel=1e-9)
    assert out["ci95_b"] == pytest.approx(_plain_wilson(5, 10), rel=1e-9)
    assert st.paired_binary([1, 0], [1, 0])["p_value"] == 1.0  # no discordant pair
    with pytest.raises(ValueError, match="same non-zero number"):
        st.paired_binary([1, 0], [1])


def test_unpaired_cells_are_refused():
    a, b = _scores([3.0, 3.1, 2.9]), _scores([3.0, 3.1])
    with pytest.raises(ValueError, match="same windows"):
        st.paired_change(a, b)
    with pytest.raises(ValueError, match="rerun the same eval.run command"):
        st.compare_cells({"perplexity": 1.0}, {"perplexity": 1.0})


def test_seed_spread():
    out = st.seed_spread([10.0, 12.0, 11.0])
    assert out == {"mean": 11.0, "std": pytest.approx(1.0), "min": 10.0, "max": 12.0,
                   "seeds": 3}
    assert st.seed_spread([4.0])["std"] is None


def test_summarize_keeps_the_windows_in_order():
    result = summarize([10.0, 60.0, 30.0], [10, 20, 10], [40, 80, 41])
    assert result["windows"] == {"nll_sum": [10.0, 60.0, 30.0], "tokens": [10, 20, 10],
                                 "bytes": [40, 80, 41]}
