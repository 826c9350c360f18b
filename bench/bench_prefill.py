"""The prefill protocol's grid against its dense cells: what sharing the dense prefill saves.

A (task, L) group of the prefill protocol is its dense cell (the model's own forward of every
sample) and its sparse cells, (method, s) each. Every sparse cell prefills the same contexts,
so the harness captures each sample's dense prefill once and shares it (docs/protocols.md,
sharing the dense prefill): the first sparse cell pays for the capture, every other one for
its rule and its continuation. This script runs one such grid through the harness (one
process, one run: the cells share the machine's state) and reports the wall seconds of the
dense cell, of the whole grid, and their ratio; or, with --from, reads them from a results
file the harness already wrote (e.g. configs/prefill.yaml's).

  .venv/bin/python bench/bench_prefill.py                       # niah_single, L = 2048
  .venv/bin/python bench/bench_prefill.py --from results/perplexity/prefill_tasks_L2048.json

The target: the grid of nine methods x three sparsities plus dense at most 3x its dense cells.
"""
import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_common import cpu_model, report  # noqa: E402

METHODS = ["dense", "h2o", "cab_v4", "cab_v3", "streaming_llm", "snapkv", "adakv", "tova", "knorm"]
TARGET = 3.0


def run_grid(task: str, length: int, samples: int, threads: int) -> Path:
    """Runs the grid through the harness into a temporary folder; the results file."""
    from eval import cli
    out = Path(tempfile.mkdtemp(prefix="bench_prefill_"))
    status = cli.main(["--protocol", "prefill", "--tasks", task, "--task-samples", str(samples),
                       "--methods", *METHODS, "--context-lengths", str(length),
                       "--sparsity-levels", "0.5", "0.8", "0.9", "--no-context-sweep",
                       "--threads", str(threads), "--output-dir", str(out), "--name", "grid",
                       "--yes", "--no-report"])
    if status:
        raise SystemExit(f"the grid's run failed (exit {status})")
    return out / "grid.json"


def grid_seconds(path: Path) -> list:
    """[(task, L, dense cell's seconds, the grid's seconds, sparse cells)] of a results file."""
    from eval.results import read_json
    rows = []
    for task, methods in read_json(path)["tasks"].items():
        cells = {}
        for sweeps in methods.values():
            for sweep in sweeps.values():
                for r in sweep.values():
                    if r.get("wall_seconds") is not None:  # one computation, once
                        cells[r["method_run"], r["sparsity_run"], r["context_length"]] = r
        for length in sorted({key[2] for key in cells}):
            dense = next(r for (m, s, L), r in cells.items() if m == "dense" and L == length)
            sparse = [r for (m, s, L), r in cells.items() if m != "dense" and L == length]
            total = dense["wall_seconds"] + sum(r["wall_seconds"] for r in sparse)
            rows.append((task, length, dense["wall_seconds"], total, len(sparse)))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--from", dest="results", type=Path,
                   help="read the cells of this results file instead of running the grid")
    p.add_argument("--task", default="niah_single", help="the task (niah_single)")
    p.add_argument("--length", type=int, default=2048, help="L (2048)")
    p.add_argument("--samples", type=int, default=5, help="samples per cell (5)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    p.add_argument("--no-record", action="store_true", help="print only")
    args = p.parse_args(argv)
    path = args.results or run_grid(args.task, args.length, args.samples, args.threads)
    rows = ["| task | L | sparse cells | dense cell (s) | grid incl. dense (s) | grid / dense "
            "| target |", "|---|---|---|---|---|---|---|"]
    for task, length, dense, total, sparse in grid_seconds(path):
        ratio = total / dense
        rows.append(f"| {task} | {length} | {sparse} | {dense:.0f} | {total:.0f} | {ratio:.2f} | "
                    f"{'met' if ratio <= TARGET else 'MISSED'} (<= {TARGET:g}x) |")
    header = (f"Machine: {cpu_model()}. Cells from {path} (the prefill protocol, SmolLM2-135M, "
              "one process; wall seconds of each cell as the harness records them).")
    report("Prefill protocol: the grid against its dense cells (bench_prefill.py)", header,
           rows, record=not args.no_record)


if __name__ == "__main__":
    main()
