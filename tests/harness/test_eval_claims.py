"""Per-cell claims: two runs into one output folder never compute the same cell twice."""
import subprocess
import sys

import pytest
from helpers import REPO, subprocess_env
from eval_assets import tiny_run_args

from eval import cell, cli
from eval.results import CellStore

KEY = {"dataset": "tiny", "context_length": 64, "method": "dense"}


def test_a_claim_excludes_others_until_released(tmp_path):
    store = CellStore(tmp_path / "cells")
    first = store.try_claim(KEY)
    assert first is not None
    assert "pid" in store.claim_holder(KEY)
    assert store.try_claim(KEY) is None  # another claimant (another open file) is refused
    assert store.try_claim({**KEY, "context_length": 128}) is not None  # other cells are free
    first.release()
    assert not store.claim_path(KEY).exists()  # no claim file left behind
    with store.try_claim(KEY) as again:
        assert again is not None and store.try_claim(KEY) is None
    assert store.try_claim(KEY) is not None


def test_the_claim_of_a_killed_process_is_free(tmp_path):
    store = CellStore(tmp_path / "cells")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from eval.results import CellStore; "
         f"c = CellStore(sys.argv[1]).try_claim({KEY!r}); print('held', flush=True); "
         "time.sleep(600)", str(store.folder)], cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert store.try_claim(KEY) is None
    finally:
        holder.kill()
        holder.wait()
    claim = store.try_claim(KEY)  # kill -9 left its claim file, but not its lock
    assert claim is not None
    claim.release()


@pytest.mark.usefixtures("single_thread")
def test_a_cell_another_run_computes_is_waited_for_not_recomputed(tiny_model, tiny_text,
                                                                   tmp_path, monkeypatch,
                                                                   capsys):
    args = tiny_run_args(tiny_model, tiny_text, tmp_path, "--method", "dense",
                         "--context-lengths", "64", "96", "--no-sparsity-sweep",
                         "--max-windows", "1", "--no-report")
    config = cli.configs_from_args(cli.build_parser().parse_args(args))[0][0]
    busy_spec = cell.RunSpec("tiny", 64, "dense", 0.0)
    busy_key = cell.cell_key(config, busy_spec)
    store = CellStore(tmp_path / "tiny.cells")
    other_run = store.try_claim(busy_key)  # "another run" is computing L=64
    other_result = {"perplexity": 5.0, "cross_entropy": 1.6094379124341003,
                    "bits_per_token": 2.321928094887362, "bits_per_byte": 0.5,
                    "num_tokens": 63, "num_samples": 1, "ppl_ci95": [5.0, 5.0],
                    "density": 1.0}

    wait_for_claim = CellStore.claim

    def other_run_finishes_then_wait(self, key):
        if key == busy_key:  # the other run stores its cell and lets go while we wait
            self.put(key, other_result)
            other_run.release()
        return wait_for_claim(self, key)

    monkeypatch.setattr(CellStore, "claim", other_run_finishes_then_wait)
    computed = []
    compute_cell = cell.compute_cell
    monkeypatch.setattr(cell, "compute_cell", lambda config, loaded, windows, spec, **kw:
                        computed.append(spec) or compute_cell(config, loaded, windows, spec, **kw))
    assert cli.main(args) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "being computed by another run (pid" in out
    assert [s.context_length for s in computed] == [96]  # 64 came from the other run
    assert "1 reused" in out


def test_two_runs_into_one_folder_compute_each_cell_once(tiny_model, tiny_text, tmp_path):
    import re

    args = tiny_run_args(tiny_model, tiny_text, tmp_path, "--method", "dense",
                         "--context-lengths", "64", "96", "128", "160", "--no-sparsity-sweep",
                         "--max-windows", "2", "--no-report")
    env = subprocess_env()
    runs = [subprocess.Popen([sys.executable, "-m", "eval.run", *args], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for _ in range(2)]
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    assert [run.returncode for run in runs] == [cli.EXIT_OK] * 2, outputs
    counts = [re.search(r"(\d+) cells computed, (\d+) reused", out) for out in outputs]
    assert all(counts), outputs
    assert sum(int(c[1]) for c in counts) == 4, outputs  # each of the 4 cells once in all
    assert all(int(c[1]) + int(c[2]) == 4 for c in counts)  # each run reports all 4
    assert len(list((tmp_path / "tiny.cells").glob("*.json"))) == 4
    assert not list((tmp_path / "tiny.cells").glob("*.claim"))
