"""python -m eval.run: the perplexity benchmark (METHODS.md sections 4 and 6).

For every dataset and method it runs a context-length sweep at a fixed sparsity and a sparsity
sweep at a fixed context length. A cell is one (dataset, method, sparsity, context length); its
windows are tokenised once per (dataset, context length) and shared by every method. Dense is
computed once per (dataset, context length) and shared by every method at s = 0 (which is dense
by definition); the result records what actually ran (`method_run`, `sparsity_run`).

The runner reads top to bottom: plan the cells (`plan_cells`, `plan_runs`), compute one
(`compute_cell`: config, loaded model, windows, RunSpec -> R, writing nothing, so any executor
can call it), store it (the CellStore, one atomically written JSON file per cell, is the only
writer of cell results; an interrupted run resumes from it; a cell is computed under its claim,
so two runs into one folder never compute it twice), then rewrite the results JSON, the
figures and the table. The command line lives in eval.cli.
"""
import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from . import env
from .config import (ExperimentConfig, ModelConfig, check_output_location, create_quick_test,
                     validate)
from .metrics import NonFiniteLossError
from .results import (CellStore, assemble, delta_vs_dense, failed_result, finite_or_none,
                      write_results)

__all__ = ["Cell", "ExperimentConfig", "ModelConfig", "PerplexityBenchmarkRunner", "RunSpec",
           "cell_key", "compute_cell", "create_quick_test", "plan_cells", "plan_runs",
           "run_benchmark", "main"]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class RunDeclined(Exception):
    """The user did not confirm a long run; nothing was computed."""


# -- planning -------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunSpec:
    """What is actually computed for a cell: every method at s = 0 runs as dense."""
    dataset: str
    context_length: int
    method: str
    sparsity: float

    @classmethod
    def for_cell(cls, dataset: str, context_length: int, method: str, sparsity: float):
        if method == "dense" or sparsity == 0.0:
            return cls(dataset, context_length, "dense", 0.0)
        return cls(dataset, context_length, method, float(sparsity))

    def dense(self) -> "RunSpec":
        """The dense computation of the same (dataset, context length)."""
        return RunSpec(self.dataset, self.context_length, "dense", 0.0)

    @property
    def label(self) -> str:
        if self.method == "dense":
            return f"{self.dataset} dense L={self.context_length}"
        return f"{self.dataset} {self.method} s={self.sparsity:g} L={self.context_length}"


@dataclass(frozen=True)
class Cell:
    """One cell of the results file: results[dataset][method][sweep][point], computed as
    `spec`; `sparsity` is the cell's nominal sparsity (0 for dense)."""
    dataset: str
    method: str
    sweep: str
    point: str
    sparsity: float
    spec: RunSpec


def plan_cells(config: ExperimentConfig) -> list:
    """Every cell of the results, in file order."""
    cells = []
    for dataset in config.datasets:
        for method in config.methods:
            if config.context_length_sweep.enabled:
                s = 0.0 if method == "dense" else float(config.context_length_sweep.fixed_sparsity)
                for L in config.context_length_sweep.context_lengths:
                    cells.append(Cell(dataset, method, "context_length_sweep", str(int(L)), s,
                                      RunSpec.for_cell(dataset, int(L), method, s)))
            if config.sparsity_sweep.enabled:
                L = int(config.sparsity_sweep.fixed_context_length)
                # Dense ignores s: one point, as in the original results files.
                levels = [0.0] if method == "dense" else config.sparsity_sweep.sparsity_levels
                for s in levels:
                    cells.append(Cell(dataset, method, "sparsity_sweep", str(float(s)), float(s),
                                      RunSpec.for_cell(dataset, L, method, float(s))))
    return cells


def plan_runs(config: ExperimentConfig) -> list:
    """Unique computations, grouped by (dataset, L) with dense first: windows are tokenised
    once per group and every sparse cell can report its change against dense at once."""
    specs = {cell.spec for cell in plan_cells(config)}
    specs |= {spec.dense() for spec in specs}
    dataset_order = {name: i for i, name in enumerate(config.datasets)}
    method_order = {name: i for i, name in enumerate(["dense", *config.methods])}
    return sorted(specs, key=lambda s: (dataset_order[s.dataset], s.context_length,
                                        method_order[s.method], s.sparsity))


def protocol_settings(config: ExperimentConfig, spec: RunSpec) -> dict:
    """What a sparse cell runs with besides the method: the protocol, its block size, k_min
    and the protocol's own options (as the protocol records them)."""
    import cabattn
    protocol = cabattn.get_protocol(config.protocol)
    return {"protocol": config.protocol,
            "block_size": cabattn.resolve_block_size(config.block_size, spec.context_length),
            "k_min": config.k_min,
            **{name: getattr(config, name) for name in protocol.OPTIONS}}


