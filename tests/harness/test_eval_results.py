"""Results files: strict JSON, atomic writes, the cell store, and clear errors for corrupt files."""
import json
import math
import os

import pytest

from eval import results
from eval.results import CellStore, CorruptFileError


def test_strict_json_refuses_nan_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "r.json"
    results.write_json_atomic(path, {"perplexity": 12.5})
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError):
            results.write_json_atomic(path, {"perplexity": bad})
    assert json.loads(path.read_text()) == {"perplexity": 12.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no temporary left over


def test_atomic_write_replaces_whole_file(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    results.write_json_atomic(path, {"a": list(range(1000))})
    # A crash during the write (here: fsync fails) must leave the previous file intact.
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("disk gone")))
    with pytest.raises(OSError, match="disk gone"):
        results.write_json_atomic(path, {"a": "new"})
    assert json.loads(path.read_text()) == {"a": list(range(1000))}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_read_json_rejects_nan_literal(tmp_path):
    path = tmp_path / "r.json"
    path.write_text('{"perplexity": NaN}')
    with pytest.raises(CorruptFileError, match=str(path)):
        results.read_json(path)


def test_finite_or_none():
    assert results.finite_or_none(1.5) == 1.5
    assert results.finite_or_none(math.nan) is None
    assert results.finite_or_none(math.inf) is None
    assert results.finite_or_none(None) is None


def _key(**changes):
    key = {"dataset": "brown", "method": "h2o", "sparsity": 0.9, "context_length": 1024,
           "params": {"h2o_recent_ratio": 0.5}, "block_size": 16}
    return {**key, **changes}


def _result(perplexity=20.0):
    """A finished cell's R, as compute_cell returns it."""
    ce = math.log(perplexity)
    return {"perplexity": perplexity, "cross_entropy": ce, "bits_per_token": ce / math.log(2),
            "bits_per_byte": 1.25, "num_tokens": 1023, "num_samples": 1,
            "ppl_ci95": [perplexity, perplexity], "density": 0.1, "wall_seconds": 2.5,
            "windows": {"nll_sum": [ce * 1023], "tokens": [1023], "bytes": [4000]}}


def test_cell_store_roundtrip_and_keying(tmp_path):
    store = CellStore(tmp_path / "cells")
    assert store.get(_key()) is None and len(store) == 0
    store.put(_key(), _result())
    assert store.get(_key()) == _result()
    # Key order does not matter; any defining value does.
    assert store.get(dict(reversed(list(_key().items())))) == _result()
    for change in ({"sparsity": 0.5}, {"block_size": 32}, {"params": {"h2o_recent_ratio": 0.4}}):
        assert store.get(_key(**change)) is None
    # A second store over the same folder (a resumed process) sees the cell.
    assert CellStore(tmp_path / "cells").get(_key()) == _result()
    assert len(store) == 1 and store.clear() == 1 and store.get(_key()) is None


def test_corrupt_cell_file_is_named(tmp_path):
    store = CellStore(tmp_path / "cells")
    path = store.put(_key(), _result())
    path.write_text('{"key": {"dataset": "bro')  # truncated by hand
    with pytest.raises(CorruptFileError) as err:
        store.get(_key())
    assert str(path) in str(err.value) and "--fresh" in str(err.value)
    # A valid JSON file under the wrong name (not this cell's result) is corrupt as well.
    path.write_text(json.dumps({"key": _key(sparsity=0.5), "result": {}}))
    with pytest.raises(CorruptFileError, match="does not hold the result"):
        store.get(_key())


@pytest.mark.parametrize("edit, message", [
    (lambda r: {}, "lacks perplexity"),
    (lambda r: {**r, "perplexity": "garbage"}, "perplexity = 'garbage'"),
    (lambda r: {**r, "num_tokens": 10.5}, "num_tokens = 10.5"),
    (lambda r: {**r, "ppl_ci95": None}, "ppl_ci95 = None"),
    (lambda r: {k: v for k, v in r.items() if k != "windows"}, "lacks the per-window sums"),
    (lambda r: {**r, "windows": {**r["windows"], "tokens": [1023, 1]}},
     "windows.tokens is not 1 finite numbers"),
    (lambda r: [r], "not a mapping"),
    (lambda r: {**r, "perplexity": None, "error": "x"}, "perplexity = None"),
])
def test_a_hand_edited_cell_that_is_still_json_is_corrupt(edit, message, tmp_path):
    store = CellStore(tmp_path / "cells")
    path = store.put(_key(), _result())
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "result": edit(record["result"])}))
    with pytest.raises(CorruptFileError) as err:
        store.get(_key())
    assert str(path) in str(err.value) and message in str(err.value), err.value


def test_a_prefill_task_cell_gets_no_prompt_change_against_a_dense_cell_scored_otherwise():
    """Under a protocol that compresses the context once, a task cell scores its prompt from
    the context's end on (window_first) and its dense cell from the first token: their
    perplexities are of other tokens, so assemble gives no change against dense."""
    from eval.runner import Cell
    from eval.tasks.samples import TaskSpec

    def outcome(firsts, perplexity):
        return {"kind": "task", "perplexity": perplexity,
                "per_sample": [{"score": 1.0, "window_first": f} for f in firsts]}

    dense_spec = TaskSpec("passkey", 1024, "dense", 0.0)
    sparse_spec = TaskSpec("passkey", 1024, "h2o", 0.5)
    cells = [Cell("passkey", "h2o", "sparsity_sweep", "0.5", 0.5, sparse_spec)]
    for firsts, expected in (([0, 0], 0.25), ([700, 650], None)):
        outcomes = {dense_spec: outcome([0, 0], 8.0), sparse_spec: outcome(firsts, 10.0)}
        record = results.assemble(cells, outcomes, {})["results"]["passkey"]["h2o"][
            "sparsity_sweep"]["0.5"]
        assert record["delta_vs_dense"] == expected
    assert results.scored_alike({"perplexity": 3.0}, {"perplexity": 4.0})  # windows: alike
