"""The kv protocol on the real offline model (SmolLM2-135M) and real book text.

At s = 0.9 (K = 64) with chunks of tokens, to keep it to about a minute on a CPU.
StreamingLLM's attention sinks must matter the way the paper reports: without them the
bounded cache loses the first tokens and perplexity climbs (one 512-token window, chunks of
16). Every method gives a finite loss (one 256-token window, chunks of 32).
"""
import math

import pytest
import torch

from cabattn import methods as registry
from cabattn.kv_protocol import KVProtocol

pytestmark = pytest.mark.slow  # (pyproject.toml: markers)

SPARSITY = 0.9


@pytest.fixture(scope="module")
def smollm2(single_thread):
    from eval.data import load_windows
    from eval.models import load_model
    loaded = load_model("smollm2-135m")
    windows = {length: load_windows("pd-books", loaded.tokenizer, length, max_windows=1)
               .input_ids[:1] for length in (256, 512)}
    return loaded.model, windows


def kv_perplexity(model, ids, method, chunk, **params):
    with KVProtocol(model, method, SPARSITY, kv_chunk=chunk, **params) as stats, \
            torch.inference_mode():
        loss = float(model(ids, labels=ids).loss)
    return math.exp(loss), stats.density


def test_attention_sinks_lower_perplexity(smollm2):
    model, windows = smollm2
    with_sinks, density = kv_perplexity(model, windows[512], "streaming_llm", 16, n_sink=4)
    without_sinks, _ = kv_perplexity(model, windows[512], "streaming_llm", 16, n_sink=0)
    print(f"streaming_llm PPL: n_sink=4 {with_sinks:.2f}, n_sink=0 {without_sinks:.2f}, "
          f"density {density:.3f}")
    assert with_sinks < 0.5 * without_sinks


@pytest.mark.parametrize("name", sorted(set(registry.available("kv")) - {"dense"}))
def test_every_method_is_finite(smollm2, name):
    model, windows = smollm2
    ppl, density = kv_perplexity(model, windows[256], name, 32)
    print(f"{name}: PPL {ppl:.2f}, density {density:.3f}")
    assert math.isfinite(ppl) and 0 < density < 1