def method_params(config: ExperimentConfig, method: str) -> dict:
    """The method's full parameter set (defaults filled in), as the registry resolves it."""
    from cabattn.methods import get_method
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
    key = {"dataset": spec.dataset, "data_file": data_identity(config),
           "text_field": config.text_field, "model": config.model.name,
           "dtype": env.resolve_dtype(config.model.torch_dtype, device),
           "device": device.split(":")[0], "context_length": spec.context_length,
           "max_windows": config.max_windows, "seed": config.seed, "method": spec.method,
           "sparsity": spec.sparsity}
    if spec.method != "dense":
        settings = protocol_settings(config, spec)
        key.update(protocol=settings.pop("protocol"), block_size=settings.pop("block_size"),
                   params=method_params(config, spec.method), **settings)
    return key


# -- computing one cell ---------------------------------------------------------------------

def attention(config: ExperimentConfig, model, spec: RunSpec):
    """The attention a cell runs under (a context yielding its stats): the model's own for
    dense, else the method under the configured protocol."""
    import cabattn
    if spec.method == "dense":
        return cabattn.dense(model)
    return cabattn.apply(model, method=spec.method, sparsity=spec.sparsity, seed=config.seed,
                         **protocol_settings(config, spec),
                         **config.method_params.get(spec.method, {}))


def compute_cell(config: ExperimentConfig, loaded, windows, spec: RunSpec,
                 progress: bool = False) -> dict:
    """R of one cell: the teacher-forced NLL of every window under the cell's attention, its
    metrics, the protocol's record and the cost. Writes nothing; raises on failure."""
    import torch
    from tqdm.auto import tqdm

    from .metrics import summarize

    device = env.resolve_device(config.model.device)
    model = loaded.model
    torch.manual_seed(config.seed)
    env.reset_peak_memory(device)
    n, L = windows.input_ids.shape
    nll_sums, token_counts = [], []
    start = time.perf_counter()
    with attention(config, model, spec) as stats, torch.inference_mode():
        for i in tqdm(range(n), desc=spec.label, unit="window", disable=not progress,
                      leave=False, dynamic_ncols=True):
            ids = windows.input_ids[i:i + 1].to(device)
            loss = float(model(ids, labels=ids).loss)
            if not math.isfinite(loss):
                raise NonFiniteLossError(f"non-finite loss ({loss}) in window {i} of {n}")
            # The model's loss is the mean NLL over the L-1 predictions of the window.
            nll_sums.append(loss * (L - 1))
            token_counts.append(L - 1)
    env.synchronize(device)
    wall = time.perf_counter() - start
    memory, memory_kind = env.peak_memory_mb(device)
    result = dict(summarize(nll_sums, token_counts, list(windows.num_bytes[:n]),
                            seed=config.seed))
    result.update(stats.record())
    result.update(wall_seconds=wall, tokens_per_second=sum(token_counts) / wall,
                  peak_memory_mb=memory, peak_memory_kind=memory_kind, finished=_now())
    return {name: finite_or_none(v) if isinstance(v, float) else v
            for name, v in result.items()}


def time_forward(loaded, input_ids, device: str) -> float:
    """Seconds of one dense forward of a window [1, L] after a short warm-up (the first calls
    set up kernels and threads): the rate a run's size estimate is made from."""
    import torch
    ids = input_ids.to(device)
    with torch.inference_mode():
        loaded.model(ids[:, :16])
        start = time.perf_counter()
        loaded.model(ids)
        env.synchronize(device)
    return time.perf_counter() - start


# -- the runner: plan, compute, store -------------------------------------------------------

