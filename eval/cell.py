"""One cell of the perplexity benchmark: what it runs as, its key, and its computation.

A cell is one (dataset, method, sparsity, context length). `RunSpec` says what is actually
computed for it (every method at s = 0 runs as dense); `cell_key` is everything that defines
its numbers (the cell store reuses a stored cell only on a match); `compute_cell` (config,
loaded model, windows, RunSpec -> R) computes it and writes nothing, so any executor
(eval.executors) can call it. The runner (eval.runner) plans, stores and writes.
"""
import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

import cabattn
from cabattn.methods import METHODS, get_method

from . import env, key_tokens
from .config import ExperimentConfig
from .metrics import NonFiniteLossError, summarize
from .results import CELL_FORMAT, failed_result, finite_or_none

__all__ = ["RunSpec", "attention", "cell_key", "compute_cell", "data_identity",
           "method_params", "now", "protocol_settings", "time_forward", "try_cell"]


def now() -> str:
    """The current UTC time, as the results record it."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class RunSpec:
    """What is actually computed for a cell: every method at s = 0 runs as dense."""
    dataset: str
    context_length: int
    method: str
    sparsity: float
    seed_offset: int = 0  # a randomised method's cell runs seed + 0 .. seed + seeds - 1

    @classmethod
    def for_cell(cls, dataset: str, context_length: int, method: str, sparsity: float):
        if method == "dense" or sparsity == 0.0:
            return cls(dataset, context_length, "dense", 0.0)
        return cls(dataset, context_length, method, float(sparsity))

    def dense(self) -> "RunSpec":
        """The dense computation of the same (dataset, context length)."""
        return RunSpec(self.dataset, self.context_length, "dense", 0.0)

    def with_seeds(self, seeds: int) -> list:
        """The computations of this cell: one per seed for a randomised method."""
        if self.method == "dense" or not METHODS[self.method].randomised:
            return [self]
        return [RunSpec(self.dataset, self.context_length, self.method, self.sparsity, offset)
                for offset in range(seeds)]

    @property
    def label(self) -> str:
        if self.method == "dense":
            return f"{self.dataset} dense L={self.context_length}"
        return (f"{self.dataset} {self.method} s={self.sparsity:g} L={self.context_length}"
                + (f" seed+{self.seed_offset}" if self.seed_offset else ""))


def protocol_settings(config: ExperimentConfig, spec: RunSpec) -> dict:
    """What a sparse cell runs with besides the method: the protocol, its block size, k_min
    and the protocol's own options (as the protocol records them)."""
    protocol = cabattn.get_protocol(config.protocol)
    return {"protocol": config.protocol,
            "block_size": cabattn.resolve_block_size(config.block_size, spec.context_length),
            "k_min": config.k_min,
            **{option.name: getattr(config, option.name) for option in protocol.OPTIONS}}


def method_params(config: ExperimentConfig, method: str) -> dict:
    """The method's full parameter set (defaults filled in), as the registry resolves it."""
    return dict(get_method(method, **config.method_params.get(method, {})).config)


def data_identity(config: ExperimentConfig):
    """What identifies a --data-file's content in a cell key: path, size, modification."""
    if config.data_file is None:
        return None
    stat = Path(config.data_file).stat()
    return {"path": str(Path(config.data_file).resolve()), "bytes": stat.st_size,
            "mtime_ns": stat.st_mtime_ns}


def cell_key(config: ExperimentConfig, spec: RunSpec) -> dict:
    """Everything that defines a cell's numbers; a stored cell is reused only on a match."""
    device = env.resolve_device(config.model.device)
    key = {"cell_format": CELL_FORMAT, "dataset": spec.dataset,
           "data_file": data_identity(config), "text_field": config.text_field,
           "model": config.model.name,
           "dtype": env.resolve_dtype(config.model.torch_dtype, device),
           "device": device.split(":")[0], "context_length": spec.context_length,
           "max_windows": config.max_windows, "seed": config.seed + spec.seed_offset,
           "method": spec.method, "sparsity": spec.sparsity, "key_tokens": config.key_tokens}
    if spec.method != "dense":
        settings = protocol_settings(config, spec)
        key.update(protocol=settings.pop("protocol"), block_size=settings.pop("block_size"),
                   params=method_params(config, spec.method), **settings)
    return key


