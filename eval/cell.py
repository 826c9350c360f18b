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

from . import env, key_tokens, logits
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


def continuation_of(config: ExperimentConfig, context_length: int):
    """T, the tokens at the end of each perplexity window that a cell scores as the window's
    continuation (the rest being its context: docs/protocols.md, the split), or None when it
    scores the whole window: the config's `continuation`, else the protocol's default split.
    Dense cells score the same tokens as the run's methods."""
    if config.continuation is not None:
        return config.continuation
    context = cabattn.get_protocol(config.protocol).default_context(context_length)
    return None if context is None else context_length - context


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
           "method": spec.method, "sparsity": spec.sparsity, "key_tokens": config.key_tokens,
           "continuation": continuation_of(config, spec.context_length)}
    if spec.method != "dense":
        settings = protocol_settings(config, spec)
        key.update(protocol=settings.pop("protocol"), block_size=settings.pop("block_size"),
                   params=method_params(config, spec.method), **settings)
    return key


# -- computing one cell ---------------------------------------------------------------------

def attention(config: ExperimentConfig, model, spec: RunSpec):
    """The attention a cell runs under: a context manager yielding its stats, with the
    protocols' `generate` (cabattn.protocol): the model's own for dense, else the method
    under the configured protocol (which shares dense prefills through the run's store when
    it can: prefill_store)."""
    if spec.method == "dense":
        return cabattn.model_attention(model)
    settings = protocol_settings(config, spec)
    protocol = cabattn.get_protocol(settings.pop("protocol"))
    if protocol.one_shot:
        settings["prefill_store"] = prefill_store(config, spec)
    return protocol(model, spec.method, spec.sparsity, seed=config.seed + spec.seed_offset,
                    **settings, **config.method_params.get(spec.method, {}))


# The dense prefills of the group of cells being computed ((dataset, L): the runner and every
# executor compute a group's cells together), shared by its methods and sparsities.
_STORE = {"group": None, "store": None}
# At most this share of the memory free when a group starts holds its shared prefills.
STORE_SHARE = 0.4


def prefill_store(config: ExperimentConfig, spec) -> cabattn.PrefillStore:
    """The store of the dense prefills of spec's (dataset, L) group (docs/protocols.md,
    sharing the dense prefill); a new group starts an empty one."""
    group = (config.name, spec.dataset, spec.context_length)
    if _STORE["group"] != group:
        _STORE["store"] = None  # the last group's prefills go before the memory is measured
        methods = [get_method(m, **config.method_params.get(m, {})) for m in config.methods
                   if m != "dense"]
        budget = int(env.free_memory_bytes(env.resolve_device(config.model.device))
                     * STORE_SHARE)
        _STORE.update(group=group, store=cabattn.PrefillStore.for_methods(methods, budget))
    return _STORE["store"]


def compute_cell(config: ExperimentConfig, loaded, windows, spec: RunSpec,
                 progress: bool = False) -> dict:
    """R of one cell: the teacher-forced NLL of every window (of its continuation, when the
    cell scores one: continuation_of) under the cell's attention, its metrics, the
    protocol's record and the cost. Writes nothing; raises on failure."""
    device = env.resolve_device(config.model.device)
    model = loaded.model
    torch.manual_seed(config.seed)
    env.reset_peak_memory(device)
    n, L = windows.input_ids.shape
    scored = continuation_of(config, L)
    context = None if scored is None else L - scored
    first = 0 if context is None else context - 1  # the first prediction scored
    nll_sums, token_counts = [], []
    # The windows' key tokens under dense attention, once per (dataset, L) (docs/metrics.md).
    keys = (key_tokens.find(model, windows.input_ids, key_tokens.key_context(L), device,
                            bos_token_id=windows.bos_token_id)
            if config.key_tokens else None)
    if keys is not None and first:
        keys = keys.from_prediction(first)
    key_nll_sum = 0.0
    split = {} if context is None else {"context_length": context}
    defer = logits.can_defer(model)
    start = time.perf_counter()
    with attention(config, model, spec) as stats, torch.inference_mode():
        for offset in tqdm(range(0, n, config.batch_size), desc=spec.label, unit="batch",
                           disable=not progress, leave=False, dynamic_ncols=True):
            batch = windows.input_ids[offset:offset + config.batch_size].to(device)
            nll = logits.predictions(model, batch, first, defer, **split).nll
            for row in range(batch.shape[0]):
                total = float(nll[row].sum())
                if not math.isfinite(total):
                    raise NonFiniteLossError(f"non-finite loss ({total}) in window "
                                             f"{offset + row} of {n}")
                nll_sums.append(total)
                token_counts.append(L - 1 - first)
                if keys is not None:
                    mask = keys.mask[offset + row, first:].to(device)
                    key_nll_sum += float(nll[row][mask].sum())
    env.synchronize(device)
    wall = time.perf_counter() - start
    memory, memory_kind = env.peak_memory_mb(device)
    result = dict(summarize(nll_sums, token_counts,
                            list(windows.scored_bytes(first + 1)[:n]), seed=config.seed))
    result.update(stats.record())
    if keys is not None:
        result.update(keys.record(key_nll_sum))
    result.update(scored_tokens="continuation" if scored else "window", continuation=scored,
                  batch_size=config.batch_size, wall_seconds=wall,
                  tokens_per_second=n * L / wall, peak_memory_mb=memory,
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
    set up kernels and threads): the rate a run's size estimate is made from. Scored as a cell
    scores it (eval.logits.predictions), so its memory is a cell's: a 16K window of a 262k
    vocabulary would otherwise hold 17 GB of logits just to be timed."""
    ids = input_ids.to(device)
    defer = logits.can_defer(loaded.model)
    with torch.inference_mode():
        logits.predictions(loaded.model, ids[:, :16], defer=defer)
        start = time.perf_counter()
        logits.predictions(loaded.model, ids, defer=defer)
        env.synchronize(device)
    return time.perf_counter() - start
