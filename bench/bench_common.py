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


def book_window(length: int):
    """(LoadedModel, input_ids [1, length]): the offline default model and the first pd-books
    window, the window every model-level benchmark measures."""
    from eval.data import load_windows
    from eval.models import load_model
    loaded = load_model("smollm2-135m")
    return loaded, load_windows("pd-books", loaded.tokenizer, length, max_windows=1).input_ids[:1]


def report(title: str, header: str, rows: list, record: bool = True) -> None:
    """Prints the table (one line of set-up, then markdown rows) and, when `record`, appends it
    to RESULTS.md as a dated section."""
    print(f"{header}\n" + "\n".join(rows))
    if record:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        with open(RESULTS, "a") as out:
            out.write(f"\n## {title}, {stamp}\n\n{header}\n\n" + "\n".join(rows) + "\n")
        print(f"appended to {RESULTS}")
