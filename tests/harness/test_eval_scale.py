"""Scaling a run out: the Ray executor, shards and batches give the serial run's numbers.

One local Ray instance (two CPUs, so two one-thread actors) serves the module's Ray tests; each
run is compared cell by cell with a serial run of the same sweep on the tiny random Llama.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, subprocess_env
from eval_assets import tiny_run_args

from eval import cli
from eval.executors import on_ray, parse_shard, shard
from eval.results import METRIC_FIELDS

pytestmark = pytest.mark.usefixtures("single_thread")
# Six computations in two (dataset, L) groups; random checks that seeding follows the window.
SWEEP = ["--methods", "dense", "h2o", "random", "--context-lengths", "64", "128",
         "--fixed-sparsity", "0.5", "--sparsity-levels", "0.5", "--max-windows", "3",
         "--block-size", "16", "--k-min", "16", "--no-report"]


def metrics(path: Path) -> dict:
    """{(dataset, method, sweep, point): the cell's metrics} of a results file."""
    results = json.loads(path.read_text())["results"]
    return {(d, m, sweep, point): {name: cell[name] for name in (*METRIC_FIELDS,
                                                                  "layer_head_density")}
            for d, methods in results.items() for m, sweeps in methods.items()
            for sweep, points in sweeps.items() for point, cell in points.items()}


def run_cli(model, text, folder, *extra) -> tuple:
    code = cli.main(tiny_run_args(model, text, folder, *SWEEP, *extra))
    return code, folder / "tiny.json"


@pytest.fixture(scope="module")
def serial(tiny_model, tiny_text, tmp_path_factory, single_thread):
    code, path = run_cli(tiny_model, tiny_text, tmp_path_factory.mktemp("serial"))
    assert code == cli.EXIT_OK
    reference = metrics(path)
    assert len(reference) == 9 and all(m["perplexity"] for m in reference.values())
    return reference


@pytest.fixture(scope="module")
def local_ray():
    import ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield ray
    ray.shutdown()


def test_ray_executor_gives_the_serial_metrics(local_ray, serial, tiny_model, tiny_text,
                                               tmp_path, capsys):
    code, path = run_cli(tiny_model, tiny_text, tmp_path, "--executor", "ray")
    out = capsys.readouterr().out
    assert code == cli.EXIT_OK, out
    assert metrics(path) == serial
    record = json.loads(path.read_text())["config"]
    assert record["executor"] == "ray" and record["cells_computed"] == 6
    assert record["model_info"]["num_parameters"] > 0
    assert "[6/6]" in out and "[actor " in out  # cells done / total, with the actor's line
    assert len(list((tmp_path / "tiny.cells").glob("*.json"))) == 6


def test_a_killed_actor_loses_no_cell_and_counts_none_twice(local_ray, serial, tiny_model,
                                                            tiny_text, tmp_path, monkeypatch,
                                                            capsys):
    submit, submitted = on_ray.RayExecutor.submit, []

    def submit_then_kill(self, label, spec, windows_ref):
        ref = submit(self, label, spec, windows_ref)
        submitted.append(spec)
        if len(submitted) == 3:  # the actor dies with this cell in flight
            local_ray.kill(self.actors[label])
        return ref

    monkeypatch.setattr(on_ray.RayExecutor, "submit", submit_then_kill)
    code, path = run_cli(tiny_model, tiny_text, tmp_path, "--executor", "ray")
    out = capsys.readouterr().out
    assert code == cli.EXIT_OK, out
    assert "died" in out and "goes back to the queue" in out
    assert len(submitted) == 7 and submitted.count(submitted[2]) == 2  # requeued once
    assert metrics(path) == serial
    assert json.loads(path.read_text())["config"]["cells_computed"] == 6
    assert len(list((tmp_path / "tiny.cells").glob("*.json"))) == 6


def test_shards_then_assemble_give_the_serial_metrics(serial, tiny_model, tiny_text, tmp_path,
                                                      capsys):
    assert run_cli(tiny_model, tiny_text, tmp_path, "--shard", "1/2")[0] == cli.EXIT_OK
    assert not (tmp_path / "tiny.json").exists()  # a shard writes cells, not results
    first = {p.name: p.read_bytes() for p in (tmp_path / "tiny.cells").glob("*.json")}
    assert len(first) == 3
    capsys.readouterr()
    code, path = run_cli(tiny_model, tiny_text, tmp_path, "--assemble")
    out = capsys.readouterr().out
    assert code == cli.EXIT_FAILED and out.count("missing: ") == 3, out
    assert json.loads(path.read_text())["config"]["status"] == "3 missing cells"

    assert run_cli(tiny_model, tiny_text, tmp_path, "--shard", "2/2")[0] == cli.EXIT_OK
    cells = {p.name: p.read_bytes() for p in (tmp_path / "tiny.cells").glob("*.json")}
    assert len(cells) == 6 and all(cells[name] == data for name, data in first.items())
    code, path = run_cli(tiny_model, tiny_text, tmp_path, "--assemble")
    assert code == cli.EXIT_OK
    assert metrics(path) == serial
    assert "missing" not in capsys.readouterr().out


def test_shards_partition_the_plan():
    specs = list(range(11))
    parts = [shard(specs, i, 3) for i in (1, 2, 3)]
    assert sorted(sum(parts, [])) == specs and parts[0] == [0, 3, 6, 9]
    assert parse_shard("2/4") == (2, 4)
    for bad in ("0/2", "3/2", "1", "a/b", "1/0"):
        with pytest.raises(ValueError, match="is not I/N"):
            parse_shard(bad)


@pytest.mark.parametrize("bad, message", [
    (["--shard", "3/2"], "is not I/N"),
    (["--shard", "1/2", "--assemble"], "not both"),
    (["--shard", "1/2", "--fresh"], "--fresh deletes"),
    (["--ray-address", "auto"], "needs --executor ray"),
    (["--batch-size", "0"], "not a positive integer")])
def test_bad_scaling_flags_fail_before_anything_loads(bad, message, tiny_model, tiny_text,
                                                      tmp_path, capsys):
    try:
        code = cli.main(tiny_run_args(tiny_model, tiny_text, tmp_path, *bad))
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    assert code == cli.EXIT_CONFIG
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("protocol", ["mask", "kv"])
def test_batches_of_windows_give_the_batch_size_1_numbers(protocol, tiny_model, tiny_text,
                                                          tmp_path):
    runs = {}
    for batch in (1, 3):
        folder = tmp_path / f"batch{batch}"
        args = tiny_run_args(tiny_model, tiny_text, folder, "--methods", "dense", "h2o",
                             "cab_v4", "random", "--context-lengths", "128",
                             "--no-sparsity-sweep", "--fixed-sparsity", "0.5", "--max-windows",
                             "3", "--block-size", "16", "--protocol", protocol, "--kv-chunk",
                             "8", "--batch-size", str(batch), "--no-report")
        assert cli.main(args) == cli.EXIT_OK
        runs[batch] = metrics(folder / "tiny.json")
    assert runs[1].keys() == runs[3].keys() and len(runs[1]) == 4
    for cell, one in runs[1].items():
        three = runs[3][cell]
        assert three["perplexity"] == pytest.approx(one["perplexity"], rel=1e-5), cell
        assert three["density"] == one["density"], cell  # the same blocks / tokens kept
        assert three["num_tokens"] == one["num_tokens"]


def test_a_serial_run_does_not_import_ray(tiny_model, tiny_text, tmp_path):
    script = ("import sys; from eval import cli; code = cli.main(sys.argv[1:]); "
              "assert 'ray' not in sys.modules, 'ray was imported'; sys.exit(code)")
    args = tiny_run_args(tiny_model, tiny_text, tmp_path, "--method", "dense",
                         "--context-lengths", "64", "--no-sparsity-sweep", "--max-windows", "1",
                         "--no-report")
    env = subprocess_env()
    done = subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_when_every_actor_dies_the_run_stops_with_a_clear_error(local_ray, serial, tiny_model,
                                                                tiny_text, tmp_path,
                                                                monkeypatch, capsys):
    submit = on_ray.RayExecutor.submit

    def submit_and_kill(self, label, spec, windows_ref):
        ref = submit(self, label, spec, windows_ref)
        local_ray.kill(self.actors[label])
        return ref

    monkeypatch.setattr(on_ray.RayExecutor, "submit", submit_and_kill)
    code, path = run_cli(tiny_model, tiny_text, tmp_path, "--executor", "ray")
    assert code == cli.EXIT_FAILED
    assert "every Ray actor died" in capsys.readouterr().err
    assert not list((tmp_path / "tiny.cells").glob("*.claim"))  # claims released
