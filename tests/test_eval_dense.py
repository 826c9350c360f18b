"""The harness's dense numbers are the model's own loss, token-weighted over the same windows;
every method at s = 0 is that dense run; a NaN loss fails its cell loudly."""
import json
import math

import pytest
import torch
from eval_assets import tiny_model, tiny_run_args, tiny_text  # noqa: F401

from eval import cli, data, models
from eval.executors.serial import SerialExecutor

L, WINDOWS = 128, 5
pytestmark = pytest.mark.usefixtures("single_thread")


def test_dense_ppl_is_the_models_own_loss(tiny_model, tiny_text, tmp_path):
    args = tiny_run_args(tiny_model, tiny_text, tmp_path, "--methods", "dense", "h2o",
                         "--context-lengths", str(L), "--sparsity-levels", "0", "--no-report",
                         "--max-windows", str(WINDOWS), "--no-context-sweep")
    assert cli.main(args) == cli.EXIT_OK
    results = json.loads((tmp_path / "tiny.json").read_text())
    dataset = results["config"]["datasets"][0]
    dense = results["results"][dataset]["dense"]["sparsity_sweep"]["0.0"]

    loaded = models.load_model(str(tiny_model))
    windows = data.load_windows(dataset, loaded.tokenizer, L, max_windows=WINDOWS,
                                data_file=str(tiny_text))
    nll = 0.0
    with torch.no_grad():
        for ids in windows.input_ids:
            logits = loaded.model(ids[None]).logits[0, :-1].double()
            nll -= torch.log_softmax(logits, -1).gather(-1, ids[1:, None]).sum().item()
    tokens = WINDOWS * (L - 1)
    assert dense["num_tokens"] == tokens and dense["num_samples"] == WINDOWS
    assert math.isclose(dense["perplexity"], math.exp(nll / tokens), rel_tol=1e-5)
    assert math.isclose(dense["bits_per_byte"], nll / math.log(2) / sum(windows.num_bytes),
                        rel_tol=1e-5)
    assert dense["density"] == 1.0 and dense["method_run"] == "dense"

    # h2o at s = 0 is dense by definition: the shared dense computation, recorded as such.
    h2o = results["results"][dataset]["h2o"]["sparsity_sweep"]["0.0"]
    assert (h2o["method_run"], h2o["sparsity_run"]) == ("dense", 0.0)
    assert h2o["perplexity"] == dense["perplexity"] and h2o["delta_vs_dense"] == 0.0
    assert results["config"]["cells_computed"] == 1


def test_nan_loss_fails_the_cell_loudly(tiny_model, tiny_text, tmp_path, monkeypatch):
    load = SerialExecutor.load

    def load_poisoned(self):
        loaded = load(self)
        with torch.no_grad():
            loaded.model.model.norm.weight.fill_(math.nan)
        return loaded

    monkeypatch.setattr(SerialExecutor, "load", load_poisoned)
    args = tiny_run_args(tiny_model, tiny_text, tmp_path, "--method", "dense",
                         "--context-lengths", "64", "--no-sparsity-sweep", "--max-windows", "2")
    assert cli.main(args) == cli.EXIT_FAILED
    text = (tmp_path / "tiny.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    results = json.loads(text)
    dataset = results["config"]["datasets"][0]
    cell = results["results"][dataset]["dense"]["context_length_sweep"]["64"]
    assert cell["perplexity"] is None and "non-finite loss" in cell["error"]
    assert results["config"]["status"] == "failed cells"
    assert not list((tmp_path / "tiny.cells").glob("*.json"))  # a failure is never stored
