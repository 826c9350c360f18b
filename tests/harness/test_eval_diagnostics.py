"""The diagnostics in a whole run: attention recall, sink retention and selection share in every
sparse cell, the recall figure, and fixed token budgets (--budget-tokens) as cells."""
import json

import pytest
from eval_assets import tiny_run_args

from cabattn.grid import sparsity_for_budget, token_budget
from eval import cli

pytestmark = pytest.mark.usefixtures("single_thread")
SPARSE = ("h2o", "cab_v3", "streaming_llm")


def run(model, text, folder, *extra) -> dict:
    args = tiny_run_args(model, text, folder, "--methods", "dense", *SPARSE,
                         "--context-lengths", "128", "--no-context-sweep", "--sparsity-levels",
                         "0", "0.5", "--budget-tokens", "64", "--max-windows", "2",
                         "--block-size", "16", "--k-min", "16", *extra)
    assert cli.main(args) == cli.EXIT_OK
    return json.loads((folder / "tiny.json").read_text())["results"]


@pytest.mark.parametrize("protocol", ["mask", "kv"])
def test_a_fixed_budget_is_the_cell_of_the_equivalent_sparsity(protocol, tiny_model, tiny_text,
                                                              tmp_path):
    results = run(tiny_model, tiny_text, tmp_path, "--protocol", protocol, "--kv-chunk", "8",
                  "--no-report")
    for dataset in results.values():
        for method in SPARSE:
            by_budget = dataset[method]["budget_sweep"]["64@128"]
            by_sparsity = dataset[method]["sparsity_sweep"]["0.5"]
            assert by_budget["budget_tokens"] == by_sparsity["budget_tokens"] == 64
            assert by_budget["sparsity"] == 0.5 and by_budget["context_length"] == 128
            for name in ("perplexity", "density", "sink_retention", "layer_head_density"):
                assert by_budget[name] == by_sparsity[name], (method, name)
            if protocol == "kv":
                assert by_budget["mean_cached_age"] == by_sparsity["mean_cached_age"] > 0


def test_diagnostics_fill_every_sparse_cell_and_draw_the_recall_figure(tiny_model, tiny_text,
                                                                        tmp_path):
    results = run(tiny_model, tiny_text, tmp_path, "--diagnostics")
    for dataset in results.values():
        for method in SPARSE:
            for sweep, cells in dataset[method].items():
                for point, cell in cells.items():
                    if cell["sparsity"] == 0.0:
                        continue
                    assert 0.0 < cell["attention_recall_min_layer"] <= \
                        cell["attention_recall"] < 1.0, (method, point)
                    assert 0.0 < cell["sink_retention"] <= 1.0
                    assert cell["selection_share"] > 0
            assert dataset[method]["sparsity_sweep"]["0.5"]["attention_recall"] is not None
        assert dataset["streaming_llm"]["sparsity_sweep"]["0.5"]["sink_retention"] == 1.0
    assert (tmp_path / "tiny_figure_recall.png").stat().st_size > 1000


@pytest.mark.parametrize("length", [100, 128, 1000, 1024, 4096, 32768])
def test_sparsity_for_budget_gives_exactly_that_budget(length):
    for budget in range(64, length + 1, max(1, length // 97)):
        assert token_budget(length, sparsity_for_budget(budget, length), 64) == budget
    assert sparsity_for_budget(length + 5, length) == 0.0


def test_a_budget_below_k_min_is_rejected_before_anything_loads(tiny_model, tiny_text,
                                                                tmp_path):
    with pytest.raises(ValueError, match="k_min = 64"):
        sparsity_for_budget(32, 1024)
    args = tiny_run_args(tiny_model, tiny_text, tmp_path, "--methods", "h2o",
                         "--context-lengths", "128", "--budget-tokens", "8")
    assert cli.main(args) != cli.EXIT_OK
