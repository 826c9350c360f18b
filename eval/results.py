"""Strict JSON files written atomically, and the per-cell store that makes runs resumable.

A file is never left half-written: it is written to a temporary file in the same folder,
fsync'd, then os.replace'd over the target. NaN and infinity are refused on write and on read
(the original code averaged NaN results away; here a failed cell is `null` plus an error).
"""
import hashlib
import json
import math
import os
from pathlib import Path

from .cache import atomic_path


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

    def get(self, key: dict):
        """The stored result of the cell, or None when it has not finished yet."""
        path = self.path(key)
        if not path.exists():
            return None
        record = read_json(path)
        if not isinstance(record, dict) or record.get("key") != key or "result" not in record:
            raise CorruptFileError(f"{path} is corrupt: it does not hold the result of the cell "
                                   "it is named after; delete it or start over with --fresh")
        return record["result"]

    def put(self, key: dict, result: dict) -> Path:
        path = self.path(key)
        write_json_atomic(path, {"key": key, "result": result})
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


# ---------------------------------------------------------------------------------------------
# The results record: DATASET -> METHOD -> sweep -> point -> R, plus the config record.

METRIC_FIELDS = ("perplexity", "cross_entropy", "bits_per_token", "bits_per_byte", "num_tokens",
                 "num_samples", "ppl_ci95", "density")


def failed_result(error: str) -> dict:
    """R of a cell that failed: null metrics and the error (never stored, so a rerun retries)."""
    return {**{name: None for name in METRIC_FIELDS}, "error": error}


def delta_vs_dense(perplexity, dense_perplexity):
    """The relative change of a perplexity against dense's (0.25 = +25%), None when unknown."""
    if perplexity is None or not dense_perplexity:
        return None
    return perplexity / dense_perplexity - 1


def assemble(cells: list, outcomes: dict, config_record: dict) -> dict:
    """The seed-compatible results dict from the planned cells (eval.run.Cell) and the
    outcome R of each computation (RunSpec -> R); cells without an outcome are left out."""
    results = {}
    for cell in cells:
        outcome = outcomes.get(cell.spec)
        if outcome is None:
            continue
        dense = outcomes.get(cell.spec.dense())
        dense_ppl = None if dense is None else dense.get("perplexity")
        record = dict(outcome)
        record.update(method=cell.method, sparsity=cell.sparsity,
                      context_length=cell.spec.context_length, method_run=cell.spec.method,
                      sparsity_run=cell.spec.sparsity, dense_perplexity=dense_ppl,
                      delta_vs_dense=delta_vs_dense(record.get("perplexity"), dense_ppl))
        (results.setdefault(cell.dataset, {}).setdefault(cell.method, {})
         .setdefault(cell.sweep, {}))[cell.point] = record
    return {"config": config_record, "results": results}


def write_results(paths, results: dict) -> None:
    """The same results to each path (NAME.json and NAME_latest.json), atomically."""
    for path in paths:
        write_json_atomic(path, results)
