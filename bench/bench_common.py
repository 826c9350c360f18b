"""What every benchmark script shares: timing one call and recording a table in RESULTS.md."""
import datetime
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def median_seconds(fn, repeats: int, device: str = "cpu") -> float:
    """Median wall time of fn() after one warm-up call (allocator, thread pools, compilation);
    on CUDA the device is synchronised around each call."""
    def timed():
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start
    timed()
    return statistics.median(timed() for _ in range(repeats))


def report(title: str, header: str, rows: list, record: bool = True) -> None:
    """Prints the table (one line of set-up, then markdown rows) and, when `record`, appends it
    to RESULTS.md as a dated section."""
    print(f"{header}\n" + "\n".join(rows))
    if record:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        with open(RESULTS, "a") as out:
            out.write(f"\n## {title}, {stamp}\n\n{header}\n\n" + "\n".join(rows) + "\n")
        print(f"appended to {RESULTS}")
