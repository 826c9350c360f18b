"""Bad input and failures found by trying the harness as a new user would: each
fails before the model loads, with exit 2 and a message naming the bad value and what would
be valid, never with a traceback; and what is valid but probably not meant gets a warning."""
import pytest
from helpers import REPO, subprocess_env

from eval import cli


def _base(model, text, output_dir, *extra):
    return ["--model", str(model), "--data-file", str(text), "--methods", "dense", "h2o",
            "--context-lengths", "128", "--no-sparsity-sweep", "--output-dir",
            str(output_dir), "--yes", *extra]


@pytest.mark.parametrize("param, message", [
    ("cab_v3.lambda_redundancy=-1", "lambda_redundancy=-1"),
    ("cab_v3.no_such_param=1", "no_such_param"),
])
def test_params_of_a_method_not_run_are_still_validated(param, message, tiny_model, tiny_text,
                                                        tmp_path, no_model_loading, capsys):
    assert cli.main(_base(tiny_model, tiny_text, tmp_path, "--param", param)) == cli.EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.startswith("error: invalid configuration") and message in err, err
    assert "cab_v3" in err and "Traceback" not in err


def test_a_param_for_a_method_not_run_is_named_in_a_warning(tiny_model, tiny_text, tmp_path,
                                                             monkeypatch, capsys):
    monkeypatch.setattr("eval.runner.PerplexityBenchmarkRunner.run", lambda self: {})
    assert cli.main(_base(tiny_model, tiny_text, tmp_path, "--param",
                          "cab_v3.lambda_redundancy=0.5")) == cli.EXIT_OK
    err = capsys.readouterr().err
    assert "warning:" in err and "'cab_v3', which this run does not include" in err, err


def test_a_model_folder_that_does_not_exist_says_so(tiny_text, tmp_path, no_model_loading,
                                                    capsys):
    missing = tmp_path / "nonexistent"
    assert cli.main(_base(missing, tiny_text, tmp_path / "out")) == cli.EXIT_CONFIG
    err = capsys.readouterr().err
    assert f"no such model folder: '{missing}'" in err, err
    assert "smollm2-135m" in err and "hub id" in err and "repo id" not in err.lower()


@pytest.mark.parametrize("where", ["proc", "parent_is_a_file", "long_name"])
def test_a_bad_output_location_fails_before_loading(where, tiny_model, tiny_text, tmp_path,
                                                    no_model_loading, capsys):
    if where == "proc":
        extra, message = ["--output-dir", "/proc/cabattn-results"], "/proc/cabattn-results"
    elif where == "parent_is_a_file":
        (tmp_path / "a_file").write_text("")
        extra, message = ["--output-dir", str(tmp_path / "a_file" / "out")], "a_file"
    else:  # 240 bytes: NAME.json fits, but not the temporary file .NAME_latest.json.XXXXXXXX.tmp
        extra, message = ["--name", "n" * 240], "give --name at most 229 bytes"
    assert cli.main(_base(tiny_model, tiny_text, tmp_path, *extra)) == cli.EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err, err
    assert "--output-dir" in err or "--name" in err


def test_a_budget_that_leaves_no_choice_is_warned_about(tiny_model, tiny_text, tmp_path,
                                                        monkeypatch, capsys):
    monkeypatch.setattr("eval.runner.PerplexityBenchmarkRunner.run", lambda self: {})
    argv = _base(tiny_model, tiny_text, tmp_path, "--context-lengths", "256",
                 "--fixed-sparsity", "0.9", "--block-size", "32")
    assert cli.main(argv) == cli.EXIT_OK
    err = capsys.readouterr().err
    assert "at L = 256, s = 0.9" in err and "every method keeps the same layout" in err, err
    assert "--block-size 16" in err
    assert cli.main(argv[:-2] + ["--block-size", "16"]) == cli.EXIT_OK
    assert "same layout" not in capsys.readouterr().err


@pytest.mark.parametrize("name, content, message", [
    ("broken.jsonl", b'{"text": "fine"}\n{"text": "no closing quote}\n',
     "broken.jsonl, line 2, column 10: not valid JSON"),
    ("latin1.txt", "first line\ncaf\u00e9 au lait\n".encode("latin-1"),
     "latin1.txt, line 2: not UTF-8 text (byte 0xe9"),
    ("number.jsonl", b'{"text": "fine"}\n{"text": 42}\n', "number.jsonl, line 2: field 'text' "
     "is int"),
    ("nothing.jsonl", b'{"text": null}\n', "holds no text in field 'text'"),
])
def test_a_broken_data_file_fails_once_before_loading(name, content, message, tiny_model,
                                                      tmp_path, no_model_loading, capsys):
    path = tmp_path / name
    path.write_bytes(content)
    assert cli.main(_base(tiny_model, path, tmp_path / "out")) == cli.EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.count(message) == 1 and "Traceback" not in err, err


