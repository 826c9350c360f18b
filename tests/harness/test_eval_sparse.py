"""Sparse cells through `python -m eval.run` on a tiny random Llama saved to a folder: what the
command line asks for reaches the protocols (recorded with each cell), each cell's numbers are
a direct cabattn.apply over the same windows, and a changed option recomputes exactly the cells
it affects. Also --threads, --device auto, --dtype auto and .parquet data files.

The model's head dim is 64, one the CUDA kernels take, so that --device auto runs on a GPU too.
"""
import json
import math

import pytest
import torch
from eval_assets import make_tiny_model, tiny_run_args

import cabattn
from eval import data, models

from eval.cli import main

EXIT_OK = 0  # every cell finished (python -m eval.run's documented exit status)

pytestmark = pytest.mark.usefixtures("single_thread")
L, SPARSITY, WINDOWS = 256, 0.7, 2
MASK_RUN = ["--methods", "h2o", "cab_v4", "--context-lengths", str(L), "--sparsity-levels",
            str(SPARSITY), "--no-context-sweep", "--max-windows", str(WINDOWS), "--no-report",
            "--block-size", "32", "--causal-selection", "block",
            "--param", "cab_v4.magnitude_ratio=0.25", "--seed", "7",
            "--device", "auto", "--dtype", "auto", "--threads", "1"]
KV_RUN = ["--methods", "h2o", "streaming_llm", "--context-lengths", str(L), "--sparsity-levels",
          str(SPARSITY), "--no-context-sweep", "--max-windows", str(WINDOWS), "--no-report",
          "--protocol", "kv", "--kv-chunk", "8", "--param", "streaming_llm.n_sink=8",
          "--device", "cpu", "--dtype", "float32"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_text):
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny-llama-d64", tiny_text,
                           hidden_size=128, heads=2, kv_heads=1)


def run_cli(model_dir, text, out, *args, ambient_threads=None):
    """Runs eval.run (with torch set to `ambient_threads` before, when given); returns
    (results, [(method, sparsity) of each cell computed by it])."""
    store = out / "tiny.cells"
    before = set(store.glob("*.json")) if store.is_dir() else set()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(ambient_threads or threads)
        assert main(tiny_run_args(model_dir, text, out, *args)) == EXIT_OK
    finally:
        torch.set_num_threads(threads)  # --threads sets them for the process
    new = [json.loads(p.read_text())["key"] for p in set(store.glob("*.json")) - before]
    results = json.loads((out / "tiny.json").read_text())
    computed = sorted((key["method"], key["sparsity"]) for key in new)
    assert results["config"]["cells_computed"] == len(computed)
    return results, computed


def direct(results, model_dir, text, method, **options):
    """(perplexity, density) of cabattn.apply over the cell's windows, outside the harness."""
    config = results["config"]
    loaded = models.load_model(str(model_dir), dtype=config["resolved_dtype"],
                               device=config["resolved_device"])
    dataset = config["datasets"][0]
    windows = data.load_windows(dataset, loaded.tokenizer, L, max_windows=WINDOWS,
                                data_file=str(text))
    losses = []
    with torch.no_grad(), cabattn.apply(loaded.model, method=method, sparsity=SPARSITY,
                                        **options) as stats:
        for ids in windows.input_ids:
            ids = ids[None].to(config["resolved_device"])
            losses.append(float(loaded.model(ids, labels=ids).loss))
    return math.exp(sum(losses) / len(losses)), stats.density


def cell(results, method):
    dataset = results["config"]["datasets"][0]
    return results["results"][dataset][method]["sparsity_sweep"][str(SPARSITY)]


