"""Strict JSON files written atomically, and the per-cell store that makes runs resumable.

A file is never left half-written: it is written to a temporary file in the same folder,
fsync'd, then os.replace'd over the target. NaN and infinity are refused on write and on read
(the original code averaged NaN results away; here a failed cell is `null` plus an error).
"""
import fcntl
import hashlib
import json
import math
import os
import socket
from pathlib import Path

from cabattn.checks import is_number, non_negative_int

from .cache import atomic_path
from .statistics import over_seeds, versus_dense


class CorruptFileError(RuntimeError):
    """A results or cell-store file that cannot be read; the message names the file."""


def _reject_constant(name):
    raise ValueError(f"non-finite number {name} (strict JSON has no NaN or Infinity)")


def dumps(obj, indent=2) -> str:
    """Strict JSON: raises ValueError on NaN/inf instead of writing them."""
    return json.dumps(obj, indent=indent, allow_nan=False, sort_keys=False)


def write_json_atomic(path, obj) -> None:
    """Strict JSON to path through a temporary file, fsync'd before and after the rename."""
    path = Path(path)
    text = dumps(obj) + "\n"  # serialise first: a non-finite value must not touch the target
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    # The rename itself is durable only once the folder entry is on disk.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_json(path, remedy: str = "delete it or start over with --fresh"):
    """Parse a strict JSON file; CorruptFileError (naming the file and the remedy) when it
    cannot be read."""
    path = Path(path)
    try:
        return json.loads(path.read_text(), parse_constant=_reject_constant)
    except FileNotFoundError:
        raise CorruptFileError(f"{path}: file does not exist") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise CorruptFileError(f"{path} is corrupt and cannot be read ({err}); {remedy}") \
            from None


def finite_or_none(value):
    """A float for JSON: None where the value is missing or not finite."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


# The version of what a stored cell holds; it is part of every cell key, so a store written by
# an older version is never read as this one: its cells are simply not found, and recomputed.
# 2: R keeps its per-window sums, R["windows"] (docs/statistics.md).
CELL_FORMAT = 2


def cell_id(key: dict) -> str:
    """A stable file name for a cell: hash of its canonical key."""
    canonical = json.dumps(key, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:24]


class CellStore:
    """One JSON file per finished cell in `<folder>/`, keyed by everything that defines the cell
    (dataset, model, method and parameters, sparsity, context length, protocol, windows, ...).

    Each file is {"key": key, "result": R}, written atomically, so a kill at any moment leaves
    every finished cell readable and never a partial one.
    """

    def __init__(self, folder):
        self.folder = Path(folder)

    def path(self, key: dict) -> Path:
        return self.folder / f"{cell_id(key)}.json"

    def claim_path(self, key: dict) -> Path:
        return self.folder / f"{cell_id(key)}.claim"

    # -- claims: one computer per cell ------------------------------------------------------
    # A claim is an exclusive flock on <cell>.claim, held while the cell is computed. The
    # kernel drops the lock when its process dies (kill -9, out of memory), so a claim is
    # never stale; the file itself only says who holds it (pid and host), for messages.

    def try_claim(self, key: dict):
        """A CellClaim when no other process is computing the cell, else None. Release it
        (or use it as a context manager) once the cell is stored or has failed."""
        return CellClaim.acquire(self.claim_path(key), blocking=False)

    def claim(self, key: dict):
        """The cell's CellClaim, waiting while another process holds it (it is released when
        that process has stored the cell, has failed it, or has died)."""
        return CellClaim.acquire(self.claim_path(key), blocking=True)

    def claim_holder(self, key: dict) -> str:
        """Who holds the cell's claim, as written in its claim file ('' when unknown)."""
        try:
            return self.claim_path(key).read_text().strip()
        except OSError:
            return ""

    def get(self, key: dict):
        """The stored result of the cell, or None when it has not finished yet."""
        record = self.get_record(key)
        return None if record is None else record["result"]

    def get_record(self, key: dict):
        """{"key", "result", "provenance"} of a finished cell, or None; CorruptFileError when
        the file is not what put() writes (a hand edit is checked like a damaged file)."""
        path = self.path(key)
        if not path.exists():
            return None
        record = read_json(path)
        if not isinstance(record, dict) or record.get("key") != key or "result" not in record:
            raise CorruptFileError(f"{path} is corrupt: it does not hold the result of the cell "
                                   "it is named after; delete it or start over with --fresh")
        problem = result_problem(record["result"])
        if problem:
            raise CorruptFileError(f"{path} is corrupt: {problem}; delete it (the cell is "
                                   "recomputed) or start over with --fresh")
        provenance = record.get("provenance")
        return {**record, "provenance": provenance if isinstance(provenance, dict) else {}}

    def put(self, key: dict, result: dict, provenance: dict | None = None) -> Path:
        """Store a finished cell's R with what it was computed from (model, windows), so a
        run that reuses every cell still reports them."""
        path = self.path(key)
        write_json_atomic(path, {"key": key, "result": result, "provenance": provenance or {}})
        return path

    def __len__(self) -> int:
        return len(list(self.folder.glob("*.json"))) if self.folder.is_dir() else 0

    def clear(self) -> int:
        """Remove every stored cell (for --fresh); returns how many there were."""
        if not self.folder.is_dir():
            return 0
        removed = 0
        for path in self.folder.glob("*.json"):
            path.unlink()
            removed += 1
        return removed


