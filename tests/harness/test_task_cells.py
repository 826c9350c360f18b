"""Task cells in the runner (docs/tasks.md): the default model finds every pass key densely
(a real check of the prompt builder), a task cell is stored, resumed and reused like a
perplexity cell, and the results carry the tasks section."""
import pytest
from eval_assets import tiny_model, tiny_text  # noqa: F401

from eval import cli
from eval.runner import PerplexityBenchmarkRunner
from eval.config import ExperimentConfig, TaskConfig
from eval.results import read_json
from eval.tasks.samples import TaskSpec

pytestmark = pytest.mark.usefixtures("single_thread")


def task_config(tmp_path, model="smollm2-135m", L=1024, **tasks) -> ExperimentConfig:
    config = ExperimentConfig(name="tasks", datasets=[], methods=["dense"],
                              output_dir=str(tmp_path), tasks=TaskConfig(**tasks))
    config.model.name = model
    config.context_length_sweep.context_lengths = [L]
    config.sparsity_sweep.enabled = False
    return config


def test_dense_finds_every_pass_key_on_the_default_model(tmp_path):
    config = task_config(tmp_path, names=["passkey"], samples=5, haystack="noise")
    results = PerplexityBenchmarkRunner(config, progress=False, make_report=False).run()
    r = results["tasks"]["passkey"]["dense"]["context_length_sweep"]["1024"]
    assert r["accuracy"] == 1.0 and r["samples"] == 5
    assert r["accuracy_ci95"][0] == pytest.approx(0.566, abs=1e-3)  # Wilson, 5 of 5
    assert sorted(r["by_depth"]) == ["0.1", "0.3", "0.5", "0.7", "0.9"]
    assert r["answer_nll"] < 0.5 and 1.0 < r["perplexity"] < 2.0
    assert results["results"] == {}  # --tasks without datasets: tasks only


def test_task_cell_resumes_and_is_reused(tiny_model, tmp_path):
    args = ["--model", str(tiny_model), "--tasks", "passkey", "niah_single", "--haystack",
            "noise", "--task-samples", "3", "--methods", "dense", "h2o", "--context-lengths",
            "384", "--sparsity-levels", "0.5", "--no-sparsity-sweep", "--protocol", "kv",
            "--output-dir", str(tmp_path), "--name", "tiny", "--yes", "--no-report"]
    assert cli.main(args) == 0
    first = read_json(tmp_path / "tiny.json")
    cells = first["tasks"]["passkey"]["h2o"]["context_length_sweep"]["384"]
    assert cells["samples"] == 3 and cells["protocol"] == "kv" and cells["method_run"] == "h2o"
    assert set(first["tasks"]) == {"passkey", "niah_single"}
    assert first["config"]["windows"]["task:passkey@384"]["haystack"] == "noise"

    # the same command again: every task cell is read back, none computed
    config, _ = cli.configs_from_args(cli.build_parser().parse_args(args))
    runner = PerplexityBenchmarkRunner(config[0], progress=False, make_report=False)
    again = runner.run()
    assert runner.computed == [] and len(runner.reused) == 4
    assert all(isinstance(spec, TaskSpec) for spec in runner.reused)
    assert again["tasks"] == first["tasks"]
    assert again["config"]["windows"] == first["config"]["windows"]

    # another sample count is another cell; the stored ones stay
    config[0].tasks.samples = 2
    runner = PerplexityBenchmarkRunner(config[0], progress=False, make_report=False)
    runner.run()
    assert len(runner.computed) == 4 and runner.reused == []


def test_quick_test_runs_a_small_retrieval_slice():
    from eval.config import quick_test_config
    from eval.runner import plan_runs
    offline, _ = quick_test_config(hub_online=False)
    assert offline.tasks.names == ["niah_single"] and offline.tasks.samples == 4
    tasks = [spec for spec in plan_runs(offline) if isinstance(spec, TaskSpec)]
    assert len(tasks) == 14  # dense at 512 and 1024, 4 methods x 3 points
    online, _ = quick_test_config(hub_online=True)
    assert not online.tasks.enabled  # the original quick test is left as it was