# -- computing one cell ---------------------------------------------------------------------

def attention(config: ExperimentConfig, model, spec: RunSpec):
    """The attention a cell runs under (a context yielding its stats): the model's own for
    dense, else the method under the configured protocol."""
    if spec.method == "dense":
        return cabattn.model_attention(model)
    return cabattn.apply(model, method=spec.method, sparsity=spec.sparsity,
                         seed=config.seed + spec.seed_offset,
                         **protocol_settings(config, spec),
                         **config.method_params.get(spec.method, {}))


def compute_cell(config: ExperimentConfig, loaded, windows, spec: RunSpec,
                 progress: bool = False) -> dict:
    """R of one cell: the teacher-forced NLL of every window under the cell's attention, its
    metrics, the protocol's record and the cost. Writes nothing; raises on failure."""
    device = env.resolve_device(config.model.device)
    model = loaded.model
    torch.manual_seed(config.seed)
    env.reset_peak_memory(device)
    n, L = windows.input_ids.shape
    nll_sums, token_counts = [], []
    # The windows' key tokens under dense attention, once per (dataset, L) (docs/metrics.md).
    keys = (key_tokens.find(model, windows.input_ids, key_tokens.key_context(L), device)
            if config.key_tokens else None)
    key_nll_sum = 0.0
    start = time.perf_counter()
    with attention(config, model, spec) as stats, torch.inference_mode():
        for first in tqdm(range(0, n, config.batch_size), desc=spec.label, unit="batch",
                          disable=not progress, leave=False, dynamic_ncols=True):
            batch = windows.input_ids[first:first + config.batch_size].to(device)
            logits = model(batch).logits
            for row, ids in enumerate(batch):
                # The model's own loss of one window (the mean NLL of its L-1 predictions),
                # so every batch size scores a window through the same function.
                loss = float(model.loss_function(logits=logits[row:row + 1], labels=ids[None],
                                                 vocab_size=model.config.vocab_size))
                if not math.isfinite(loss):
                    raise NonFiniteLossError(f"non-finite loss ({loss}) in window "
                                             f"{first + row} of {n}")
                nll_sums.append(loss * (L - 1))
                token_counts.append(L - 1)
                if keys is not None:
                    nll = key_tokens.token_nll(logits[row:row + 1], ids[None])[0]
                    key_nll_sum += float(nll[keys.mask[first + row].to(device)].sum())
    env.synchronize(device)
    wall = time.perf_counter() - start
    memory, memory_kind = env.peak_memory_mb(device)
    result = dict(summarize(nll_sums, token_counts, list(windows.num_bytes[:n]),
                            seed=config.seed))
    result.update(stats.record())
    if keys is not None:
        result.update(keys.record(key_nll_sum))
    result.update(batch_size=config.batch_size, wall_seconds=wall,
                  tokens_per_second=sum(token_counts) / wall, peak_memory_mb=memory,
                  peak_memory_kind=memory_kind, finished=now())
    return {name: finite_or_none(v) if isinstance(v, float) else v
            for name, v in result.items()}


def try_cell(config: ExperimentConfig, loaded, windows, spec: RunSpec,
             progress: bool = False, compute=None) -> dict:
    """compute(...) (default compute_cell, looked up at the call; or another kind of cell's:
    eval.cells), or a failed R (null metrics + error) when the cell fails."""
    try:
        return (compute or compute_cell)(config, loaded, windows, spec, progress=progress)
    except (RuntimeError, ValueError) as err:
        return failed_result(f"{type(err).__name__}: {err}")


def time_forward(loaded, input_ids, device: str) -> float:
    """Seconds of one dense forward of a window [1, L] after a short warm-up (the first calls
    set up kernels and threads): the rate a run's size estimate is made from."""
    ids = input_ids.to(device)
    with torch.inference_mode():
        loaded.model(ids[:, :16])
        start = time.perf_counter()
        loaded.model(ids)
        env.synchronize(device)
    return time.perf_counter() - start
