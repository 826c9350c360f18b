"""eval.metrics.summarize against hand-computed values."""
import math

import numpy as np
import pytest

from eval.metrics import NonFiniteLossError, summarize


def test_token_weighted_not_mean_of_window_means():
    # Window 0: 10 nats over 10 tokens (1.0/token); window 1: 60 nats over 20 tokens (3.0/token).
    # Token-weighted CE = 70 / 30; the mean of window means would be 2.0.
    result = summarize([10.0, 60.0], [10, 20], [40, 80])
    assert result["cross_entropy"] == pytest.approx(70 / 30, rel=1e-12)
    assert result["perplexity"] == pytest.approx(math.exp(70 / 30), rel=1e-12)
    assert result["num_tokens"] == 30
    assert result["num_samples"] == 2


def test_bits_per_token_and_per_byte():
    result = summarize([10.0, 60.0], [10, 20], [40, 80])
    assert result["bits_per_token"] == pytest.approx(70 / 30 / math.log(2), rel=1e-12)
    # 70 nats = 70 / ln 2 bits over 120 bytes.
    assert result["bits_per_byte"] == pytest.approx(70 / math.log(2) / 120, rel=1e-12)


def test_uniform_model_over_256_bytes_is_8_bits_per_byte():
    # A model spreading probability evenly over 256 byte values, one token per byte.
    nll = [100 * math.log(256), 50 * math.log(256)]
    result = summarize(nll, [100, 50], [100, 50])
    assert result["bits_per_byte"] == pytest.approx(8.0, rel=1e-12)
    assert result["bits_per_token"] == pytest.approx(8.0, rel=1e-12)
    assert result["perplexity"] == pytest.approx(256.0, rel=1e-12)


def _windows(n, seed):
    rng = np.random.default_rng(seed)
    tokens = np.full(n, 511)
    nll = tokens * rng.normal(3.0, 0.3, size=n)
    return nll, tokens, tokens * 4


def test_bootstrap_interval_contains_point_and_shrinks_with_more_windows():
    few = summarize(*_windows(8, seed=1), seed=0)
    many = summarize(*_windows(512, seed=1), seed=0)
    for result in (few, many):
        low, high = result["ppl_ci95"]
        assert low < result["perplexity"] < high
    assert (many["ppl_ci95"][1] - many["ppl_ci95"][0]) < \
        0.5 * (few["ppl_ci95"][1] - few["ppl_ci95"][0])


def test_bootstrap_is_seeded():
    data = _windows(32, seed=2)
    assert summarize(*data, seed=5)["ppl_ci95"] == summarize(*data, seed=5)["ppl_ci95"]
    assert summarize(*data, seed=5)["ppl_ci95"] != summarize(*data, seed=6)["ppl_ci95"]


def test_one_window_has_a_degenerate_interval():
    result = summarize([20.0], [10], [30])
    assert result["ppl_ci95"] == pytest.approx([math.exp(2.0)] * 2, rel=1e-12)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_loss_fails_loudly(bad):
    with pytest.raises(NonFiniteLossError, match="window 1"):
        summarize([10.0, bad, 5.0], [10, 10, 10], [30, 30, 30])


@pytest.mark.parametrize("args", [([], [], []), ([1.0], [1, 2], [3]), ([1.0], [0], [3]),
                                  ([1.0], [1], [0])])
def test_bad_counts_raise(args):
    with pytest.raises(ValueError):
        summarize(*args)
