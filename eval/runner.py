"""The perplexity benchmark's runner: plan, claim, dispatch, store, write (docs/running.md).

For every dataset and method it runs a context-length sweep at a fixed sparsity and a sparsity
sweep at a fixed context length. A cell is one (dataset, method, sparsity, context length); its
windows are tokenised once per (dataset, context length) and shared by every method. Dense is
computed once per (dataset, context length) and shared by every method at s = 0 (which is dense
by definition); the result records what actually ran (`method_run`, `sparsity_run`).

The runner reads top to bottom: plan the cells (`plan_cells`, `plan_runs`), have an executor
(eval.executors: this process, Ray actors) compute each one through eval.cell.compute_cell,
store it (the CellStore, one atomically written JSON file per cell, is the only writer of cell
results; an interrupted run resumes from it; a cell is computed under its claim, so two runs
into one folder never compute it twice), then rewrite the results JSON, the figures and the
table. The runner alone writes. The command line lives in eval.cli.
"""
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

import cabattn
from cabattn.grid import sparsity_for_budget

from . import data, env, executors
from .cell import RunSpec, now
from .cells import cell_key
from .config import ExperimentConfig, check_output_location, validate
from .compare import headline
from .html_report import write_report
from .report import load_results
from .results import CellStore, assemble, delta_vs_dense, write_results
from .statistics import versus_dense
from .tasks.cell import summary_line as task_summary_line
from .tasks.samples import TaskSpec, load_samples, task_names

__all__ = ["Cell", "PerplexityBenchmarkRunner", "RunDeclined", "plan_cells", "plan_runs",
           "run_benchmark"]


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
class Cell:
    """One cell of the results file: results[dataset][method][sweep][point], computed as
    `spec`; `sparsity` is the cell's nominal sparsity (0 for dense)."""
    dataset: str
    method: str
    sweep: str
    point: str
    sparsity: float
    spec: RunSpec


def plan_cells(config: ExperimentConfig, tasks: bool = False) -> list:
    """Every cell of the results, in file order; tasks=True: the task cells (docs/tasks.md),
    by the same sweeps with the tasks in the datasets' place."""
    cells = []
    Spec = TaskSpec if tasks else RunSpec
    for dataset in (task_names(config) if tasks else config.datasets):
        for method in config.methods:
            if config.context_length_sweep.enabled:
                s = 0.0 if method == "dense" else float(config.context_length_sweep.fixed_sparsity)
                for L in config.context_length_sweep.context_lengths:
                    cells.append(Cell(dataset, method, "context_length_sweep", str(int(L)), s,
                                      Spec.for_cell(dataset, int(L), method, s)))
            if config.sparsity_sweep.enabled:
                L = int(config.sparsity_sweep.fixed_context_length)
                # Dense ignores s: one point, as in the original results files.
                levels = [0.0] if method == "dense" else config.sparsity_sweep.sparsity_levels
                for s in levels:
                    cells.append(Cell(dataset, method, "sparsity_sweep", str(float(s)), float(s),
                                      Spec.for_cell(dataset, L, method, float(s))))
            # A fixed cache of K tokens at every context length, run as the sparsity that
            # gives K (so it is the same cell as that sparsity); R records K as budget_tokens.
            for K in ([] if method == "dense" else config.budget_tokens or []):
                for L in config.context_lengths():
                    s = sparsity_for_budget(K, L, config.k_min)
                    cells.append(Cell(dataset, method, "budget_sweep", f"{K}@{L}", s,
                                      Spec.for_cell(dataset, L, method, s)))
    return cells


def plan_runs(config: ExperimentConfig) -> list:
    """Unique computations, grouped by (dataset, L) with dense first: windows are tokenised
    once per group and every sparse cell can report its change against dense at once. The
    task cells come after the perplexity cells, grouped by (task, L) alike."""
    method_order = {name: i for i, name in enumerate(["dense", *config.methods])}
    runs = []
    for tasks in (False, True):
        specs = {seeded for cell in plan_cells(config, tasks)
                 for seeded in cell.spec.with_seeds(config.seeds)}
        specs |= {spec.dense() for spec in specs}
        order = {f"task:{name}" if tasks else name: i for i, name in enumerate(
            task_names(config) if tasks else config.datasets)}
        runs += sorted(specs, key=lambda s: (order[s.dataset], s.context_length,
                                             method_order[s.method], s.sparsity,
                                             s.seed_offset))
    return runs


# -- the runner: plan, compute, store -------------------------------------------------------

