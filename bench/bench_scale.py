"""Scaling out on one machine: the Ray executor's own overhead, and batches of windows.

  .venv/bin/python bench/bench_scale.py executors   # 12 cells: serial on 2 threads against
                                                    # Ray on two one-thread actors
  .venv/bin/python bench/bench_scale.py batch       # compute_cell at batch size 1 against N

executors: the same 12 computations (SmolLM2-135M, enwiki-sample, 5 methods + dense at two
context lengths, 256 and 512 by default, s = 0.9) with the serial runner on 2 torch threads
and with the Ray executor on two one-thread CPU actors. Ray's own overhead = the Ray run's
wall time (after ray.init, which a cluster pays once when it starts) minus its busiest actor's
work (its cells' wall seconds plus the model load the serial run also pays), as a share of
that wall time. The issue's target: at most 10%.

batch: one loaded model, the same windows, each cell computed at batch size 1 and at N
(interleaved repeat by repeat); the speed-up is the ratio of the two times.
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_common import report  # noqa: E402


def load_note() -> str:
    return "load average (1, 5, 15 min): " + ", ".join(f"{x:.1f}" for x in os.getloadavg())


def sweep_config(output_dir: str, max_windows: int, lengths=(256, 512)):
    from eval.config import ExperimentConfig
    config = ExperimentConfig(name="scale", datasets=["enwiki-sample"],
                              methods=["dense", "h2o", "cab_v3", "cab_v4", "streaming_llm",
                                       "random"], max_windows=max_windows,
                              output_dir=output_dir)
    config.model.name, config.model.device = "smollm2-135m", "cpu"
    config.context_length_sweep.context_lengths = list(lengths)
    config.context_length_sweep.fixed_sparsity = 0.9
    config.sparsity_sweep.enabled = False
    return config


def timed_run(config, **runner_options) -> tuple:
    """(wall seconds of the run after the executor is ready, seconds to get it ready,
    [(spec, result, where)] in order of arrival)."""
    from eval.runner import PerplexityBenchmarkRunner
    runner = PerplexityBenchmarkRunner(config, resume=False, progress=False, make_report=False,
                                       **runner_options)
    executor, arrivals, marks = runner.executor, [], {}
    prepare, run = executor.prepare, executor.run

    def timed_prepare():
        start = time.perf_counter()
        prepare()
        marks["ready"] = time.perf_counter()
        marks["prepare"] = marks["ready"] - start

    def recorded_run(specs, windows_for, claim):
        marks.setdefault("ready", time.perf_counter())
        for item in run(specs, windows_for, claim):
            arrivals.append(item)
            yield item

    executor.prepare, executor.run = timed_prepare, recorded_run
    runner.run()
    return time.perf_counter() - marks["ready"], marks.get("prepare", 0.0), arrivals


def bench_executors(args) -> None:
    import torch
    from eval.executors import load_run_model
    folder = Path(tempfile.mkdtemp(prefix="bench_scale."))
    try:
        config = sweep_config(str(folder / "serial"), args.max_windows, args.lengths)
        torch.set_num_threads(2)
        start = time.perf_counter()
        load_run_model(config, say=lambda message: None)
        load_seconds = time.perf_counter() - start
        serial_wall, _, serial_cells = timed_run(config, executor="serial")
        ray_config = sweep_config(str(folder / "ray"), args.max_windows, args.lengths)
        ray_wall, ray_init, ray_cells = timed_run(ray_config, executor="ray", threads=1)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    busy = {}
    for _, result, where in ray_cells:
        busy[where] = busy.get(where, 0.0) + result["wall_seconds"]
    busiest = max(busy.values()) + load_seconds
    overhead = (ray_wall - busiest) / ray_wall
    same = all(a[1]["perplexity"] == b[1]["perplexity"] for a, b in
               zip(sorted(serial_cells, key=lambda x: x[0].label),
                   sorted(ray_cells, key=lambda x: x[0].label)))
    rows = ["| run | wall s | cells | work s (cells) | notes |", "|---|---|---|---|---|",
            f"| serial, 2 threads | {serial_wall:.1f} | {len(serial_cells)} | "
            f"{sum(r['wall_seconds'] for _, r, _ in serial_cells):.1f} | model load "
            f"{load_seconds:.1f} s (in the wall time) |",
            f"| Ray, 2 actors x 1 thread | {ray_wall:.1f} | {len(ray_cells)} | "
            + " + ".join(f"{busy[k]:.1f}" for k in sorted(busy))
            + f" | ray.init {ray_init:.1f} s (not in the wall time) |",
            "",
            f"Ray's own overhead: {ray_wall:.1f} s wall - {busiest:.1f} s busiest actor (cells + "
            f"model load) = **{overhead * 100:.1f}%** of the wall time (target <= 10%). "
            f"Ray / serial wall: {ray_wall / serial_wall:.2f}x. Perplexities of every cell "
            f"identical between the two runs: {same}."]
    header = (f"{len(serial_cells)} computations (SmolLM2-135M, enwiki-sample, "
              f"{args.max_windows} windows per cell, L = {' and '.join(map(str, args.lengths))}, "
              f"s = 0.9), fp32 CPU, "
              f"{os.cpu_count()} cores; {load_note()} at the end")
    report("Ray executor overhead", header, rows, record=not args.no_record)


def bench_batch(args) -> None:
    import torch
    from eval.data import load_windows
    from eval.executors import load_run_model
    from eval.cell import RunSpec, compute_cell
    torch.set_num_threads(args.threads)
    config = sweep_config(tempfile.gettempdir(), args.max_windows)
    loaded = load_run_model(config, say=lambda message: None)
    rows = ["| protocol | method | L | batch 1 s | batch N s | speed-up | PPL rel. diff |",
            "|---|---|---|---|---|---|---|"]
    for protocol, method in (cell.split(":") for cell in args.cells):
        config.protocol, config.kv_chunk = protocol, 16
        windows = load_windows("enwiki-sample", loaded.tokenizer, args.length,
                               max_windows=args.max_windows)
        spec = RunSpec.for_cell("enwiki-sample", args.length, method, 0.9)
        times, ppl = {1: [], args.batch: []}, {}
        for _ in range(args.repeats):
            for batch in (1, args.batch):
                config.batch_size = batch
                result = compute_cell(config, loaded, windows, spec)
                times[batch].append(result["wall_seconds"])
                ppl[batch] = result["perplexity"]
        one, many = statistics.median(times[1]), statistics.median(times[args.batch])
        rows.append(f"| {protocol} | {method} | {args.length} | {one:.2f} | {many:.2f} | "
                    f"**{one / many:.2f}x** | {abs(ppl[args.batch] / ppl[1] - 1):.1e} |")
        print(rows[-1], flush=True)
    header = (f"compute_cell over {args.max_windows} enwiki-sample windows of {args.length} "
              f"tokens, SmolLM2-135M fp32 CPU, {args.threads} threads, batch size 1 against "
              f"N = {args.batch} (kv: chunk 16), median of {args.repeats} interleaved repeats; "
              f"{load_note()} at the end")
    report("Batches of windows", header, rows, record=not args.no_record)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=("executors", "batch"))
    p.add_argument("--max-windows", type=int, default=4, help="windows per cell (4)")
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 512],
                   help="executors: the context lengths of the sweep (256 512)")
    p.add_argument("--length", type=int, default=512, help="batch: window length (512)")
    p.add_argument("--batch", type=int, default=4, help="batch: N (4)")
    p.add_argument("--threads", type=int, default=2, help="batch: torch threads (2)")
    p.add_argument("--repeats", type=int, default=2, help="batch: repeats (2)")
    p.add_argument("--cells", nargs="+", metavar="PROTOCOL:METHOD",
                   default=["mask:dense", "mask:cab_v3", "mask:h2o", "kv:h2o"],
                   help="batch: the cells timed (mask:dense mask:cab_v3 mask:h2o kv:h2o)")
    p.add_argument("--no-record", action="store_true", help="print only")
    args = p.parse_args(argv)
    (bench_executors if args.what == "executors" else bench_batch)(args)


if __name__ == "__main__":
    main()
