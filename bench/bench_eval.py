"""End-to-end mask-protocol forward against the model's dense forward, selection included.

One run, one window, same threads: the model's own forward (sdpa attention) and the forward
under cabattn's mask protocol for each method at sparsity s; the runs are interleaved repeat by
repeat so machine noise hits them alike. Prints each method's time as a ratio of the dense
forward's, its selection and attention seconds, the window's loss and the realised density, and
appends a dated section to bench/RESULTS.md.

  .venv/bin/python bench/bench_eval.py            # SmolLM2-135M, a pd-books window, L=8192, s=0.9
  .venv/bin/python bench/bench_eval.py --length 2048 --methods cab_v3 h2o

The issue's CPU targets at L=8192, s=0.9: cab_v3 <= 0.7x and cab_v4 <= 0.95x the dense forward.
"""
import argparse
from contextlib import nullcontext
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cabattn  # noqa: E402
from bench_common import book_window, report  # noqa: E402

TARGETS = {"cab_v3": 0.7, "cab_v4": 0.95}


def forward(model, ids, method=None, sparsity=0.0):
    """(seconds, loss, stats or None) of one forward over ids, under `method` when given."""
    with cabattn.apply(model, method, sparsity) if method else nullcontext() as stats:
        start = time.perf_counter()
        loss = model(ids, labels=ids).loss
        return time.perf_counter() - start, float(loss), stats


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--length", type=int, default=8192, help="window length L (8192)")
    p.add_argument("--sparsity", type=float, default=0.9, help="s (0.9)")
    p.add_argument("--methods", nargs="+", default=["cab_v3", "cab_v4"],
                   help="methods run under the mask protocol (cab_v3 cab_v4)")
    p.add_argument("--repeats", type=int, default=1, help="timed forwards per run (1)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-record", action="store_true", help="print only")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded, ids = book_window(args.length)
    model = loaded.model
    runs = {"dense": None, **{m: m for m in args.methods}}

    times = {name: [] for name in runs}
    results = {}
    with torch.inference_mode():
        for method in runs.values():  # warm-up: thread pools, allocator, one short window
            forward(model, ids[:, :512], method, args.sparsity)
        for _ in range(args.repeats):
            for name, method in runs.items():
                seconds, loss, stats = forward(model, ids, method, args.sparsity)
                times[name].append(seconds)
                results[name] = (loss, stats)
                print(f"{name}: {seconds:.1f} s, loss {loss:.4f}", flush=True)

    dense = statistics.median(times["dense"])
    cpu = platform.processor() or platform.machine()
    header = (f"{loaded.name}, one pd-books window of L={args.length}, s={args.sparsity}, "
              f"mask protocol (block size auto), CPU ({cpu}), "
              f"float32, {torch.get_num_threads()} threads, torch {torch.__version__}, "
              f"median of {args.repeats}, runs interleaved")
    rows = ["| run | seconds | / dense | target | selection s | attention s | loss (PPL) "
            "| density |", "|---|---|---|---|---|---|---|---|"]
    for name in runs:
        seconds = statistics.median(times[name])
        loss, stats = results[name]  # of the last forward
        target = f"<= {TARGETS[name]}x" if name in TARGETS else ""
        if stats is None:
            cells = ["", "", f"{loss:.4f} ({math.exp(loss):.2f})", "1"]
        else:
            cells = [f"{stats.selection_seconds:.2f}", f"{stats.attention_seconds:.2f}",
                     f"{loss:.4f} ({math.exp(loss):.2f})", f"{stats.density:.3f}"]
        rows.append(f"| {name} | {seconds:.2f} | {seconds / dense:.2f} | {target} | "
                    + " | ".join(cells) + " |")
    report("Mask-protocol forward vs dense forward (bench_eval.py)", header, rows,
           record=not args.no_record)


if __name__ == "__main__":
    main()