def test_mask_cells_record_their_options_equal_a_direct_apply_and_resume_exactly(
        model_dir, tiny_text, tmp_path):
    results, computed = run_cli(model_dir, tiny_text, tmp_path, *MASK_RUN, ambient_threads=2)
    assert computed == [("cab_v4", SPARSITY), ("dense", 0.0), ("h2o", SPARSITY)]
    config = results["config"]
    gpu = torch.cuda.is_available()
    assert config["resolved_device"] == ("cuda" if gpu else "cpu")
    assert config["resolved_dtype"] == ("float16" if gpu else "float32")
    assert config["torch_threads"] == 1  # --threads 1 overrides the 2 torch had
    assert config["block_sizes"] == {str(L): 32}  # auto would be 16 at L = 256

    for method, params in (("h2o", {"h2o_recent_ratio": 0.5}),
                           ("cab_v4", {"magnitude_ratio": 0.25})):
        r = cell(results, method)
        assert (r["method_run"], r["sparsity_run"]) == (method, SPARSITY)
        assert (r["protocol"], r["block_size"], r["causal_selection"]) == ("mask", 32, "block")
        assert params.items() <= r["params"].items()
        assert r["num_samples"] == WINDOWS and r["num_tokens"] == WINDOWS * (L - 1)
        ppl, density = direct(results, model_dir, tiny_text, method, protocol="mask",
                              block_size=32, causal_selection="block", seed=7, **params)
        assert r["perplexity"] == pytest.approx(ppl, rel=1e-6)
        assert r["density"] == pytest.approx(density, rel=1e-12)
        assert r["density"] < 1.0
        assert r["perplexity"] != pytest.approx(r["dense_perplexity"], rel=1e-6)

    # Resuming: the same command computes nothing; each changed option exactly its cells.
    assert run_cli(model_dir, tiny_text, tmp_path, *MASK_RUN)[1] == []
    changes = [
        (["--param", "cab_v4.magnitude_ratio=0.75"], ["cab_v4"]),
        (["--param", "h2o.h2o_recent_ratio=0.25"], ["h2o"]),
        (["--block-size", "16"], ["cab_v4", "h2o"]),
        (["--causal-selection", "strict"], ["cab_v4", "h2o"]),
        (["--seed", "8"], ["cab_v4", "dense", "h2o"]),
        (["--max-windows", "3"], ["cab_v4", "dense", "h2o"]),
    ]
    for change, affected in changes:
        _, computed = run_cli(model_dir, tiny_text, tmp_path, *MASK_RUN, *change)
        assert [m for m, _ in computed] == affected, change


def test_kv_cells_record_their_options_equal_a_direct_apply_and_resume_exactly(
        model_dir, tiny_text, tmp_path):
    results, computed = run_cli(model_dir, tiny_text, tmp_path, *KV_RUN)
    assert computed == [("dense", 0.0), ("h2o", SPARSITY), ("streaming_llm", SPARSITY)]
    for method, params in (("h2o", {}), ("streaming_llm", {"n_sink": 8})):
        r = cell(results, method)
        assert (r["protocol"], r["kv_chunk"], r["block_size"]) == ("kv", 8, 16)
        assert params.items() <= r["params"].items()
        ppl, density = direct(results, model_dir, tiny_text, method, protocol="kv",
                              kv_chunk=8, block_size=16, seed=42, **params)
        assert r["perplexity"] == pytest.approx(ppl, rel=1e-6)
        assert r["density"] == pytest.approx(density, rel=1e-12) and r["density"] < 1.0
    for change, affected in [(["--kv-chunk", "4"], ["h2o", "streaming_llm"]),
                             (["--param", "streaming_llm.n_sink=4"], ["streaming_llm"]),
                             (["--protocol", "mask"], ["h2o", "streaming_llm"])]:
        _, computed = run_cli(model_dir, tiny_text, tmp_path, *KV_RUN, *change)
        assert [m for m, _ in computed] == affected, change


def test_a_parquet_file_gives_the_jsonl_files_numbers(model_dir, tiny_text, tmp_path):
    import pyarrow
    import pyarrow.parquet

    documents = [p for p in tiny_text.read_text().split("\n\n") if p.strip()]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"body": d}) + "\n" for d in documents))
    parquet = tmp_path / "docs.parquet"
    pyarrow.parquet.write_table(pyarrow.table({"id": list(range(len(documents))),
                                               "body": documents}), parquet)
    cells = []
    for path in (jsonl, parquet):
        out = tmp_path / path.suffix[1:]
        args = tiny_run_args(model_dir, path, out, "--datasets", "docs", "--text-field", "body",
                             "--method", "dense", "--context-lengths", "128",
                             "--no-sparsity-sweep", "--max-windows", "3", "--no-report",
                             "--device", "cpu")
        assert main(args) == EXIT_OK
        results = json.loads((out / "tiny.json").read_text())
        cells.append(results["results"]["docs"]["dense"]["context_length_sweep"]["128"])
    from_jsonl, from_parquet = cells
    assert from_parquet["num_samples"] == 3 and from_parquet["num_tokens"] == 3 * 127
    for field in ("perplexity", "num_tokens", "bits_per_byte"):
        assert from_parquet[field] == from_jsonl[field], field
