"""The ways a user starts the harness (docs/architecture.md, Entry points): `python -m eval.run`
from a checkout, the original benchmark's `python -m experiments.perplexity_lm.driver` and its
Python names, and the design's own example without --datasets on a machine without the hub."""
import subprocess
import sys

from helpers import REPO, subprocess_env

import eval
from eval import cli, config, runner


def _run(*args) -> subprocess.CompletedProcess:
    env = subprocess_env(HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def test_the_original_python_names_are_the_harness_objects():
    import experiments.perplexity_lm as original
    assert original.run_benchmark is runner.run_benchmark is eval.run_benchmark
    assert original.PerplexityBenchmarkRunner is runner.PerplexityBenchmarkRunner
    assert original.create_quick_test is config.create_quick_test
    assert original.ExperimentConfig is config.ExperimentConfig
    assert original.ModelConfig is config.ModelConfig


def test_the_original_driver_is_the_same_command_line():
    proc = _run("experiments.perplexity_lm.driver", "--icml-full", "--quick-test")
    assert proc.returncode == cli.EXIT_CONFIG, proc.stdout + proc.stderr
    assert "choose one of --quick-test, --icml-full, --config" in proc.stderr


def test_without_datasets_and_hub_the_default_runs_on_the_offline_corpora(tmp_path):
    offline, note = config.default_config(hub_online=False)
    assert offline.datasets == list(eval.data.OFFLINE_DATASETS) and "unreachable" in note
    online, note = config.default_config(hub_online=True)
    assert online.datasets == ["wikitext-103"] and note is None
    # The design's example, stopped by a bad context length after it has said which corpora.
    proc = _run("eval.run", "--method", "cab_v3", "--context-lengths", "1",
                "--output-dir", str(tmp_path))
    assert proc.returncode == cli.EXIT_CONFIG, proc.stdout + proc.stderr
    first = proc.stdout.splitlines()[0]
    assert first.startswith("note: the Hugging Face hub is unreachable") and "pd-books" in first
    assert "context length 1" in proc.stderr


def test_an_explicit_hub_dataset_keeps_its_error(tmp_path):
    proc = _run("eval.run", "--method", "cab_v3", "--datasets", "wikitext-103",
                "--output-dir", str(tmp_path))
    assert proc.returncode == cli.EXIT_CONFIG
    assert "wikitext-103" in proc.stderr and "--data-file" in proc.stderr
    assert "note:" not in proc.stdout