class PerplexityBenchmarkRunner:
    """Runs one ExperimentConfig: plans the cells, reuses stored ones, has an executor
    (eval.executors: serial or ray) compute the rest, stores each result as it arrives and
    writes the results (JSON, figures, table). `run()` returns the results dict.

    shard=(I, N) computes only shard I of N of the plan and writes no results file (the shards
    of a job array share one cell store); assemble=True computes nothing and writes the results
    from the store, naming the cells that are missing. validated=True: the caller has already
    run validate() and check_output_location() on this config (the command line does, for every
    config, before the first run starts), so run() does not repeat them."""

    def __init__(self, config: ExperimentConfig, resume: bool = True, progress: bool = True,
                 notes: tuple = (), command: list | None = None, make_report: bool = True,
                 executor: str = "serial", ray_address: str | None = None, threads: int = 1,
                 shard: tuple | None = None, assemble: bool = False,
                 confirm=lambda seconds: True, validated: bool = False):
        self.config, self.validated = config, validated
        self.resume = resume
        self.progress = progress
        self.notes = list(notes)
        self.command = command
        self.make_report = make_report
        self.shard, self.assemble = shard, assemble
        # Asked with the estimated seconds of the cells to compute (see estimate()) before
        # the first is computed; False ends the run (RunDeclined).
        self.confirm = confirm
        self.output_dir = Path(config.output_dir)
        self.results_path = self.output_dir / f"{config.name}.json"
        self.latest_path = self.output_dir / f"{config.name}_latest.json"
        self.store = CellStore(self.output_dir / f"{config.name}.cells")
        self.executor = executors.make_executor(executor, config, self.say, progress=progress,
                                                address=ray_address, threads=threads)
        self.windows = {}  # (dataset, L) -> eval.data.Windows, tokenised once
        # What the results were computed from, kept in the cell store with every cell so that
        # a run that reuses cells reports them too: the model, and per "dataset@L" the windows.
        self.model_info = None
        self.window_info = {}
        self.outcomes = {}  # RunSpec -> R (computed or reused)
        self.computed, self.reused, self.missing = [], [], []
        self.claims = {}  # RunSpec -> the CellClaim held while it is computed
        self.started = now()

    @property
    def device(self) -> str:
        return env.resolve_device(self.config.model.device)

    @property
    def dtype(self) -> str:
        return env.resolve_dtype(self.config.model.torch_dtype, self.device)

    def run(self) -> dict:
        if not self.validated:
            validate(self.config)
            check_output_location(self.config)
        if not self.resume:
            removed = self.store.clear()
            if removed:
                self.say(f"--fresh: removed {removed} stored cells from {self.store.folder}")
        if not self.assemble:
            self.executor.prepare()  # may fix the device, which the cell keys name
        specs = plan_runs(self.config)
        keys = {spec: cell_key(self.config, spec) for spec in specs}
        for spec in specs:
            record = self.store.get_record(keys[spec])
            if record is not None:
                self.reuse(spec, record)
        cells = len(plan_cells(self.config)) + len(plan_cells(self.config, tasks=True))
        self.say(f"{len(specs)} computations for {cells} result cells; "
                 f"{len(self.reused)} already finished in {self.store.folder}"
                 + (" (reused; --fresh recomputes them)" if self.reused else ""))
        mine = specs if self.shard is None else executors.shard(specs, *self.shard)
        todo = [spec for spec in mine if spec not in self.outcomes]
        if self.shard is not None:
            self.say(f"shard {self.shard[0]}/{self.shard[1]}: {len(mine)} computations, "
                     f"{len(todo)} to compute")
        if self.assemble:
            return self.finish_assembly(todo)
        self.to_do, self.done = len(todo), 0  # for the [done/total] of each cell's line
        try:
            if todo and not self.confirm(self.estimate(todo)):
                raise RunDeclined("not confirmed")
            # A cell another run is computing right now (it holds the cell's claim) is left
            # for last, then waited for: it is reused once that run stores it.
            self.compute(todo, keys, wait=False)
            self.compute([spec for spec in todo if spec not in self.outcomes], keys, wait=True)
        except KeyboardInterrupt:
            # A cell may have reached the store just before the interrupt arrived.
            for spec in specs:
                stored = None if spec in self.outcomes else self.store.get(keys[spec])
                if stored is not None:
                    self.outcomes[spec] = stored
            if self.shard is None:
                self.write("interrupted")
            self.say(f"interrupted: {len(self.computed) + len(self.reused)} finished cells are "
                     f"kept in {self.store.folder}; rerun the same command to resume")
            raise
        finally:
            self.executor.close()
            for claim in self.claims.values():
                claim.release()
        failed = self.failed_cells()
        if self.shard is not None:
            self.say(f"shard {self.shard[0]}/{self.shard[1]}: {len(self.computed)} cells "
                     f"computed, {len(failed)} failed; once every shard has finished, the same "
                     "command with --assemble instead of --shard writes the results")
            return {}
        results = self.write("failed cells" if failed else "complete")
        self.say(f"results: {self.results_path} (and {self.latest_path.name}); "
                 f"{len(self.computed)} cells computed, {len(self.reused)} reused"
                 + (f", {len(failed)} FAILED" if failed else ""))
        self.report()
        return results

    def compute(self, specs: list, keys: dict, wait: bool) -> None:
        """Has the executor compute the specs this run can claim, storing each as it arrives
        and rewriting the results; with wait, waits for the claims other runs hold."""
        if not specs:
            return
        claim = lambda spec: self.claim(spec, keys[spec], wait)  # noqa: E731
        for spec, result, where in self.executor.run(specs, self.windows_for, claim):
            self.outcomes[spec] = result
            self.done += 1
            if result.get("error"):
                # A failed cell is reported, never stored: a rerun retries it.
                self.say(f"[{self.done}/{self.to_do}] FAILED {spec.label}: {result['error']}")
            else:
                self.store.put(keys[spec], result, provenance={
                    "model_info": self.executor.model_info(),
                    "windows": self.window_info[f"{spec.dataset}@{spec.context_length}"]})
                self.computed.append(spec)
                self.say(f"[{self.done}/{self.to_do}] {self.summary_line(spec, result)}"
                         + (f"  [{where}]" if where else ""))
            self.claims.pop(spec).release()
            if self.shard is None:
                self.write("running")

    def claim(self, spec: RunSpec, key: dict, wait: bool) -> bool:
        """True when this run holds the cell's claim and is to compute it (an executor asks
        just before it sends a cell off). False when another run holds it (wait=False) or
        stored it meanwhile (then it is reused)."""
        if spec in self.claims:  # a cell sent off again (its Ray actor died)
            return True
        claim = self.store.claim(key) if wait else self.store.try_claim(key)
        if claim is None:
            holder = self.store.claim_holder(key) or "another process"
            self.say(f"{spec.label}: being computed by another run ({holder}); waiting for it "
                     "after the other cells")
            return False
        record = self.store.get_record(key)  # the claim's last holder may have stored it
        if record is not None:
            claim.release()
            self.reuse(spec, record)
            self.to_do -= 1
            return False
        self.claims[spec] = claim
        return True

    def finish_assembly(self, missing: list) -> dict:
        """--assemble: the results from the store alone; missing cells are named, not run."""
        self.missing = missing
        for spec in missing:
            self.say(f"missing: {spec.label}")
        results = self.write(f"{len(missing)} missing cells" if missing else "complete")
        self.say(f"results: {self.results_path} (and {self.latest_path.name}) assembled from "
                 f"{len(self.reused)} stored cells" + (
                     f"; {len(missing)} cells are MISSING (run the shards that hold them, or "
                     "the command without --assemble)" if missing else ""))
        self.report()
        return results

    def report(self) -> None:
        page = None
        if self.make_report:
            *paths, page = write_report(self.results_path)
            for path in paths:
                self.say(f"wrote {path}")
        for line in headline(load_results(self.results_path)):
            self.say(line)
        if page:  # last: a run ends with the path of its page (docs/running.md)
            self.say(f"results page (every table and figure; opens offline): {page}")

    def reuse(self, spec: RunSpec, record: dict) -> None:
        """A stored cell: its result, and the provenance stored with it (model, windows)."""
        self.outcomes[spec] = record["result"]
        self.reused.append(spec)
        self.model_info = self.model_info or record["provenance"].get("model_info")
        windows = record["provenance"].get("windows")
        if windows:
            self.window_info.setdefault(f"{spec.dataset}@{spec.context_length}", windows)

    def estimate(self, todo: list) -> float:
        """Say the size of the computations still to do (windows per cell, forward tokens)
        and their estimated seconds, from one timed dense forward per context length (an
        executor that cannot time one here, Ray's, gives the size alone)."""
        windows = {(s.dataset, s.context_length): int(self.windows_for(s).input_ids.shape[0])
                   for s in todo}
        tokens = sum(windows[s.dataset, s.context_length] * s.context_length for s in todo)
        per_cell = ", ".join(f"{d}@{L}: {n:,}" for (d, L), n in windows.items())
        seconds_per_window = {}
        for L in sorted({L for _, L in windows}):
            spec = next(s for s in todo if s.context_length == L)
            seconds_per_window[L] = self.executor.time_forward(
                self.windows_for(spec).input_ids[:1])
        if None in seconds_per_window.values():
            self.say(f"to compute: {len(todo)} cells; windows per cell {per_cell}; "
                     f"{tokens:,} forward tokens in all")
            return 0.0
        seconds = sum(windows[s.dataset, s.context_length] * seconds_per_window[s.context_length]
                      for s in todo)
        self.say(f"to compute: {len(todo)} cells; windows per cell {per_cell}; "
                 f"{tokens:,} forward tokens in all; about {_duration(seconds)} at the dense "
                 f"rate measured now ({tokens / max(seconds, 1e-9):,.0f} tokens/s; sparse "
                 "methods may be slower)")
        return seconds

    def windows_for(self, spec: RunSpec):
        key = (spec.dataset, spec.context_length)
        if key not in self.windows and isinstance(spec, TaskSpec):  # a task's samples
            self.windows = {k: v for k, v in self.windows.items() if k[0] == spec.dataset}
            self.windows[key] = samples = load_samples(self.config, self.executor.tokenizer(),
                                                       spec)
            self.window_info[f"{spec.dataset}@{spec.context_length}"] = {
                **samples.info, "description": samples.description}
            self.say(f"{spec.task}: {len(samples.samples)} samples of {spec.context_length} "
                     f"tokens ({samples.description})")
        if key not in self.windows:
            # Only one context length's windows are needed at a time (specs are grouped).
            self.windows = {k: v for k, v in self.windows.items() if k[0] == spec.dataset}
            self.windows[key] = w = data.load_windows(
                spec.dataset, self.executor.tokenizer(), spec.context_length,
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
        if isinstance(spec, TaskSpec):
            return task_summary_line(spec, result, self.outcomes.get(spec.dense()))
        dense_result = self.outcomes.get(spec.dense())
        dense = (dense_result or {}).get("perplexity")
        delta = delta_vs_dense(result["perplexity"], dense)
        ci = versus_dense(result, dense_result, self.config.seed)["delta_vs_dense_ci95"]
        interval = f" [{ci[0] * 100:+.2f}, {ci[1] * 100:+.2f}]" if ci else ""
        versus = (f" ({delta * 100:+.2f}%{interval} vs dense {dense:.3f})"
                  if spec.method != "dense" and delta is not None else "")
        explained = "".join(f"  {label} {result[name]:{fmt}}" for name, label, fmt in (
            ("attention_recall", "recall", ".3f"), ("sink_retention", "sink", ".2f"),
            ("mean_cached_age", "age", ".0f"), ("selection_share", "sel/attn", ".2f"),
            ("pooling_tie_share", "ties", ".3f"),
            ("row_margin_small_share", "near-tie rows", ".3f"))
            if result.get(name) is not None)
        return (f"{spec.label:<40} PPL {result['perplexity']:.3f}{versus}  "
                f"density {result['density']:.3f}{explained}  "
                f"{result['tokens_per_second']:.0f} tok/s  {result['wall_seconds']:.1f} s")

    def say(self, message: str) -> None:
        if self.progress:
            tqdm.write(message)

    def config_record(self, status: str) -> dict:
        record = self.config.to_dict()
        provenance = env.provenance(self.device)
        record.update(
            status=status, started=self.started, written=now(), notes=self.notes,
            command=self.command, resolved_device=self.device, resolved_dtype=self.dtype,
            torch_threads=provenance["torch_threads"],
            block_sizes={str(L): cabattn.resolve_block_size(self.config.block_size, L)
                         for L in self.config.context_lengths()},
            executor=self.executor.name, cells_computed=len(self.computed),
            cells_reused=len(self.reused), cells_missing=[spec.label for spec in self.missing],
            versions=provenance["versions"], machine=provenance["machine"])
        record.update(model_info=self.executor.model_info() or self.model_info,
                      windows=dict(self.window_info))
        return record

    def write(self, status: str) -> dict:
        results = assemble(plan_cells(self.config), self.outcomes, self.config_record(status),
                           seeds=self.config.seeds)
        if self.config.tasks.enabled:  # shaped like results (docs/tasks.md)
            results["tasks"] = assemble(plan_cells(self.config, tasks=True), self.outcomes,
                                        {})["results"]
        write_results((self.results_path, self.latest_path), results)
        return results


def run_benchmark(config: ExperimentConfig, resume: bool = True, progress: bool = True) -> dict:
    """Run one experiment (the original API); returns the results dict also written to disk."""
    return PerplexityBenchmarkRunner(config, resume=resume, progress=progress).run()
