"""A slice of the quick test (its offline methods, sparse cells with diagnostics, both
protocols) through `python -m eval.run` on a tiny random Llama, once on the kernels and once
with --kernels reference, on the CPU: every metric of every cell agrees, each cell records its
path, and the path is part of a sparse cell's key (docs/selfcheck.md, "The reference path")."""
import json

import pytest
from eval_assets import make_tiny_model, tiny_run_args

from eval.cli import main

pytestmark = pytest.mark.usefixtures("single_thread")
L, SPARSITY = 256, 0.9
SLICE = {  # (methods, options): the quick test's offline methods (configs/quick_test.yaml)
    "mask": (["h2o", "cab_v4", "cab_v3", "streaming_llm"], ["--diagnostics"]),
    "kv": (["h2o", "cab_v4"], ["--kv-chunk", "32"])}
COMMON = ["--context-lengths", str(L), "--sparsity-levels", str(SPARSITY),
          "--no-context-sweep", "--max-windows", "2", "--no-report", "--device", "cpu",
          "--dtype", "float32", "--threads", "1"]
# What a cell measured about its machine, not about the model: never compared.
MACHINE = {"wall_seconds", "tokens_per_second", "selection_seconds", "attention_seconds",
           "selection_share", "peak_memory_mb", "peak_memory_kind", "finished"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_text):
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny-llama-d64", tiny_text,
                           hidden_size=128, heads=2, kv_heads=1)


def _cells(model_dir, text, out, protocol, kernels):
    methods, options = SLICE[protocol]
    args = tiny_run_args(model_dir, text, out, *COMMON, "--methods", *methods, *options,
                         "--protocol", protocol, "--kernels", kernels)
    assert main(args) == 0
    results = json.loads((out / "tiny.json").read_text())
    dataset = results["config"]["datasets"][0]
    assert results["config"]["kernels"] == kernels
    return {method: sweeps["sparsity_sweep"][str(SPARSITY)]
            for method, sweeps in results["results"][dataset].items() if method != "dense"}


def _assert_same(got, want, where):
    if isinstance(want, float) and ".delta_vs_dense" in where:
        # a change against dense is a ratio minus one: compare the ratios (a relative bar on
        # the difference of two near-equal perplexities would amplify their rounding)
        assert 1 + got == pytest.approx(1 + want, rel=1e-5), where
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-9), where
    elif isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for key in want:
            _assert_same(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_same(g, w, f"{where}[{i}]")
    else:
        assert got == want, where


@pytest.mark.parametrize("protocol", ["mask", "kv"])
def test_the_quick_test_slice_gives_every_metric_on_both_paths(model_dir, tiny_text, tmp_path,
                                                               protocol):
    extension = _cells(model_dir, tiny_text, tmp_path / "extension", protocol, "extension")
    reference = _cells(model_dir, tiny_text, tmp_path / "reference", protocol, "reference")
    assert list(extension) == list(reference) == SLICE[protocol][0]
    for method, want in extension.items():
        got = reference[method]
        assert (want["kernels"], got["kernels"]) == ("extension", "reference")
        assert want["density"] < 1.0
        if protocol == "mask":
            assert want["attention_recall"] is not None
        compared = set(want) - MACHINE - {"kernels"}
        assert set(got) - MACHINE - {"kernels"} == compared
        for name in sorted(compared):
            _assert_same(got[name], want[name], f"{method}.{name}")


def test_the_kernel_path_is_part_of_a_sparse_cells_key(model_dir, tiny_text, tmp_path):
    """Switching paths recomputes the sparse cells and reuses dense (no cabattn operator)."""
    out = tmp_path / "run"
    args = [*COMMON, "--methods", "h2o", "--protocol", "mask"]
    assert main(tiny_run_args(model_dir, tiny_text, out, *args)) == 0
    store = out / "tiny.cells"
    before = set(store.glob("*.json"))
    assert main(tiny_run_args(model_dir, tiny_text, out, *args, "--kernels", "reference")) == 0
    new = [json.loads(p.read_text()) for p in set(store.glob("*.json")) - before]
    assert [(cell["key"]["method"], cell["key"]["kernels"]) for cell in new] == [
        ("h2o", "reference")]
    (dense,) = [cell for cell in (json.loads(p.read_text()) for p in before)
                if cell["key"]["method"] == "dense"]
    assert "kernels" not in dense["key"] and dense["result"]["kernels"] is None
