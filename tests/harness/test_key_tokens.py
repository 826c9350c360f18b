"""Key tokens (docs/metrics.md) on a tiny model against a plain-PyTorch computation of the
definition, and key-token perplexity in the cells of a run."""
import json
import math

import pytest
import torch
from eval_assets import tiny_model, tiny_run_args, tiny_text  # noqa: F401
from helpers import tiny_llama

from eval import cli, key_tokens

pytestmark = pytest.mark.usefixtures("single_thread")


def _model():
    return tiny_llama(vocab_size=96, positions=512)


def _plain(model, ids, short, bos=None):
    """Per target t (1..L-1): NLL_full from the whole prefix; NLL_short from the S tokens
    before the first target of t's block (blocks of S/4 targets from S + 1 on) up to t - 1,
    behind the BOS token when there is one, one forward per target; NaN for t <= S."""
    length, step = ids.shape[0], short // 4
    full, shorts = [], []
    with torch.no_grad():
        logp = model(ids[None]).logits[0].double().log_softmax(-1)
        for t in range(1, length):
            full.append(-float(logp[t - 1, ids[t]]))
            if t <= short:
                shorts.append(math.nan)
                continue
            block_start = short + 1 + (t - short - 1) // step * step
            context = ids[block_start - short:t]
            if bos is not None:
                context = torch.cat([torch.tensor([bos]), context])
            out = model(context[None]).logits[0, -1].double().log_softmax(-1)
            shorts.append(-float(out[ids[t]]))
    return torch.tensor(full, dtype=torch.float64), torch.tensor(shorts, dtype=torch.float64)


def test_short_context_nll_and_key_tokens_equal_the_definition(monkeypatch):
    model = _model()
    ids = torch.randint(0, 96, (150,), generator=torch.Generator().manual_seed(1))
    full, shorts = _plain(model, ids, 64)
    with torch.no_grad():
        got_full = key_tokens.token_nll(model(ids[None]).logits, ids[None])[0]
        got_short = key_tokens.short_context_nll(model, ids, 64, batch=3)
    assert torch.allclose(got_full, full, atol=1e-5)
    assert torch.isnan(got_short[:64]).all() and torch.isnan(shorts[:64]).all()
    assert torch.allclose(got_short[64:], shorts[64:], atol=1e-5)
    # A random model's predictions are never confident: move the thresholds so that the
    # mask has both kinds, and compare it with the definition written out.
    monkeypatch.setattr(key_tokens, "KEY_CEILING", float(full.median()))
    monkeypatch.setattr(key_tokens, "KEY_GAIN", 0.0)
    mask = key_tokens.key_token_mask(got_full, got_short)
    plain = [(not math.isnan(s)) and s - f > 0.0 and f < float(full.median())
             for f, s in zip(full.tolist(), shorts.tolist())]
    assert mask.tolist() == plain and 0 < sum(plain) < len(plain) - 64


def test_short_contexts_start_with_the_windows_bos():
    model = _model()
    ids = torch.randint(3, 96, (150,), generator=torch.Generator().manual_seed(2))
    ids[0] = 1  # a window of BOS (id 1) and text
    _, shorts = _plain(model, ids, 64, bos=1)
    with torch.no_grad():
        got = key_tokens.short_context_nll(model, ids, 64, batch=3, bos_token_id=1)
        without = key_tokens.short_context_nll(model, ids, 64, batch=3)
    assert torch.isnan(got[:64]).all()
    assert torch.allclose(got[64:], shorts[64:], atol=1e-5)
    assert not torch.allclose(without[64:], shorts[64:], atol=1e-3)
    # Windows that start with the model's BOS, found without saying so: refused, not scored.
    assert model.config.bos_token_id == 1
    with pytest.raises(ValueError, match="start with the model's BOS token"):
        key_tokens.find(model, ids[None], 64, "cpu")
    assert key_tokens.find(model, ids[None], 64, "cpu", bos_token_id=1).short == 64


def test_the_thresholds_are_longppls():
    full = torch.tensor([1.9, 1.9, 2.1, 0.5, 0.5])
    short = torch.tensor([4.0, 3.8, 9.0, 2.6, math.nan], dtype=torch.float32)
    # gain > 2 and full < 2: only the first (gain 2.1) and the fourth (2.1).
    assert key_tokens.key_token_mask(full, short).tolist() == [True, False, False, True, False]
    assert key_tokens.key_context(1024) == 128 and key_tokens.key_context(256) == 64


def test_cells_report_key_token_perplexity(tiny_model, tiny_text, tmp_path, monkeypatch):
    # Every prediction past S counts as a key token: the key-token PPL is then the PPL of
    # those predictions, and dense's equals the dense value each cell reports.
    monkeypatch.setattr(key_tokens, "KEY_CEILING", math.inf)
    monkeypatch.setattr(key_tokens, "KEY_GAIN", -math.inf)
    args = tiny_run_args(tiny_model, tiny_text, tmp_path, "--methods", "dense", "h2o",
                         "--context-lengths", "128", "--fixed-sparsity", "0.75", "--k-min", "16",
                         "--block-size", "16", "--no-sparsity-sweep", "--max-windows", "2",
                         "--no-report")
    assert cli.main(args) == cli.EXIT_OK
    cells = json.loads((tmp_path / "tiny.json").read_text())["results"]["tiny"]
    dense = cells["dense"]["context_length_sweep"]["128"]
    h2o = cells["h2o"]["context_length_sweep"]["128"]
    assert dense["num_key_tokens"] == h2o["num_key_tokens"] == 2 * (127 - 64)
    assert dense["key_context"] == 64 and dense["key_tokens_indicative_only"] is False
    assert dense["key_token_perplexity"] == pytest.approx(dense["key_token_perplexity_dense"],
                                                          rel=1e-6)
    assert h2o["key_token_perplexity_dense"] == dense["key_token_perplexity_dense"]
    assert h2o["key_token_perplexity"] != pytest.approx(dense["key_token_perplexity"], rel=1e-6)


def test_no_key_tokens_flag(tiny_model, tiny_text, tmp_path):
    args = tiny_run_args(tiny_model, tiny_text, tmp_path, "--methods", "dense",
                         "--context-lengths", "128", "--no-sparsity-sweep", "--max-windows", "1",
                         "--no-report", "--no-key-tokens")
    assert cli.main(args) == cli.EXIT_OK
    cell = json.loads((tmp_path / "tiny.json").read_text())["results"]["tiny"]["dense"]
    assert "num_key_tokens" not in cell["context_length_sweep"]["128"]
