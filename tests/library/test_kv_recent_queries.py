"""The kv protocol's rolling buffer of recent post-RoPE queries (KVState.recent_queries): kept
only for a method that asks for it, across chunks, oldest first, the queries as attended."""
import pytest
import torch
from helpers import attention_inputs, tiny_llama

from cabattn.kv_cache import EvictingLayer
from cabattn.kv_protocol import KVProtocol
from cabattn.methods import get_method
from cabattn.methods.streaming_llm import StreamingLLM

LENGTH, K_MIN, SPARSITY = 60, 8, 0.75  # K = 15 of 60


@pytest.fixture(scope="module")
def model(single_thread):
    return tiny_llama(attn_implementation="sdpa")


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (2, LENGTH), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def dense_queries(model, ids):
    """Layer 0's post-RoPE queries [B, Hq, L, d] of a dense pass (layer 0's inputs do not
    depend on eviction, so the stream attends exactly these)."""
    return attention_inputs(model, ids, [0])[0][0]


class Watching(StreamingLLM):
    """streaming_llm's rule, asking for a query window and recording what each eviction shows."""

    def __init__(self, window):
        super().__init__()
        self.window, self.shown = window, []

    @property
    def recent_query_window(self):
        return self.window

    def kv_keep(self, state):
        if state.layer_idx == 0:
            self.shown.append((int(state.positions.max()),
                               None if state.recent_queries is None
                               else state.recent_queries.clone()))
        return super().kv_keep(state)


def test_the_buffer_holds_the_last_w_queries_across_chunks_oldest_first():
    layer = EvictingLayer(capacity=8, block_size=4, num_blocks=8, recent_query_window=5)
    seen = []
    for chunk in (3, 1, 4, 1, 7, 2, 5, 1):
        queries = torch.randn(2, 3, chunk, 4)
        seen.append(queries)
        layer.note_recent_queries(queries)
        want = torch.cat(seen, dim=2)[:, :, -5:]
        assert layer.recent_query_count == want.shape[2]
        torch.testing.assert_close(layer.recent_query_buffer[:, :, :layer.recent_query_count],
                                   want, rtol=0, atol=0)
    layer.reset()
    assert layer.recent_query_count == 0


@pytest.mark.parametrize("chunk", [1, 4])
@pytest.mark.parametrize("window", [3, 32])
def test_the_rule_sees_the_queries_of_the_newest_positions(model, ids, dense_queries, chunk,
                                                           window):
    method = Watching(window)
    with KVProtocol(model, method, SPARSITY, kv_chunk=chunk, k_min=K_MIN):
        with torch.no_grad():
            model(ids, labels=ids)
    assert len(method.shown) == len(range(15, LENGTH, chunk))
    for newest, queries in method.shown:
        n = min(window, newest + 1)
        assert queries.shape == (2, 4, n, dense_queries.shape[-1])
        torch.testing.assert_close(queries, dense_queries[:, :, newest + 1 - n:newest + 1])


def test_nothing_is_kept_for_a_method_that_does_not_ask(model, ids):
    method = Watching(None)
    with KVProtocol(model, method, SPARSITY, kv_chunk=2, k_min=K_MIN) as _:
        with torch.no_grad():
            model(ids, labels=ids)
        cache = _protocol_cache(model)
    assert method.shown and all(queries is None for _, queries in method.shown)
    assert all(layer.recent_query_buffer is None for layer in cache.layers)


def _protocol_cache(model):
    return model.forward.__self__.cache


@pytest.mark.parametrize("window", [0, -3, 2.5, True, "32"])
def test_a_bad_window_is_rejected(window):
    with pytest.raises(ValueError, match=f"recent query window {window!r} must be a positive"):
        EvictingLayer(capacity=8, block_size=4, num_blocks=2, recent_query_window=window)


def test_registered_methods_keep_no_queries_unless_they_read_them():
    assert get_method("h2o").recent_query_window is None
