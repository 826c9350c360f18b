"""The harness's dense numbers are the model's own loss, token-weighted over the same windows;
every method at s = 0 is that dense run; a NaN loss fails its cell loudly."""
import json
import math

import pytest
import torch
from eval_assets import tiny_run_args

from eval import cell, cli, data, models
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


def test_a_model_that_fails_to_load_fails_the_run_once(tiny_model, tiny_text, tmp_path,
                                                       monkeypatch, capsys):
    attempts = []

    def broken_load(*args, **kwargs):
        attempts.append(args)
        raise models.ModelLoadError("the weights are unreadable")

    monkeypatch.setattr(models, "load_model", broken_load)
    args = tiny_run_args(tiny_model, tiny_text, tmp_path, "--methods", "dense", "h2o",
                         "--context-lengths", "64", "96", "--sparsity-levels", "0.5",
                         "--no-report", "--max-windows", "1")
    assert cli.main(args) == cli.EXIT_FAILED
    assert len(attempts) == 1
    assert capsys.readouterr().err.count("the weights are unreadable") == 1


def test_k_min_from_the_command_line_reaches_the_protocol(tiny_model, tiny_text, tmp_path):
    cells = {}
    for k_min in (16, 64):
        args = tiny_run_args(tiny_model, tiny_text, tmp_path / str(k_min), "--method", "h2o",
                             "--context-lengths", "128", "--fixed-sparsity", "0.9",
                             "--no-sparsity-sweep", "--max-windows", "1", "--no-report",
                             "--k-min", str(k_min))
        assert cli.main(args) == cli.EXIT_OK
        results = json.loads((tmp_path / str(k_min) / "tiny.json").read_text())
        assert results["config"]["k_min"] == k_min
        (dataset,) = results["results"]
        cells[k_min] = results["results"][dataset]["h2o"]["context_length_sweep"]["128"]
    assert cells[16]["k_min"] == 16 and cells[64]["k_min"] == 64
    assert cells[16]["density"] < cells[64]["density"]  # K = 16 keeps fewer blocks than K = 64


def test_compute_cell_alone_gives_the_runners_cell(tiny_model, tiny_text, tmp_path):
    """What an executor (a Ray actor, a shard) calls: the same numbers as the serial runner."""
    args = tiny_run_args(tiny_model, tiny_text, tmp_path, "--method", "cab_v4",
                         "--context-lengths", "128", "--fixed-sparsity", "0.75",
                         "--no-sparsity-sweep", "--max-windows", "2", "--no-report")
    assert cli.main(args) == cli.EXIT_OK
    results = json.loads((tmp_path / "tiny.json").read_text())
    (dataset,) = results["results"]
    stored = results["results"][dataset]["cab_v4"]["context_length_sweep"]["128"]

    (config,), _ = cli.configs_from_args(cli.build_parser().parse_args(args))
    loaded = models.load_model(str(tiny_model))
    windows = data.load_windows(dataset, loaded.tokenizer, 128, max_windows=2,
                                data_file=str(tiny_text))
    spec = cell.RunSpec.for_cell(dataset, 128, "cab_v4", 0.75)
    computed = cell.compute_cell(config, loaded, windows, spec)
    timings = {"selection_seconds", "attention_seconds", "selection_share", "wall_seconds",
               "tokens_per_second", "peak_memory_mb", "finished"}
    assert {k: v for k, v in computed.items() if k not in timings} == {
        k: v for k, v in stored.items() if k in computed and k not in timings}
    assert cell.cell_key(config, spec)["block_size"] == computed["block_size"] == 16
