"""The task outputs of eval.report (docs/tasks.md, Cells and outputs): the accuracy table with
intervals and perplexity change, the needle heatmaps, accuracy against perplexity change."""
from eval.report import make_report
from eval.results import write_json_atomic
from eval.tasks.report import accuracy_table_markdown


def cell(method, s, L, accuracy, delta, depth_accuracy):
    return {"kind": "task", "task": "passkey", "scoring": "teacher_forced", "accuracy": accuracy,
            "accuracy_ci95": [max(0.0, accuracy - 0.3), min(1.0, accuracy + 0.2)],
            "samples": 5, "method": method, "sparsity": s, "context_length": L,
            "method_run": "dense" if s == 0 else method, "delta_vs_dense": delta,
            "by_depth": {d: {"accuracy": a, "samples": 1}
                         for d, a in zip(["0.1", "0.3", "0.5", "0.7", "0.9"], depth_accuracy)}}


def results():
    tasks = {"passkey": {
        "dense": {"context_length_sweep": {str(L): cell("dense", 0.0, L, 1.0, 0.0, [1] * 5)
                                           for L in (512, 1024)}},
        "h2o": {"context_length_sweep": {str(L): cell("h2o", 0.9, L, 0.2, 0.05,
                                                      [0, 0, 0, 0, 1]) for L in (512, 1024)},
                "sparsity_sweep": {"0.5": cell("h2o", 0.5, 1024, 0.6, 0.01, [0, 1, 1, 0, 1]),
                                   "0.9": cell("h2o", 0.9, 1024, 0.2, 0.05, [0, 0, 0, 0, 1])}}}}
    return {"config": {"protocol": "kv", "sparsity_sweep": {"fixed_context_length": 1024}},
            "results": {}, "tasks": tasks}


def test_accuracy_table_has_intervals_and_perplexity_change():
    table = accuracy_table_markdown(results())
    assert "| method | L=512 s=0 | L=512 s=0.9 | L=1024 s=0 | L=1024 s=0.5 | L=1024 s=0.9 |" \
        in table
    assert "| h2o | - | 0.20 [0.00, 0.40], PPL +5.0% | - | 0.60 [0.30, 0.80], PPL +1.0% |" \
        in table
    assert "kv protocol" in table and "5 samples" in table


def test_report_writes_the_task_outputs(tmp_path):
    path = tmp_path / "run.json"
    write_json_atomic(path, results())
    written = {p.name for p in make_report(path)}
    assert {"run_tasks.md", "run_heatmap_passkey.png", "run_heatmap_passkey.pdf",
            "run_accuracy_vs_ppl.png", "run_accuracy_vs_ppl.pdf"} <= written


def test_a_table_without_prompt_changes_says_why_and_draws_no_accuracy_figure(tmp_path):
    """Prefill-protocol task cells score their prompt from the compressed context's end on,
    so they carry no change against dense: the caption says so, no figure is drawn."""
    run = results()
    for sweep in run["tasks"]["passkey"]["h2o"].values():
        for r in sweep.values():
            r["delta_vs_dense"] = None
    assert "(none: the cells score the prompt" in accuracy_table_markdown(run)
    assert "(none:" not in accuracy_table_markdown(results())
    path = tmp_path / "run.json"
    write_json_atomic(path, run)
    written = {p.name for p in make_report(path)}
    assert "run_tasks.md" in written and "run_accuracy_vs_ppl.png" not in written