def test_jsonl_records_without_text_are_skipped_and_counted(tmp_path):
    from eval.data.corpora import local_corpus
    path = tmp_path / "some.jsonl"
    path.write_text('{"text": "one"}\n{"text": null}\n\n{"text": "two"}\n{"text": ""}\n')
    corpus = local_corpus("some", path, "text")
    assert corpus.documents == ["one", "two"]  # not "None"
    assert "2 records without text skipped (lines 2, 5)" in corpus.description


TINY_RUN = ["--method", "dense", "--context-lengths", "64", "--no-sparsity-sweep",
            "--max-windows", "1", "--no-report"]


@pytest.mark.usefixtures("single_thread")
def test_a_run_that_reuses_every_cell_keeps_provenance_and_a_hand_edit_is_refused(
        tiny_model, tiny_text, tmp_path, capsys):
    import json

    from eval_assets import tiny_run_args
    args = tiny_run_args(tiny_model, tiny_text, tmp_path, *TINY_RUN)
    assert cli.main(args) == cli.EXIT_OK
    first = json.loads((tmp_path / "tiny.json").read_text())["config"]
    assert first["model_info"]["num_parameters"] > 0 and first["windows"]
    assert cli.main(args) == cli.EXIT_OK  # every cell reused: nothing loaded
    again = json.loads((tmp_path / "tiny.json").read_text())["config"]
    assert again["cells_reused"] == 1 and again["cells_computed"] == 0
    assert again["model_info"] == first["model_info"] and again["windows"] == first["windows"]

    (cell,) = (tmp_path / "tiny.cells").glob("*.json")
    record = json.loads(cell.read_text())
    for edited, message in (({}, "lacks perplexity"),
                            ({**record["result"], "perplexity": "garbage"}, "'garbage'")):
        cell.write_text(json.dumps({**record, "result": edited}))
        capsys.readouterr()
        assert cli.main(args) == cli.EXIT_CONFIG
        err = capsys.readouterr().err
        assert str(cell) in err and message in err and "Traceback" not in err, err


# `python -m eval.run`, with torch's import slowed down so that Ctrl-C can reach it there.
SLOW_TORCH_IMPORT = """
import builtins, runpy, sys, time
real_import = builtins.__import__
def slow_import(name, *args, **kwargs):
    if name == "torch" and "torch" not in sys.modules:
        print("IMPORTING TORCH", flush=True)
        time.sleep(60)
    return real_import(name, *args, **kwargs)
builtins.__import__ = slow_import
sys.argv = ["eval.run", *sys.argv[1:]]
runpy.run_module("eval.run", run_name="__main__")
"""


def test_ctrl_c_while_torch_imports_exits_130_without_a_traceback(tmp_path):
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", SLOW_TORCH_IMPORT, "--quick-test", "--yes",
                             "--output-dir", str(tmp_path)], cwd=REPO,
                            env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    before = []
    for line in proc.stdout:  # until torch starts importing
        if line.strip() == "IMPORTING TORCH":
            break
        before.append(line)
    # One Ctrl-C is enough almost always; once in a few full-suite runs on a loaded machine
    # the child slept through it (not reproduced alone), so a second one follows after 10 s,
    # as a user would press it again: the exit must still be clean.
    proc.send_signal(signal.SIGINT)
    try:
        output, _ = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
    output = "".join(before) + output
    assert proc.returncode == cli.EXIT_INTERRUPTED, output
    assert "Traceback" not in output and "interrupted" in output, output


@pytest.mark.usefixtures("single_thread")
def test_a_run_says_its_size_and_a_long_one_asks_first(tiny_model, tiny_text, tmp_path,
                                                       monkeypatch, capsys):
    import re
    import sys

    from eval_assets import tiny_run_args
    args = tiny_run_args(tiny_model, tiny_text, tmp_path, "--methods", "dense", "h2o",
                         "--context-lengths", "64", "128", "--no-sparsity-sweep",
                         "--max-windows", "3", "--no-report")
    # On a terminal, without --yes, a run estimated to be long asks; "n" computes nothing.
    monkeypatch.setattr(cli, "LONG_RUN_SECONDS", 0.0)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    answers = []
    monkeypatch.setattr("builtins.input", lambda prompt: answers.append(prompt) or "n")
    assert cli.main([a for a in args if a != "--yes"]) == cli.EXIT_CONFIG
    out = capsys.readouterr().out
    assert len(answers) == 1 and "aborted: nothing computed" in out
    assert not list((tmp_path / "tiny.cells").glob("*.json"))
    # windows per cell: 3 at each L; forward tokens: dense and h2o at 64 and 128, 3 windows each
    match = re.search(r"to compute: 4 cells; windows per cell tiny@64: 3, tiny@128: 3; "
                      r"([\d,]+) forward tokens in all; about \d+ s at the dense rate", out)
    assert match and int(match[1].replace(",", "")) == 2 * 3 * (64 + 128), out
    # --yes prints the size and goes on, without asking.
    assert cli.main(args) == cli.EXIT_OK
    assert "forward tokens in all" in capsys.readouterr().out and len(answers) == 1
