"""Issue 16 in a whole run: attention recall, sink retention and selection share in every
sparse cell, and the recall figure."""
import json

import pytest
from eval_assets import tiny_model, tiny_run_args, tiny_text  # noqa: F401

from eval import cli

pytestmark = pytest.mark.usefixtures("single_thread")
SPARSE = ("h2o", "cab_v3", "streaming_llm")


def run(model, text, folder, *extra) -> dict:
    args = tiny_run_args(model, text, folder, "--methods", "dense", *SPARSE,
                         "--context-lengths", "128", "--no-context-sweep", "--sparsity-levels",
                         "0", "0.5", "--max-windows", "2", "--block-size", "16", "--k-min", "16",
                         *extra)
    assert cli.main(args) == cli.EXIT_OK
    return json.loads((folder / "tiny.json").read_text())["results"]


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
