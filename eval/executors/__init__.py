"""Where the cells of a run are computed: in this process (`serial`) or on Ray actors (`ray`).

An executor receives the runner's pending computations (RunSpecs, grouped by (dataset, L)) and
yields `(spec, R, where)` as each one finishes; R carries an `error` when the cell failed. Just
before it sends a cell off it asks `claim(spec)`, and skips the cell when that says no (another
run is computing it). It stores nothing: the runner is the only writer of the cell store and
the results.

    executor = make_executor("ray", config, say, address="auto")
    executor.prepare()                     # may fix the device the cells will run on
    for spec, result, where in executor.run(specs, windows_for, claim): ...
    executor.close()

It also gives the run's provenance (`model_info()`), the tokenizer the driver tokenises with,
and `time_forward(input_ids)`: one dense forward's seconds for the size estimate (None where
the driver holds no model).

`shard(specs, index, count)` is the deterministic partition of a run for job arrays.
"""
import re

from cabattn.checks import lookup

from .common import ExecutorError, load_run_model, model_info
from .on_ray import RayExecutor
from .serial import SerialExecutor

__all__ = ["EXECUTORS", "ExecutorError", "RayExecutor", "SerialExecutor", "load_run_model",
           "make_executor", "model_info", "parse_shard", "shard"]

EXECUTORS = ("serial", "ray")
_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def make_executor(name: str, config, say, progress: bool = False, address=None,
                  threads: int = 1):
    """progress: per-window bars (serial); address: a Ray cluster ("auto", "ray://host:10001";
    None starts a local one); threads: torch threads per Ray CPU actor."""
    lookup("executor", name, dict.fromkeys(EXECUTORS))
    if name == "serial":
        return SerialExecutor(config, say, progress)
    return RayExecutor(config, say, address, threads)


def parse_shard(text: str) -> tuple:
    """'I/N' -> (I, N) with 1 <= I <= N; ValueError naming the bad value otherwise."""
    match = _SHARD.match(str(text))
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise ValueError(f"shard {text!r} is not I/N with 1 <= I <= N (e.g. 1/4 ... 4/4; a "
                         "Slurm array passes $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)")
    return int(match[1]), int(match[2])


def shard(specs: list, index: int, count: int) -> list:
    """Shard `index` of `count` (1-based) of a run's planned computations: every count-th one
    from the index-th, so that each shard gets a share of every (dataset, L) group and the
    shards of one plan never overlap. Deterministic: it depends only on the plan's order."""
    return list(specs[index - 1::count])
