"""Bad task input fails before any model loads, naming the bad value and the valid ones
(docs/tasks.md, Bad input)."""
import json

import pytest
from eval_assets import no_model_loading, tiny_model, tiny_text  # noqa: F401

from eval import cli

pytestmark = pytest.mark.usefixtures("no_model_loading")


def run_cli(tiny_model, tmp_path, *extra):
    return cli.main(["--model", str(tiny_model), "--methods", "dense", "--context-lengths",
                     "256", "--no-sparsity-sweep", "--output-dir", str(tmp_path), "--yes",
                     *extra])


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_unknown_task_names_the_valid_ones(tiny_model, tmp_path, capsys):
    assert run_cli(tiny_model, tmp_path, "--tasks", "passkey", "passkee") == cli.EXIT_CONFIG
    err = capsys.readouterr().err
    assert "unknown task 'passkee'; valid tasks: passkey, niah_single" in err
    assert "common_words" in err and "variable_tracking" in err


@pytest.mark.parametrize("record, message", [
    ({"context": "c", "answers": ["a"]}, "line 2 lacks input; every line needs context, input, "
                                         "answers"),
    ({"context": "c", "input": "q", "answers": []}, "answers must be a non-empty list"),
    ({"context": "c", "input": "q", "answers": ["  "]}, "answers must be a non-empty list"),
    ({"context": "c", "input": "q", "answers": ["a"], "all_classes": "a"},
     "all_classes must be a list of strings or null"),
])
def test_bad_task_file_names_file_line_and_fields(tiny_model, tmp_path, capsys, record,
                                                 message):
    good = {"context": "some text", "input": "what?", "answers": ["this"]}
    path = write_jsonl(tmp_path / "qa.jsonl", [good, record])
    assert run_cli(tiny_model, tmp_path, "--task-files", str(path)) == cli.EXIT_CONFIG
    err = capsys.readouterr().err
    assert f"task file {path}" in err and message in err


def test_task_file_must_be_jsonl(tiny_model, tmp_path, capsys):
    path = tmp_path / "qa.csv"
    path.write_text("context,input,answers\n")
    assert run_cli(tiny_model, tmp_path, "--task-files", str(path)) == cli.EXIT_CONFIG
    assert "must be JSON lines (.jsonl)" in capsys.readouterr().err


def test_context_too_short_names_the_minimum(tiny_model, tmp_path, capsys):
    assert run_cli(tiny_model, tmp_path, "--tasks", "niah_multiquery", "--context-lengths",
                   "128") == cli.EXIT_CONFIG
    err = capsys.readouterr().err
    assert "task 'niah_multiquery' does not fit in L = 128 tokens" in err
    assert "give a context length of at least" in err


def test_unknown_metric_and_haystack_in_a_config_file(tiny_model, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"name: bad\nmodel: {{name: {tiny_model}}}\ndatasets: []\n"
                      "methods: [dense]\ncontext_length_sweep: {context_lengths: [256]}\n"
                      "sparsity_sweep: {enabled: false}\n"
                      "tasks: {names: [passkey], metric: bleu, haystack: grass}\n")
    assert cli.main(["--config", str(config), "--output-dir", str(tmp_path)]) == cli.EXIT_CONFIG
    err = capsys.readouterr().err
    assert "unknown task metric 'bleu'; valid: exact_match, f1, rouge_l" in err
    assert "unknown task haystack 'grass'; valid: text, noise" in err
    # the command line offers only the valid metrics
    with pytest.raises(SystemExit):
        run_cli(tiny_model, tmp_path, "--tasks", "passkey", "--task-metric", "bleu")
    assert "invalid choice: 'bleu'" in capsys.readouterr().err


def test_yaml_takes_a_plain_task_list(tmp_path):
    from eval.config import load_config
    path = tmp_path / "run.yaml"
    path.write_text("name: t\ntasks: [passkey, niah_single]\n")
    config = load_config(path)[0]
    assert config.tasks.names == ["passkey", "niah_single"] and config.tasks.haystack == "text"
