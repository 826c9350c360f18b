"""Per-window sums through a real run: every cell keeps them, a store written before they were
kept is recomputed once (never read as the new format), and eval.compare runs on the JSON."""
import json

import pytest
from eval_assets import tiny_model, tiny_run_args, tiny_text  # noqa: F401

from eval import cli, compare
from eval.results import CELL_FORMAT, CellStore, cell_id

pytestmark = pytest.mark.usefixtures("single_thread")
RUN = ["--methods", "dense", "h2o", "--context-lengths", "128", "--fixed-sparsity", "0.5",
       "--k-min", "16", "--block-size", "16", "--no-sparsity-sweep", "--max-windows", "3",
       "--no-report"]


def _stored(monkeypatch) -> list:
    """The keys the runner stores from now on (one per computed cell)."""
    stored, put = [], CellStore.put
    monkeypatch.setattr(CellStore, "put", lambda self, key, *a, **kw:
                        stored.append(key) or put(self, key, *a, **kw))
    return stored


def _cells(path):
    return json.loads(path.read_text())["results"]["tiny"]


def _downgrade(folder) -> int:
    """Rewrite every stored cell as an older version wrote it: no cell_format in the key, no
    per-window sums in R, the file named after that key."""
    count = 0
    for path in folder.glob("*.json"):
        record = json.loads(path.read_text())
        del record["key"]["cell_format"]
        del record["result"]["windows"]
        path.unlink()
        (folder / f"{cell_id(record['key'])}.json").write_text(json.dumps(record))
        count += 1
    return count


def test_old_store_is_recomputed_once_and_cells_carry_windows(tiny_model, tiny_text, tmp_path,
                                                              monkeypatch, capsys):
    args = tiny_run_args(tiny_model, tiny_text, tmp_path, *RUN)
    assert cli.main(args) == cli.EXIT_OK
    results = tmp_path / "tiny.json"
    cells = _cells(results)
    dense = cells["dense"]["context_length_sweep"]["128"]
    h2o = cells["h2o"]["context_length_sweep"]["128"]
    for r in (dense, h2o):
        windows = r["windows"]
        assert len(windows["nll_sum"]) == len(windows["tokens"]) == len(windows["bytes"]) == 3
        assert windows["tokens"] == [127] * 3
        assert sum(windows["nll_sum"]) / sum(windows["tokens"]) == pytest.approx(
            r["cross_entropy"], rel=1e-12)
    low, high = h2o["delta_vs_dense_ci95"]
    assert low <= h2o["delta_vs_dense"] <= high
    assert 0 < h2o["delta_vs_dense_p"] <= 1
    assert "delta_vs_dense_ci95" not in dense  # dense is the reference

    assert _downgrade(tmp_path / "tiny.cells") == 2
    stored = _stored(monkeypatch)
    assert cli.main(args) == cli.EXIT_OK
    assert len(stored) == 2 and all(key["cell_format"] == CELL_FORMAT for key in stored)
    again = _cells(results)
    assert again["h2o"]["context_length_sweep"]["128"]["windows"] == h2o["windows"]
    assert len(list((tmp_path / "tiny.cells").glob("*.json"))) == 4  # old files left alone
    stored.clear()
    assert cli.main(args) == cli.EXIT_OK and stored == []  # recomputed once, then reused

    capsys.readouterr()
    assert compare.main([str(results), "--methods", "dense", "h2o", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 1 and rows[0]["num_windows"] == 3
    assert rows[0]["change"] == pytest.approx(h2o["delta_vs_dense"], rel=1e-9)
    assert rows[0]["ci95"] == pytest.approx(h2o["delta_vs_dense_ci95"])


def test_seeds_run_a_randomised_method_once_per_seed(tiny_model, tiny_text, tmp_path,
                                                     monkeypatch):
    stored = _stored(monkeypatch)
    args = tiny_run_args(tiny_model, tiny_text, tmp_path, "--methods", "dense", "random", "h2o",
                         "--context-lengths", "128", "--fixed-sparsity", "0.75", "--k-min", "16",
                         "--block-size", "16", "--no-sparsity-sweep", "--max-windows", "2",
                         "--no-report", "--no-key-tokens", "--seeds", "3", "--seed", "7")
    assert cli.main(args) == cli.EXIT_OK
    seeds = sorted(key["seed"] for key in stored if key["method"] == "random")
    assert seeds == [7, 8, 9]
    assert [key["seed"] for key in stored if key["method"] == "h2o"] == [7]  # deterministic
    cell = _cells(tmp_path / "tiny.json")["random"]["context_length_sweep"]["128"]
    spread = cell["perplexity_over_seeds"]
    assert spread["seeds"] == 3 and spread["seed_list"] == [7, 8, 9]
    assert spread["min"] < spread["max"] and spread["std"] > 0  # the seeds draw differently
    assert spread["mean"] == pytest.approx(sum(spread["values"]) / 3)
    # The cell's PPL is that of the seed-averaged window NLLs: the geometric mean here.
    geometric = (spread["values"][0] * spread["values"][1] * spread["values"][2]) ** (1 / 3)
    assert cell["perplexity"] == pytest.approx(geometric, rel=1e-9)
    assert cell["delta_vs_dense_ci95"] is not None
