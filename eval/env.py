"""The machine a run executes on: device and dtype resolution, peak memory, provenance.

The one place that turns the config's "auto" device and dtype into concrete names; the model
loader (eval.models) maps a dtype name to torch's dtype.
"""
import os
import platform
import resource
import subprocess
from pathlib import Path

import torch

DTYPES = ("float32", "float16", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")  # or cuda:N


def resolve_device(device: str) -> str:
    """"auto" -> cuda when present, else cpu; anything else as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """"auto" -> float16 on CUDA, float32 on the CPU; a dtype name as given."""
    if dtype == "auto":
        return "float16" if device.startswith("cuda") else "float32"
    return dtype


def reset_peak_memory(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def peak_memory_mb(device: str) -> tuple:
    """(megabytes, what was measured): CUDA's peak allocation since reset_peak_memory, or on
    the CPU the process's peak resident set so far (Linux reports ru_maxrss in KiB)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_max_rss"


def free_memory_bytes(device: str) -> int:
    """Memory still free for data on the device: CUDA's free device memory, or on the CPU the
    system's available memory (/proc/meminfo's MemAvailable; sysconf where that is missing)."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                              capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def provenance(device: str) -> dict:
    """Library versions, commit and machine of a run (for the results' config record)."""
    import transformers
    return {
        "torch_threads": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "cabattn_commit": git_commit()},
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(),
                    # A Ray driver may run on a node without the GPUs its actors use.
                    "cuda_device": torch.cuda.get_device_name(0)
                    if device.startswith("cuda") and torch.cuda.is_available() else None}}
