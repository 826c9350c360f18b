"""What every benchmark script shares: timing one call and recording a table in RESULTS.md."""
import datetime
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def _timer(fn, device: str):
    def timed():
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start
    return timed


def median_seconds(fn, repeats: int, device: str = "cpu") -> float:
    """Median wall time of fn() after one warm-up call (allocator, thread pools, compilation);
    on CUDA the device is synchronised around each call."""
    timed = _timer(fn, device)
    timed()
    return statistics.median(timed() for _ in range(repeats))


def interleaved_seconds(fns: dict, repeats: int, device: str = "cpu") -> dict:
    """{name: [seconds per round]}: one warm-up call each, then `repeats` rounds that time every
    fn once in turn, so a change in machine load hits all of them alike (compare them round by
    round: see median_ratio)."""
    timers = {name: _timer(fn, device) for name, fn in fns.items()}
    for timed in timers.values():
        timed()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, timed in timers.items():
            times[name].append(timed())
    return times


def median_ratio(numerator: list, denominator: list) -> float:
    """Median over rounds of numerator[i] / denominator[i] (times from interleaved_seconds)."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def book_window(length: int):
    """(LoadedModel, input_ids [1, length]): the offline default model and the first pd-books
    window, the window every model-level benchmark measures."""
    from eval.data import load_windows
    from eval.models import load_model
    loaded = load_model("smollm2-135m")
    return loaded, load_windows("pd-books", loaded.tokenizer, length, max_windows=1).input_ids[:1]


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo where there is one) and its vector ISA paths."""
    from cabattn import ops
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            name = next(line.split(":", 1)[1].strip() for line in info
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, supports {'/'.join(ops.supported_cpu_isas())}"


def report(title: str, header: str, rows: list, record: bool = True) -> None:
    """Prints the table (one line of set-up, then markdown rows) and, when `record`, appends it
    to RESULTS.md as a dated section."""
    print(f"{header}\n" + "\n".join(rows))
    if record:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        with open(RESULTS, "a") as out:
            out.write(f"\n## {title}, {stamp}\n\n{header}\n\n" + "\n".join(rows) + "\n")
        print(f"appended to {RESULTS}")
