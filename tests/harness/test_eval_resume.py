"""A run killed between cells resumes without recomputing or losing the finished cells."""
import json
import signal
import subprocess
import sys

import pytest
from helpers import REPO, subprocess_env
from eval_assets import tiny_run_args

from eval import cell, cli

pytestmark = pytest.mark.usefixtures("single_thread")
# The run under test, slowed down right after the first cell is stored, so that the test can
# stop it between cells at a known point.
SCRIPT = """
import sys, time
from eval import cli
from eval.results import CellStore
store = CellStore.put
def put_then_wait(self, *args, **kwargs):
    path = store(self, *args, **kwargs)
    print("CELL STORED", flush=True)
    time.sleep(600)
    return path
CellStore.put = put_then_wait
sys.exit(cli.main(sys.argv[1:]))
"""
RUN = ["--method", "dense", "--context-lengths", "64", "96", "128", "--no-sparsity-sweep",
       "--max-windows", "2", "--no-report"]


def _start_and_stop_after_first_cell(args, how):
    env = subprocess_env()
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    for line in proc.stdout:  # blocks until the first cell is in the store
        output.append(line)
        if line.startswith("CELL STORED"):
            break
    proc.send_signal(how)
    rest, _ = proc.communicate(timeout=120)
    return proc.returncode, "".join(output) + rest


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM],
                         ids=["kill-9", "kill"])
def test_killed_run_resumes_without_recomputing(how, tiny_model, tiny_text, tmp_path,
                                                monkeypatch, capsys):
    args = tiny_run_args(tiny_model, tiny_text, tmp_path, *RUN)
    code, output = _start_and_stop_after_first_cell(args, how)
    cells = list((tmp_path / "tiny.cells").glob("*.json"))
    assert len(cells) == 1, output
    stored = cells[0].read_bytes()
    if how == signal.SIGKILL:
        assert code == -signal.SIGKILL
    else:  # SIGTERM stops the run like Ctrl-C: partial results written, exit 130
        assert code == cli.EXIT_INTERRUPTED, output
        partial = json.loads((tmp_path / "tiny.json").read_text())
        assert partial["config"]["status"] == "interrupted"
        assert list(partial["results"][partial["config"]["datasets"][0]]["dense"]
                    ["context_length_sweep"]) == ["64"]

    computed = []
    compute_cell = cell.compute_cell
    monkeypatch.setattr(cell, "compute_cell", lambda config, loaded, windows, spec, **kw:
                        computed.append(spec) or compute_cell(config, loaded, windows, spec, **kw))
    assert cli.main(args + ["--resume"]) == cli.EXIT_OK
    assert "1 already finished" in capsys.readouterr().out
    assert sorted(s.context_length for s in computed) == [96, 128]  # 64 was not recomputed
    assert cells[0].read_bytes() == stored
    results = json.loads((tmp_path / "tiny.json").read_text())
    dataset = results["config"]["datasets"][0]
    sweep = results["results"][dataset]["dense"]["context_length_sweep"]
    assert list(sweep) == ["64", "96", "128"]
    assert sweep["64"]["finished"] == json.loads(stored)["result"]["finished"]
    assert results["config"]["status"] == "complete"
    assert (results["config"]["cells_computed"], results["config"]["cells_reused"]) == (2, 1)

    computed.clear()  # --fresh recomputes everything
    assert cli.main(args + ["--fresh"]) == cli.EXIT_OK
    assert sorted(s.context_length for s in computed) == [64, 96, 128]
