"""eval.compare and Table 3's paired intervals on a small hand-made results file."""
import json

import numpy as np
import pytest

from eval import compare, report
from eval.metrics import summarize
from eval.statistics import versus_dense

TOKENS, WINDOWS = 1023, 12


def _cell(per_token, dense=None, s=0.0, density=1.0):
    r = summarize(np.asarray(per_token) * TOKENS, [TOKENS] * WINDOWS, [4000] * WINDOWS)
    r.update(density=density, context_length=1024, sparsity=s)
    if dense is not None:
        r.update(dense_perplexity=dense["perplexity"],
                 delta_vs_dense=r["perplexity"] / dense["perplexity"] - 1,
                 **versus_dense(r, dense, seed=42))
    return r


@pytest.fixture
def results_file(tmp_path):
    rng = np.random.default_rng(0)
    difficulty = rng.uniform(2.5, 3.5, size=WINDOWS)
    dense = _cell(difficulty)
    # h2o and cab_v4 lose about 5% at s = 0.9 and differ from each other by noise only;
    # cab_v3 loses 20%; at s = 0.5 everyone is within 1%.
    h2o9 = _cell(difficulty + 0.05 + rng.normal(0, 0.01, WINDOWS), dense, 0.9, 0.11)
    v4_9 = _cell(difficulty + 0.05 + rng.normal(0, 0.01, WINDOWS), dense, 0.9, 0.11)
    v3_9 = _cell(difficulty + 0.18 + rng.normal(0, 0.01, WINDOWS), dense, 0.9, 0.11)
    h2o5 = _cell(difficulty + 0.005 + rng.normal(0, 0.001, WINDOWS), dense, 0.5, 0.52)
    v4_5 = _cell(difficulty + 0.004 + rng.normal(0, 0.001, WINDOWS), dense, 0.5, 0.52)
    v3_5 = _cell(difficulty + 0.03 + rng.normal(0, 0.001, WINDOWS), dense, 0.5, 0.52)
    results = {"config": {"seed": 42, "sparsity_sweep": {"fixed_context_length": 1024},
                          "context_length_sweep": {"fixed_sparsity": 0.9}},
               "results": {"brown": {
                   "dense": {"sparsity_sweep": {"0.0": dense}},
                   "h2o": {"sparsity_sweep": {"0.5": h2o5, "0.9": h2o9}},
                   "cab_v4": {"sparsity_sweep": {"0.5": v4_5, "0.9": v4_9}},
                   "cab_v3": {"sparsity_sweep": {"0.5": v3_5, "0.9": v3_9}}}}}
    path = tmp_path / "demo.json"
    path.write_text(json.dumps(results))
    return path


def test_compare_two_methods_writes_tables_and_json(results_file, capsys):
    assert compare.main([str(results_file), "--methods", "h2o", "cab_v4"]) == 0
    out = capsys.readouterr().out
    for suffix in ("md", "tex"):
        assert (results_file.parent / f"demo_compare_h2o_cab_v4.{suffix}").is_file()
    assert "| brown | 1024 | 0.9 | h2o | cab_v4 |" in out
    assert compare.main([str(results_file), "--methods", "h2o", "cab_v4", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["dataset"], r["context_length"], r["sparsity"]) for r in rows] == [
        ("brown", 1024, 0.5), ("brown", 1024, 0.9)]
    results = json.loads(results_file.read_text())["results"]["brown"]
    for row in rows:
        key = str(row["sparsity"])
        ppl_a = results["h2o"]["sparsity_sweep"][key]["perplexity"]
        ppl_b = results["cab_v4"]["sparsity_sweep"][key]["perplexity"]
        assert row["change"] == pytest.approx(ppl_b / ppl_a - 1, rel=1e-9)
        assert row["ci95"][0] < row["change"] < row["ci95"][1]
        assert {"p_value", "significant", "windows_needed_1pct"} <= set(row)
    # At s = 0.9 the two differ by noise only.
    assert rows[1]["significant"] is False