class CellClaim:
    """An exclusive claim on one cell (see CellStore.try_claim); a context manager."""

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd

    @classmethod
    def acquire(cls, path: Path, blocking: bool):
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                return None
            except BaseException:
                os.close(fd)
                raise
            # The holder before us may have removed the file between our open and our lock:
            # then we hold a lock on a name that no longer exists; start again.
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
                return cls(path, fd)
            os.close(fd)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink()  # while locked: nobody else can hold a lock on this file now
        except FileNotFoundError:
            pass
        os.close(self.fd)  # drops the lock
        self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


# ---------------------------------------------------------------------------------------------
# The results record: DATASET -> METHOD -> sweep -> point -> R, plus the config record.



def _is_count(value) -> bool:
    return non_negative_int(value) is None


# The metrics of R, each with the check its value passes in a finished cell (a failed one has
# them all null, and is never stored).
METRIC_CHECKS = {"perplexity": is_number, "cross_entropy": is_number,
                 "bits_per_token": is_number, "bits_per_byte": is_number,
                 "num_tokens": _is_count, "num_samples": _is_count,
                 "ppl_ci95": lambda v: (isinstance(v, list) and len(v) == 2
                                        and all(map(is_number, v))),
                 "density": is_number}
METRIC_FIELDS = tuple(METRIC_CHECKS)
# A task cell's R (kind "task", docs/tasks.md) is checked by its own metrics.
TASK_METRIC_CHECKS = {"accuracy": is_number, "samples": _is_count,
                      "accuracy_ci95": METRIC_CHECKS["ppl_ci95"], "density": is_number}


def result_problem(result) -> str | None:
    """What is wrong with a finished cell's R (missing field, wrong type), or None."""
    if not isinstance(result, dict):
        return f"its result is {type(result).__name__}, not a mapping"
    checks = TASK_METRIC_CHECKS if result.get("kind") == "task" else METRIC_CHECKS
    missing = [name for name in checks if name not in result]
    if missing:
        return f"its result lacks {', '.join(missing)}"
    for name, check in checks.items():
        if not check(result[name]):
            return f"its result has {name} = {result[name]!r}, not a finite number of the right type"
    if result.get("error"):
        return f"its result is a failure ({result['error']})"
    if result.get("kind") == "task":  # paired over its samples, not windows (per_sample)
        return None
    return windows_problem(result)


def windows_problem(result: dict) -> str | None:
    """What is wrong with R["windows"] (one NLL sum, token and byte count per window), or
    None."""
    windows = result.get("windows")
    if not isinstance(windows, dict) or set(windows) != {"nll_sum", "tokens", "bytes"}:
        return "its result lacks the per-window sums (windows: nll_sum, tokens, bytes)"
    n = result["num_samples"]
    for name, values in windows.items():
        check = is_number if name == "nll_sum" else _is_count
        if not isinstance(values, list) or len(values) != n or not all(map(check, values)):
            return f"its windows.{name} is not {n} finite numbers (one per window)"
    return None


def failed_result(error: str) -> dict:
    """R of a cell that failed: null metrics and the error (never stored, so a rerun retries)."""
    return {**{name: None for name in METRIC_FIELDS}, "error": error}


def delta_vs_dense(perplexity, dense_perplexity):
    """The relative change of a perplexity against dense's (0.25 = +25%), None when unknown."""
    if perplexity is None or not dense_perplexity:
        return None
    return perplexity / dense_perplexity - 1


def scored_alike(result: dict, other: dict) -> bool:
    """Whether two cells' perplexities cover the same predictions: a task cell under a protocol
    that compresses its context once scores its prompt from the context's end on
    (per_sample window_first), its dense cell from the first token, and the two are then not
    comparable. Perplexity cells score their windows alike by construction."""
    def firsts(r):
        return [x.get("window_first", 0) for x in (r or {}).get("per_sample", [])]
    return firsts(result) == firsts(other)


def assemble(cells: list, outcomes: dict, config_record: dict, seeds: int = 1) -> dict:
    """The seed-compatible results dict from the planned cells (eval.runner.Cell) and the
    outcome R of each computation (RunSpec -> R); cells without an outcome are left out. A
    randomised method's cell combines its seeds' outcomes (over_seeds) once all are in."""
    results = {}
    for cell in cells:
        seeded = [outcomes.get(spec) for spec in cell.spec.with_seeds(seeds)]
        if any(outcome is None for outcome in seeded):
            continue
        outcome = seeded[0] if len(seeded) == 1 else over_seeds(
            seeded, [config_record.get("seed", 0) + spec.seed_offset
                     for spec in cell.spec.with_seeds(seeds)])
        dense = outcomes.get(cell.spec.dense())
        dense_ppl = None if dense is None else dense.get("perplexity")
        record = dict(outcome)
        record.update(method=cell.method, sparsity=cell.sparsity,
                      context_length=cell.spec.context_length, method_run=cell.spec.method,
                      sparsity_run=cell.spec.sparsity, dense_perplexity=dense_ppl,
                      delta_vs_dense=delta_vs_dense(record.get("perplexity"), dense_ppl)
                      if scored_alike(outcome, dense) else None)
        if cell.spec.method != "dense":  # its paired interval and p (docs/statistics.md)
            record.update(versus_dense(outcome, dense, seed=config_record.get("seed", 0)))
        (results.setdefault(cell.dataset, {}).setdefault(cell.method, {})
         .setdefault(cell.sweep, {}))[cell.point] = record
    return {"config": config_record, "results": results}


def write_results(paths, results: dict) -> None:
    """The same results to each path (NAME.json and NAME_latest.json), atomically."""
    for path in paths:
        write_json_atomic(path, results)
