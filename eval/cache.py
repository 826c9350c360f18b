"""The one cache folder that models and data share, and safe ways to fill it.

Everything in it is safetensors, .npy or JSON (never pickle) and is written atomically: a
reader sees a finished file or none. A per-entry lock keeps two processes (a test run and a
benchmark, say) from fetching or converting the same thing at once.
"""
import contextlib
import fcntl
import os
import tempfile
from pathlib import Path

def cache_dir(override=None) -> Path:
    """cabattn.cache.cache_dir: override, else $CABATTN_CACHE, else ~/.cache/cabattn (the
    library keeps the rule, for its self-check; imported here on use, so that importing the
    harness does not load torch)."""
    from cabattn.cache import cache_dir as library_cache_dir
    return library_cache_dir(override)


@contextlib.contextmanager
def locked(path: Path):
    """Hold an exclusive lock named after path (path + '.lock') while filling path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(str(path) + ".lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


@contextlib.contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside path; on success it replaces path in one rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