def test_compare_baseline_is_holm_corrected_over_every_comparison(results_file, capsys):
    assert compare.main([str(results_file), "--baseline", "dense", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["b"], r["sparsity"]) for r in rows} == {
        (m, s) for m in ("h2o", "cab_v4", "cab_v3") for s in (0.5, 0.9)}
    m = len(rows)
    for row in rows:  # 12 windows all worse: exact p = 2 / 2^12 each; Holm multiplies by <= 6
        assert row["p_value"] == pytest.approx(2 / 2 ** 12)
        assert row["p_holm"] == pytest.approx(min(1, m * 2 / 2 ** 12))
        assert row["significant"] is True
    assert (results_file.parent / "demo_compare_vs_dense.md").is_file()


def test_compare_errors_name_the_valid_choices(results_file, tmp_path, capsys):
    assert compare.main([str(results_file), "--methods", "h2o", "quest"]) == 2
    err = capsys.readouterr().err
    assert "'quest'" in err and "dense, h2o, cab_v4, cab_v3" in err
    missing = tmp_path / "nothing.json"
    assert compare.main([str(missing), "--baseline", "dense"]) == 2
    assert str(missing) in capsys.readouterr().err
    old = json.loads(results_file.read_text())
    for cell in old["results"]["brown"]["h2o"]["sparsity_sweep"].values():
        del cell["windows"]
    results_file.write_text(json.dumps(old))
    assert compare.main([str(results_file), "--methods", "dense", "h2o"]) == 2
    assert "rerun the same eval.run command" in capsys.readouterr().err


def test_table3_shows_paired_intervals_and_marks_ties_with_the_best(results_file):
    levels, rows = report.table3_rows(report.load_results(results_file))
    assert levels == [0.0, 0.5, 0.9]
    by_method = {m: (cells, marks) for _, _, m, cells, marks in rows}
    cells, marks = by_method["cab_v3"]
    assert "[+" in cells[2] and not any(marks)  # an interval; far from the best
    # The best at s = 0.9 is h2o or cab_v4 and the other is not significantly different.
    assert by_method["h2o"][1][2] and by_method["cab_v4"][1][2]
    assert not any(by_method["dense"][1])
    md = report.table3_markdown(report.load_results(results_file))
    assert md.count("**") == 2 * sum(sum(marks) for *_, marks in rows)
    assert "Holm" in md
    tex = report.table3_latex(report.load_results(results_file))
    assert r"\textbf{" in tex


def test_figures_draw_the_paired_intervals(results_file, tmp_path):
    results = report.load_results(results_file)
    p = next(p for p in report.points(results) if p.method == "cab_v3" and p.sparsity == 0.9)
    low, high = report.paired_interval(p)
    assert low < p.perplexity < high
    dense = p.result["dense_perplexity"]
    assert (low, high) == pytest.approx([dense * (1 + c) for c in p.result["delta_vs_dense_ci95"]])
    assert report.figure8(results, tmp_path / "f")  # drawn with error bars, no failure


def test_headline_names_best_and_runner_up_and_the_windows_needed(results_file):
    lines = compare.headline(report.load_results(results_file))
    assert len(lines) == 2 and "best vs runner-up" in lines[0]
    line = lines[1]
    assert "brown L=1024 s=0.9" in line and "12 windows" in line
    assert "windows to resolve 1%: " in line and "0.5%: " in line
    # Four windows can never resolve anything: the line says so.
    results = json.loads(results_file.read_text())
    for sweeps in results["results"]["brown"].values():
        for cell in sweeps["sparsity_sweep"].values():
            cell["windows"] = {k: v[:4] for k, v in cell["windows"].items()}
    line = compare.headline(results)[1]
    assert "NOT resolved (with 4 windows no p-value can be below 0.125)" in line