class PerplexityBenchmarkRunner:
    """Runs one ExperimentConfig: plans the cells, reuses stored ones, computes the rest, writes
    results (JSON, figures, table). `run()` returns the results dict."""

    def __init__(self, config: ExperimentConfig, resume: bool = True, progress: bool = True,
                 notes: tuple = (), command: list | None = None, make_report: bool = True,
                 confirm=lambda seconds: True):
        self.config = config
        self.resume = resume
        self.progress = progress
        self.notes = list(notes)
        self.command = command
        self.make_report = make_report
        # Asked with the estimated seconds of the cells to compute (see estimate()) before
        # the first is computed; False ends the run (RunDeclined).
        self.confirm = confirm
        self.output_dir = Path(config.output_dir)
        self.results_path = self.output_dir / f"{config.name}.json"
        self.latest_path = self.output_dir / f"{config.name}_latest.json"
        self.store = CellStore(self.output_dir / f"{config.name}.cells")
        self.device = env.resolve_device(config.model.device)
        self.dtype = env.resolve_dtype(config.model.torch_dtype, self.device)
        self.loaded = None
        self.windows = {}  # (dataset, L) -> eval.data.Windows, tokenised once
        # What the results were computed from, kept in the cell store with every cell so that
        # a run that reuses cells reports them too: the model, and per "dataset@L" the windows.
        self.model_info = None
        self.window_info = {}
        self.outcomes = {}  # RunSpec -> R (computed or reused)
        self.computed, self.reused = [], []
        self.started = _now()

    def run(self) -> dict:
        validate(self.config)
        check_output_location(self.config)
        if not self.resume:
            removed = self.store.clear()
            if removed:
                self.say(f"--fresh: removed {removed} stored cells from {self.store.folder}")
        specs = plan_runs(self.config)
        keys = {spec: cell_key(self.config, spec) for spec in specs}
        todo = [spec for spec in specs if self.store.get(keys[spec]) is None]
        stored = len(specs) - len(todo)
        self.say(f"{len(specs)} computations for {len(plan_cells(self.config))} result cells; "
                 f"{stored} already finished in {self.store.folder}"
                 + (" (reused; --fresh recomputes them)" if stored else ""))
        try:
            if todo and not self.confirm(self.estimate(todo)):
                raise RunDeclined("not confirmed")
            # A cell another run is computing right now (it holds the cell's claim) is left
            # for last, then waited for: it is reused once that run stores it.
            busy = []
            for spec in specs:
                outcome = self.outcome(spec, keys[spec], wait=False)
                if outcome is None:
                    busy.append(spec)
                    holder = self.store.claim_holder(keys[spec]) or "another process"
                    self.say(f"{spec.label}: being computed by another run ({holder}); "
                             "waiting for it after the other cells")
                    continue
                self.outcomes[spec] = outcome
                self.write("running")
            for spec in busy:
                self.outcomes[spec] = self.outcome(spec, keys[spec], wait=True)
                self.write("running")
        except KeyboardInterrupt:
            # A cell may have reached the store just before the interrupt arrived.
            for spec in specs:
                stored = None if spec in self.outcomes else self.store.get(keys[spec])
                if stored is not None:
                    self.outcomes[spec] = stored
            self.write("interrupted")
            self.say(f"interrupted: {len(self.computed) + len(self.reused)} finished cells are "
                     f"kept in {self.store.folder}; rerun the same command to resume")
            raise
        failed = self.failed_cells()
        results = self.write("failed cells" if failed else "complete")
        self.say(f"results: {self.results_path} (and {self.latest_path.name}); "
                 f"{len(self.computed)} cells computed, {len(self.reused)} reused"
                 + (f", {len(failed)} FAILED" if failed else ""))
        if self.make_report:
            from .report import make_report
            for path in make_report(self.results_path):
                self.say(f"wrote {path}")
        return results

    def outcome(self, spec: RunSpec, key: dict, wait: bool = True):
        """R of a computation: from the store when it finished before, else computed now
        under the cell's claim and stored; None when another process holds the claim and
        wait is False. A model that cannot load fails the run (raised here, outside the cell)."""
        stored = self.store.get_record(key)
        if stored is None:
            claim = self.store.claim(key) if wait else self.store.try_claim(key)
            if claim is None:
                return None
            with claim:
                # The claim's last holder may have stored the cell since we looked.
                stored = self.store.get_record(key)
                if stored is None:
                    return self.compute(spec, key)
        self.model_info = self.model_info or stored["provenance"].get("model_info")
        windows = stored["provenance"].get("windows")
        if windows:
            self.window_info.setdefault(f"{spec.dataset}@{spec.context_length}", windows)
        self.reused.append(spec)
        return stored["result"]

    def compute(self, spec: RunSpec, key: dict) -> dict:
        loaded = self.load()
        try:
            result = compute_cell(self.config, loaded, self.windows_for(spec), spec,
                                  progress=self.progress)
        except (RuntimeError, ValueError) as err:
            # A failed cell is reported (null metrics + error), never stored: a rerun retries it.
            result = failed_result(f"{type(err).__name__}: {err}")
            self.say(f"FAILED {spec.label}: {result['error']}")
            return result
        self.store.put(key, result, provenance={
            "model_info": self.model_info,
            "windows": self.window_info[f"{spec.dataset}@{spec.context_length}"]})
        self.computed.append(spec)
        self.say(self.summary_line(spec, result))
        return result

    def estimate(self, todo: list) -> float:
        """Say the size of the computations still to do (windows per cell, forward tokens)
        and their estimated seconds, from one timed dense forward per context length."""
        windows = {(s.dataset, s.context_length): int(self.windows_for(s).input_ids.shape[0])
                   for s in todo}
        seconds_per_window = {}
        for L in sorted({L for _, L in windows}):
            spec = next(s for s in todo if s.context_length == L)
            seconds_per_window[L] = time_forward(self.load(), self.windows_for(spec).input_ids[:1],
                                                 self.device)
        tokens = sum(windows[s.dataset, s.context_length] * s.context_length for s in todo)
        seconds = sum(windows[s.dataset, s.context_length] * seconds_per_window[s.context_length]
                      for s in todo)
        per_cell = ", ".join(f"{d}@{L}: {n:,}" for (d, L), n in windows.items())
        self.say(f"to compute: {len(todo)} cells; windows per cell {per_cell}; "
                 f"{tokens:,} forward tokens in all; about {_duration(seconds)} at the dense "
                 f"rate measured now ({tokens / max(seconds, 1e-9):,.0f} tokens/s; sparse "
                 "methods may be slower)")
        return seconds

    def load(self):
        """The model, loaded once for the whole run (a load failure ends the run)."""
        if self.loaded is None:
            from . import models
            self.say(f"loading model {self.config.model.name} ({self.dtype}, {self.device}) ...")
            self.loaded = models.load_model(self.config.model.name, dtype=self.dtype,
                                            device=self.device,
                                            trust_remote_code=self.config.model.trust_remote_code,
                                            cache_dir=self.config.model.cache_dir)
            for L in self.config.context_lengths():
                models.check_context(self.loaded, L)
            self.model_info = {"name": self.loaded.name, "source": str(self.loaded.source),
                               "num_parameters": self.loaded.num_parameters,
                               "max_positions": self.loaded.max_positions}
            self.say(f"model: {self.loaded.name} from {self.loaded.source}, "
                     f"{self.loaded.num_parameters / 1e6:.1f}M parameters, "
                     f"{self.loaded.max_positions} positions")
        return self.loaded

    def windows_for(self, spec: RunSpec):
        key = (spec.dataset, spec.context_length)
        if key not in self.windows:
            from . import data
            # Only one context length's windows are needed at a time (specs are grouped).
            self.windows = {k: v for k, v in self.windows.items() if k[0] == spec.dataset}
            self.windows[key] = w = data.load_windows(
                spec.dataset, self.load().tokenizer, spec.context_length,
                max_windows=self.config.max_windows, data_file=self.config.data_file,
                text_field=self.config.text_field)
            self.window_info[f"{spec.dataset}@{spec.context_length}"] = {
                "num_windows": int(w.input_ids.shape[0]), "description": w.description,
                "num_documents": w.num_documents}
            self.say(f"{spec.dataset}: {w.input_ids.shape[0]} windows of {spec.context_length} "
                     f"tokens ({w.description})")
        return self.windows[key]

    # -- reporting --------------------------------------------------------------------------
    def failed_cells(self) -> list:
        return [spec for spec, r in self.outcomes.items() if r.get("error")]

    def summary_line(self, spec: RunSpec, result: dict) -> str:
        dense = self.outcomes.get(spec.dense(), {}).get("perplexity")
        delta = delta_vs_dense(result["perplexity"], dense)
        versus = (f" ({delta * 100:+.2f}% vs dense {dense:.3f})"
                  if spec.method != "dense" and delta is not None else "")
        return (f"{spec.label:<40} PPL {result['perplexity']:.3f}{versus}  "
                f"density {result['density']:.3f}  {result['tokens_per_second']:.0f} tok/s  "
                f"{result['wall_seconds']:.1f} s")

    def say(self, message: str) -> None:
        if self.progress:
            from tqdm.auto import tqdm
            tqdm.write(message)

    def config_record(self, status: str) -> dict:
        import cabattn
        record = self.config.to_dict()
        provenance = env.provenance(self.device)
        record.update(
            status=status, started=self.started, written=_now(), notes=self.notes,
            command=self.command, resolved_device=self.device, resolved_dtype=self.dtype,
            torch_threads=provenance["torch_threads"],
            block_sizes={str(L): cabattn.resolve_block_size(self.config.block_size, L)
                         for L in self.config.context_lengths()},
            cells_computed=len(self.computed), cells_reused=len(self.reused),
            versions=provenance["versions"], machine=provenance["machine"])
        record.update(model_info=self.model_info, windows=dict(self.window_info))
        return record

    def write(self, status: str) -> dict:
        results = assemble(plan_cells(self.config), self.outcomes, self.config_record(status))
        write_results((self.results_path, self.latest_path), results)
        return results


def run_benchmark(config: ExperimentConfig, resume: bool = True, progress: bool = True) -> dict:
    """Run one experiment (the original API); returns the results dict also written to disk."""
    return PerplexityBenchmarkRunner(config, resume=resume, progress=progress).run()


def main(argv=None) -> int:
    """`python -m eval.run` (see eval.cli)."""
    from .cli import main as cli_main
    return cli_main(argv)


if __name__ == "__main__":
    import sys
    sys.exit(main())