def test_pooling_datasets_compares_over_all_their_windows(results_file, capsys):
    """Split the 12 windows into two datasets of 6: pooled, the comparison is the one over
    all 12 windows; per dataset, each half alone."""
    from eval.statistics import compare_cells
    data = json.loads(results_file.read_text())
    brown = data["results"]["brown"]

    def half(r, part):
        cut = slice(0, 6) if part == 0 else slice(6, 12)
        windows = {k: v[cut] for k, v in r["windows"].items()}
        ppl = float(np.exp(sum(windows["nll_sum"]) / sum(windows["tokens"])))
        return {**r, "perplexity": ppl, "windows": windows}

    data["results"] = {name: {m: {sweep: {s: half(r, part) for s, r in cells.items()}
                                  for sweep, cells in sweeps.items()}
                              for m, sweeps in brown.items()}
                       for part, name in enumerate(["brown", "pd-books"])}
    split = results_file.with_name("split.json")
    split.write_text(json.dumps(data))
    assert compare.main([str(split), "--methods", "h2o", "cab_v4", "--pool-datasets",
                         "--json"]) == 0
    pooled = json.loads(capsys.readouterr().out)
    assert [(r["dataset"], r["sparsity"]) for r in pooled] == [
        ("brown+pd-books", 0.5), ("brown+pd-books", 0.9)]
    whole = compare_cells(brown["h2o"]["sparsity_sweep"]["0.9"],
                          brown["cab_v4"]["sparsity_sweep"]["0.9"], seed=42)
    assert pooled[1]["change"] == pytest.approx(whole["change"], rel=1e-12)
    assert pooled[1]["p_value"] == whole["p_value"]
    assert pooled[1]["perplexity_a"] == pytest.approx(
        brown["h2o"]["sparsity_sweep"]["0.9"]["perplexity"], rel=1e-12)
    assert compare.main([str(split), "--methods", "h2o", "cab_v4", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 4  # per dataset: two halves x two s


def _task_cell(scores, answer_nll, window_nll, s):
    samples = [{"depth": (i + 0.5) / len(scores), "score": float(x), "answer_nll": a,
                "answer_tokens": 5, "window_nll": w, "window_predictions": 1023}
               for i, (x, a, w) in enumerate(zip(scores, answer_nll, window_nll))]
    return {"accuracy": float(np.mean(scores)), "accuracy_ci95": [0.0, 1.0], "samples": len(scores),
            "context_length": 1024, "sparsity": s, "per_sample": samples}


@pytest.fixture
def task_results_file(tmp_path):
    """20 samples of one task: dense finds all, h2o 8 (the first 8), cab_v4 18 (all but two of
    the first 8 h2o found, plus 12 of the rest)."""
    rng = np.random.default_rng(1)
    window = rng.uniform(3000, 3500, 20)
    dense = _task_cell([1] * 20, [0.1] * 20, window, 0.0)
    h2o = _task_cell([1] * 8 + [0] * 12, [0.1] * 8 + [5.0] * 12, window + 30, 0.9)
    v4 = _task_cell([1] * 6 + [0] * 2 + [1] * 12, [0.2] * 20, window + 31, 0.9)
    results = {"config": {"seed": 42}, "results": {},
               "tasks": {"passkey": {"dense": {"sparsity_sweep": {"0.0": dense}},
                                     "h2o": {"sparsity_sweep": {"0.9": h2o}},
                                     "cab_v4": {"sparsity_sweep": {"0.9": v4}}}}}
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps(results))
    return path


def test_task_cells_are_compared_sample_by_sample(task_results_file, capsys):
    """McNemar on the discordant samples (2 only h2o, 12 only cab_v4: exact binomial p of 2 of
    14), the answer's and the prompt's paired PPL changes, written as a table too."""
    from scipy.stats import binomtest
    assert compare.main([str(task_results_file), "--methods", "h2o", "cab_v4", "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert (row["task"], row["a"], row["b"], row["samples"]) == ("passkey", "h2o", "cab_v4", 20)
    assert (row["accuracy_a"], row["accuracy_b"], row["a_only"], row["b_only"]) == (0.4, 0.9, 2, 12)
    assert row["p_value"] == pytest.approx(binomtest(2, 14, 0.5).pvalue, rel=1e-12)
    assert row["test"] == "McNemar" and row["significant"]
    # answer NLL (a sample's sum over its 5 tokens) per token: h2o (8 x 0.1 + 12 x 5.0) / 100,
    # cab_v4 20 x 0.2 / 100
    assert row["answer_change"] == pytest.approx(np.expm1(0.04 - 0.608), rel=1e-9)
    assert row["answer_ci95"][0] < row["answer_change"] < row["answer_ci95"][1] < 0
    assert row["prompt_change"] == pytest.approx(np.expm1(20 / (20 * 1023)), rel=1e-6)
    assert compare.main([str(task_results_file), "--baseline", "dense"]) == 0
    table = (task_results_file.parent / "tasks_compare_vs_dense.md").read_text()
    assert "| passkey | 1024 | 0.9 | dense | h2o | 1.00 | 0.40 | -0.60 | 12 / 0 |" in table
    assert "McNemar's exact test" in table


def test_task_comparison_of_fractional_scores_uses_a_sign_flip_test(task_results_file, capsys):
    from eval.statistics import sign_flip_p_value
    data = json.loads(task_results_file.read_text())
    cells = data["tasks"]["passkey"]
    for name, s in (("h2o", "0.9"), ("cab_v4", "0.9")):
        for i, sample in enumerate(cells[name]["sparsity_sweep"][s]["per_sample"]):
            sample["score"] = 0.25 * (i % 5) if name == "h2o" else 0.5
    task_results_file.write_text(json.dumps(data))
    assert compare.main([str(task_results_file), "--methods", "h2o", "cab_v4", "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["test"] == "sign-flip" and row["a_only"] is None
    assert row["difference"] == pytest.approx(0.0)
    differences = [0.5 - 0.25 * (i % 5) for i in range(20)]
    assert row["p_value"] == sign_flip_p_value(differences, seed=42)


def test_pooling_pools_the_tasks_samples(task_results_file, capsys):
    data = json.loads(task_results_file.read_text())
    data["tasks"]["niah_single"] = data["tasks"]["passkey"]
    task_results_file.write_text(json.dumps(data))
    assert compare.main([str(task_results_file), "--methods", "h2o", "cab_v4", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2
    assert compare.main([str(task_results_file), "--methods", "h2o", "cab_v4", "--json",
                         "--pool-datasets"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["task"] == "niah_single+passkey" and row["samples"] == 40
    assert (row["a_only"], row["b_only"]) == (4, 24)


def test_against_pairs_the_same_method_across_two_files(task_results_file, results_file,
                                                        tmp_path, capsys):
    """--against: each method of the other file against the same method here, sample by
    sample (here h2o's needles under another option: all 20 found); files that did not score
    the same samples or windows are refused, naming them."""
    data = json.loads(task_results_file.read_text())
    found = data["tasks"]["passkey"]["h2o"]["sparsity_sweep"]["0.9"]
    for sample in found["per_sample"]:
        sample["score"] = 1.0
    other = tmp_path / "dense_decoding.json"
    other.write_text(json.dumps(data))
    assert compare.main([str(task_results_file), "--against", str(other), "--methods", "h2o",
                         "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert (row["a"], row["b"]) == ("h2o (tasks)", "h2o (dense_decoding)")
    assert (row["accuracy_a"], row["accuracy_b"], row["a_only"], row["b_only"]) == (
        0.4, 1.0, 0, 12)
    assert compare.main([str(task_results_file), "--against", str(other)]) == 0
    table = (task_results_file.parent / "tasks_compare_against_dense_decoding.md").read_text()
    assert "cab_v4 (tasks) | cab_v4 (dense_decoding)" in table
    for sample in found["per_sample"]:
        sample["depth"] += 0.01  # other samples
    other.write_text(json.dumps(data))
    assert compare.main([str(task_results_file), "--against", str(other)]) == 2
    assert "did not score the same samples" in capsys.readouterr().err
    assert compare.main([str(results_file), "--against", str(other)]) == 2
    assert "methods in both" not in capsys.readouterr().err  # no shared cells: said so
