"""python -m eval.run: the perplexity benchmark (METHODS.md sections 4 and 6).

For every dataset and method it runs a context-length sweep at a fixed sparsity and a sparsity
sweep at a fixed context length. A cell is one (dataset, method, sparsity, context length); its
windows are tokenised once per (dataset, context length) and shared by every method. Dense is
computed once per (dataset, context length) and shared by every method at s = 0 (which is dense
by definition); the result records what actually ran (`method_run`, `sparsity_run`).

Every finished cell goes to a cell store first (one atomically written JSON file per cell), so
an interrupted run resumes without recomputing anything; then the results JSON, the figures and
the table are rewritten. Exit status: 0 all cells finished, 1 some cell failed (its error is in
the results), 2 invalid configuration, 130 interrupted.
"""
import argparse
import math
import os
import platform
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import yaml

from .config import (DEFAULT_OUTPUT_DIR, DEVICES, DTYPES, ICML_FULL_YAML, PROTOCOLS,
                     ConfigError, ExperimentConfig, ModelConfig, create_quick_test, load_config,
                     quick_test_config, validate)
from .results import CellStore, CorruptFileError, finite_or_none, write_json_atomic

__all__ = ["ExperimentConfig", "ModelConfig", "PerplexityBenchmarkRunner", "create_quick_test",
           "run_benchmark", "main"]

METRIC_FIELDS = ("perplexity", "cross_entropy", "bits_per_token", "bits_per_byte", "num_tokens",
                 "num_samples", "ppl_ci95", "density")
EXIT_OK, EXIT_FAILED_CELLS, EXIT_CONFIG, EXIT_INTERRUPTED = 0, 1, 2, 130


class NonFiniteLoss(RuntimeError):
    pass


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


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                              capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def resolve_device(device: str) -> str:
    import torch
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    if dtype == "auto":
        return "float16" if device.startswith("cuda") else "float32"
    return dtype


def peak_memory_mb(device: str) -> tuple:
    """(megabytes, what was measured): CUDA's peak allocation since the cell started, or on the
    CPU the process's peak resident set so far (Linux reports ru_maxrss in KiB)."""
    import torch
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_max_rss"


def failed_result(error: str) -> dict:
    return {**{name: None for name in METRIC_FIELDS}, "error": error}


class PerplexityBenchmarkRunner:
    """Runs one ExperimentConfig: plans the cells, reuses stored ones, computes the rest, writes
    results (JSON, figures, table). `run()` returns the results dict."""

    def __init__(self, config: ExperimentConfig, resume: bool = True, progress: bool = True,
                 notes: tuple = (), command: list | None = None, make_report: bool = True):
        self.config = config
        self.resume = resume
        self.progress = progress
        self.notes = list(notes)
        self.command = command
        self.make_report = make_report
        self.output_dir = Path(config.output_dir)
        self.results_path = self.output_dir / f"{config.name}.json"
        self.latest_path = self.output_dir / f"{config.name}_latest.json"
        self.store = CellStore(self.output_dir / f"{config.name}.cells")
        self.device = resolve_device(config.model.device)
        self.dtype = resolve_dtype(config.model.torch_dtype, self.device)
        self.loaded = None
        self.windows = {}  # (dataset, L) -> eval.data.Windows, tokenised once
        self.outcomes = {}  # RunSpec -> R (computed or reused)
        self.computed, self.reused = [], []
        self.started = datetime.now(timezone.utc).isoformat(timespec="seconds")

    # -- planning ---------------------------------------------------------------------------
    def requested_cells(self) -> list:
        """(dataset, method, sweep name, point label, RunSpec) for every cell of the results."""
        cfg, cells = self.config, []
        for dataset in cfg.datasets:
            for method in cfg.methods:
                if cfg.context_length_sweep.enabled:
                    s = float(cfg.context_length_sweep.fixed_sparsity)
                    for L in cfg.context_length_sweep.context_lengths:
                        cells.append((dataset, method, "context_length_sweep", str(int(L)),
                                      RunSpec.for_cell(dataset, int(L), method, s)))
                if cfg.sparsity_sweep.enabled:
                    L = int(cfg.sparsity_sweep.fixed_context_length)
                    # Dense ignores s: one point, as in the original results files.
                    levels = [0.0] if method == "dense" else cfg.sparsity_sweep.sparsity_levels
                    for s in levels:
                        cells.append((dataset, method, "sparsity_sweep", str(float(s)),
                                      RunSpec.for_cell(dataset, L, method, float(s))))
        return cells

    def run_specs(self) -> list:
        """Unique computations, grouped by (dataset, L) with dense first: windows are tokenised
        once per group and every sparse cell can report its delta against dense at once."""
        specs = {cell[-1] for cell in self.requested_cells()}
        specs |= {RunSpec(s.dataset, s.context_length, "dense", 0.0) for s in specs}
        dataset_order = {name: i for i, name in enumerate(self.config.datasets)}
        method_order = {name: i for i, name in enumerate(["dense", *self.config.methods])}
        return sorted(specs, key=lambda s: (dataset_order[s.dataset], s.context_length,
                                            method_order[s.method], s.sparsity))

    def block_size(self, context_length: int) -> int:
        from cabattn.grid import auto_block_size
        if self.config.block_size == "auto":
            return auto_block_size(context_length)
        return int(self.config.block_size)

    def method_params(self, method: str) -> dict:
        """The method's full parameter set (defaults filled in), as the registry resolves it."""
        from cabattn.methods import get_method
        return dict(get_method(method, **self.config.method_params.get(method, {})).config)

    def protocol_params(self) -> dict:
        """The parameter only one protocol has: strict/block selection (mask) or the streaming
        chunk (kv)."""
        if self.config.protocol == "kv":
            return {"kv_chunk": self.config.kv_chunk}
        return {"causal_selection": self.config.causal_selection}

    def data_identity(self):
        """What identifies a --data-file's content in a cell key: path, size, modification."""
        if self.config.data_file is None:
            return None
        stat = os.stat(self.config.data_file)
        return {"path": str(Path(self.config.data_file).resolve()), "bytes": stat.st_size,
                "mtime_ns": stat.st_mtime_ns}

    def cell_key(self, spec: RunSpec) -> dict:
        """Everything that defines a cell's numbers; a stored cell is reused only on a match."""
        cfg = self.config
        key = {"dataset": spec.dataset, "data_file": self.data_identity(),
               "text_field": cfg.text_field, "model": cfg.model.name, "dtype": self.dtype,
               "device": self.device.split(":")[0], "context_length": spec.context_length,
               "max_windows": cfg.max_windows, "seed": cfg.seed, "method": spec.method,
               "sparsity": spec.sparsity}
        if spec.method != "dense":
            key.update(protocol=cfg.protocol, block_size=self.block_size(spec.context_length),
                       params=self.method_params(spec.method), **self.protocol_params())
        return key

    # -- computing --------------------------------------------------------------------------
    def load(self):
        if self.loaded is None:
            from . import models
            self.say(f"loading model {self.config.model.name} ({self.dtype}, {self.device}) ...")
            self.loaded = models.load_model(self.config.model.name, dtype=self.dtype,
                                            device=self.device,
                                            trust_remote_code=self.config.model.trust_remote_code,
                                            cache_dir=self.config.model.cache_dir)
            for L in self.config.context_lengths():
                models.check_context(self.loaded, L)
            self.say(f"model: {self.loaded.name} from {self.loaded.source}, "
                     f"{self.loaded.num_parameters / 1e6:.1f}M parameters, "
                     f"{self.loaded.max_positions} positions")
        return self.loaded

    def windows_for(self, dataset: str, context_length: int):
        key = (dataset, context_length)
        if key not in self.windows:
            from . import data
            # Only one context length's windows are needed at a time (specs are grouped).
            self.windows = {k: v for k, v in self.windows.items() if k[0] == dataset}
            self.windows[key] = data.load_windows(
                dataset, self.load().tokenizer, context_length,
                max_windows=self.config.max_windows, data_file=self.config.data_file,
                text_field=self.config.text_field)
            w = self.windows[key]
            self.say(f"{dataset}: {w.input_ids.shape[0]} windows of {context_length} tokens "
                     f"({w.description})")
        return self.windows[key]

    def _method_context(self, spec: RunSpec):
        """The attention the cell runs under: the model's own for dense, else cabattn.apply."""
        import contextlib
        if spec.method == "dense":
            return contextlib.nullcontext(None)
        import cabattn
        cfg = self.config
        return cabattn.apply(self.loaded.model, method=spec.method, sparsity=spec.sparsity,
                             protocol=cfg.protocol, block_size=self.block_size(spec.context_length),
                             seed=cfg.seed, **self.protocol_params(),
                             **cfg.method_params.get(spec.method, {}))

    def evaluate(self, spec: RunSpec) -> dict:
        """Teacher-forced NLL of every window under the cell's attention; R without deltas."""
        import torch
        from tqdm.auto import tqdm

        from .metrics import summarize

        windows = self.windows_for(spec.dataset, spec.context_length)
        model = self.load().model
        torch.manual_seed(self.config.seed)
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(self.device)
        n, L = windows.input_ids.shape
        nll_sums, token_counts = [], []
        label = self.label(spec)
        start = time.perf_counter()
        with self._method_context(spec) as stats, torch.inference_mode():
            for i in tqdm(range(n), desc=label, unit="window", disable=not self.progress,
                          leave=False, dynamic_ncols=True):
                ids = windows.input_ids[i:i + 1].to(self.device)
                loss = float(model(ids, labels=ids).loss)
                if not math.isfinite(loss):
                    raise NonFiniteLoss(f"non-finite loss ({loss}) in window {i} of {n}")
                # The model's loss is the mean NLL over the L-1 predictions of the window.
                nll_sums.append(loss * (L - 1))
                token_counts.append(L - 1)
            protocol_stats = stats.as_dict() if stats is not None else None
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
        wall = time.perf_counter() - start
        memory, memory_kind = peak_memory_mb(self.device)
        result = dict(summarize(nll_sums, token_counts, list(windows.num_bytes[:n]),
                                seed=self.config.seed))
        sparse = spec.method != "dense"
        result.update(
            density=protocol_stats["density"] if sparse else 1.0,
            block_size=self.block_size(spec.context_length) if sparse else None,
            protocol=self.config.protocol if sparse else "dense",
            **{name: value if sparse else None for name, value in self.protocol_params().items()},
            params=self.method_params(spec.method) if sparse else {},
            selection_seconds=protocol_stats["selection_seconds"] if sparse else 0.0,
            attention_seconds=protocol_stats["attention_seconds"] if sparse else None,
            oracle_selection=protocol_stats["oracle_selection"] if sparse else False,
            layer_head_density=protocol_stats["layer_head_density"] if sparse else None,
            wall_seconds=wall, tokens_per_second=sum(token_counts) / wall,
            peak_memory_mb=memory, peak_memory_kind=memory_kind,
            finished=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        return result

    def outcome(self, spec: RunSpec) -> dict:
        """R of a computation: from the store when it finished before, else computed now."""
        key = self.cell_key(spec)
        stored = self.store.get(key)
        if stored is not None:
            self.reused.append(spec)
            return stored
        try:
            result = self.evaluate(spec)
        except (NonFiniteLoss, RuntimeError, ValueError) as err:
            # A failed cell is reported (null metrics + error), never stored: a rerun retries it.
            result = failed_result(f"{type(err).__name__}: {err}")
            self.say(f"FAILED {self.label(spec)}: {result['error']}")
            return result
        result = {name: finite_or_none(v) if isinstance(v, float) else v
                  for name, v in result.items()}
        self.store.put(key, result)
        self.computed.append(spec)
        self.say(self.summary_line(spec, result))
        return result

    # -- reporting --------------------------------------------------------------------------
    def label(self, spec: RunSpec) -> str:
        if spec.method == "dense":
            return f"{spec.dataset} dense L={spec.context_length}"
        return f"{spec.dataset} {spec.method} s={spec.sparsity:g} L={spec.context_length}"

    def dense_perplexity(self, dataset: str, context_length: int):
        dense = self.outcomes.get(RunSpec(dataset, context_length, "dense", 0.0))
        return None if dense is None else dense.get("perplexity")

    def summary_line(self, spec: RunSpec, result: dict) -> str:
        dense = self.dense_perplexity(spec.dataset, spec.context_length)
        delta = ""
        if spec.method != "dense" and dense:
            delta = f" ({(result['perplexity'] / dense - 1) * 100:+.2f}% vs dense {dense:.3f})"
        return (f"{self.label(spec):<40} PPL {result['perplexity']:.3f}{delta}  "
                f"density {result['density']:.3f}  {result['tokens_per_second']:.0f} tok/s  "
                f"{result['wall_seconds']:.1f} s")

    def say(self, message: str) -> None:
        if self.progress:
            from tqdm.auto import tqdm
            tqdm.write(message)

    def assemble(self, status: str) -> dict:
        """The seed-compatible results: DATASET -> METHOD -> sweep -> point -> R."""
        results = {}
        for dataset, method, sweep, point, spec in self.requested_cells():
            outcome = self.outcomes.get(spec)
            if outcome is None:
                continue
            cell = dict(outcome)
            L, s = spec.context_length, (float(point) if sweep == "sparsity_sweep"
                                         else float(self.config.context_length_sweep.fixed_sparsity))
            dense = self.dense_perplexity(dataset, L)
            ppl = cell.get("perplexity")
            cell.update(method=method, sparsity=0.0 if method == "dense" else s,
                        context_length=L, method_run=spec.method, sparsity_run=spec.sparsity,
                        dense_perplexity=dense,
                        delta_vs_dense=(ppl / dense - 1) if ppl is not None and dense else None)
            results.setdefault(dataset, {}).setdefault(method, {}).setdefault(sweep, {})[point] = cell
        return {"config": self.config_record(status), "results": results}

    def config_record(self, status: str) -> dict:
        import torch
        import transformers
        record = self.config.to_dict()
        record.update(
            status=status, started=self.started,
            written=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            notes=self.notes, command=self.command, resolved_device=self.device,
            resolved_dtype=self.dtype, torch_threads=torch.get_num_threads(),
            block_sizes={str(L): self.block_size(L) for L in self.config.context_lengths()},
            cells_computed=len(self.computed), cells_reused=len(self.reused),
            versions={"python": platform.python_version(), "torch": torch.__version__,
                      "transformers": transformers.__version__, "cabattn_commit": _git_commit()},
            machine={"platform": platform.platform(), "processor": platform.processor(),
                     "cpu_count": os.cpu_count(),
                     "cuda_device": torch.cuda.get_device_name(0) if self.device.startswith("cuda")
                     else None})
        if self.loaded is not None:
            record["model_info"] = {"name": self.loaded.name, "source": str(self.loaded.source),
                                    "num_parameters": self.loaded.num_parameters,
                                    "max_positions": self.loaded.max_positions}
        record["windows"] = {f"{d}@{L}": {"num_windows": int(w.input_ids.shape[0]),
                                          "description": w.description,
                                          "num_documents": w.num_documents}
                             for (d, L), w in self.windows.items()}
        return record

    def write(self, status: str) -> dict:
        results = self.assemble(status)
        write_json_atomic(self.results_path, results)
        write_json_atomic(self.latest_path, results)
        return results

    # -- the run ----------------------------------------------------------------------------
    def failed_cells(self) -> list:
        return [spec for spec, r in self.outcomes.items() if r.get("error")]

    def run(self) -> dict:
        validate(self.config)
        if not self.resume:
            removed = self.store.clear()
            if removed:
                self.say(f"--fresh: removed {removed} stored cells from {self.store.folder}")
        specs = self.run_specs()
        stored = sum(self.store.get(self.cell_key(s)) is not None for s in specs)
        self.say(f"{len(specs)} computations for {len(self.requested_cells())} result cells; "
                 f"{stored} already finished in {self.store.folder}"
                 + (" (reused; --fresh recomputes them)" if stored else ""))
        try:
            for spec in specs:
                self.outcomes[spec] = self.outcome(spec)
                self.write("running")
        except KeyboardInterrupt:
            # A cell may have reached the store just before the interrupt arrived.
            for spec in specs:
                stored = None if spec in self.outcomes else self.store.get(self.cell_key(spec))
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


def run_benchmark(config: ExperimentConfig, resume: bool = True, progress: bool = True) -> dict:
    """Run one experiment (the original API); returns the results dict also written to disk."""
    return PerplexityBenchmarkRunner(config, resume=resume, progress=progress).run()


# ---------------------------------------------------------------------------------------------
# Command line

def _method_param(text: str) -> tuple:
    """METHOD.NAME=VALUE -> (method, name, value); VALUE is read as YAML (0.5, true, high)."""
    target, sep, value = text.partition("=")
    method, dot, name = target.partition(".")
    if not (sep and dot and method and name):
        raise argparse.ArgumentTypeError(f"{text!r} is not METHOD.NAME=VALUE "
                                         "(e.g. cab_v4.magnitude_ratio=0.7)")
    return method, name, yaml.safe_load(value)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _block_size(text: str):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"block size {text!r} is not 'auto' or an integer") \
            from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m eval.run",
        description="Perplexity of a language model under sparse attention (mask protocol) or "
                    "KV-cache eviction (kv protocol): a context-length sweep at a fixed sparsity "
                    "and a sparsity sweep at a fixed context length, per dataset and method.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  python -m eval.run --quick-test --yes          # offline defaults when the hub is unreachable
  python -m eval.run --config configs/icml_full.yaml
  python -m eval.run --datasets enwiki-sample --methods dense h2o cab_v4 \\
      --context-lengths 512 1024 --sparsity-levels 0 0.5 0.9 --max-windows 8
  python -m eval.run --model ./my-llama --data-file notes.txt --method cab_v3 \\
      --param cab_v3.lambda_redundancy=0.5

Flags given on the command line override the preset or --config file. Results go to
OUTPUT_DIR/NAME.json (+ NAME_latest.json), finished cells to OUTPUT_DIR/NAME.cells/, figures
and Table 3 next to the results. Rerunning the same command resumes (finished cells are read
back, not recomputed); --fresh recomputes everything.""")
    g = p.add_argument_group("presets")
    g.add_argument("--quick-test", action="store_true",
                   help="configs/quick_test.yaml; on the offline defaults (SmolLM2-135M, "
                        "enwiki-sample, pd-books, brown) when the hub is unreachable")
    g.add_argument("--icml-full", action="store_true", help="configs/icml_full.yaml (GPU + hub)")
    g.add_argument("--config", metavar="FILE.yaml", help="a YAML (or JSON) experiment file")

    g = p.add_argument_group("what to run")
    g.add_argument("--datasets", nargs="+", metavar="NAME",
                   help="corpora (offline: enwiki-sample pd-books brown; hub: wikitext-103 "
                        "wikitext-2 c4 pg19)")
    g.add_argument("--data-file", metavar="PATH",
                   help="a local .txt, .jsonl or .parquet corpus, labelled in the results by "
                        "--datasets NAME or else by the file's stem")
    g.add_argument("--text-field", metavar="FIELD", help="text column of --data-file (text)")
    g.add_argument("--methods", nargs="+", metavar="NAME",
                   help="dense h2o cab_v4 cab_v3 streaming_llm local_strided random")
    g.add_argument("--method", metavar="NAME", help="a single method (same as --methods NAME)")
    g.add_argument("--param", action="append", type=_method_param, default=[],
                   metavar="METHOD.NAME=VALUE",
                   help="a method parameter, e.g. cab_v4.magnitude_ratio=0.7, "
                        "h2o.h2o_recent_ratio=0.25 (repeatable)")
    g.add_argument("--context-lengths", nargs="+", type=int, metavar="L",
                   help="context-length sweep (tokens)")
    g.add_argument("--fixed-sparsity", type=float, metavar="S",
                   help="sparsity of the context-length sweep (0.9)")
    g.add_argument("--sparsity-levels", nargs="+", type=float, metavar="S",
                   help="sparsity sweep, each in [0, 1)")
    g.add_argument("--fixed-context-length", type=int, metavar="L",
                   help="context length of the sparsity sweep (default: the preset's, or the "
                        "largest --context-lengths)")
    g.add_argument("--no-context-sweep", action="store_true")
    g.add_argument("--no-sparsity-sweep", action="store_true")
    g.add_argument("--max-windows", type=int, metavar="N",
                   help="windows per cell, evenly spaced over the corpus (default: all)")

    g = p.add_argument_group("protocol")
    g.add_argument("--protocol", choices=PROTOCOLS,
                   help="mask: block-sparse attention, one forward per window (default); "
                        "kv: streaming KV-cache eviction")
    g.add_argument("--block-size", type=_block_size, metavar="B",
                   help="auto (about 64 blocks a window), 16, 32, 64 or 128")
    g.add_argument("--causal-selection", choices=("strict", "block"),
                   help="strict (default): a row's selection uses earlier blocks only")
    g.add_argument("--kv-chunk", type=int, metavar="C", help="kv protocol chunk (1: exact)")

    g = p.add_argument_group("model and machine")
    g.add_argument("--model", metavar="NAME_OR_PATH",
                   help="smollm2-135m (offline default), a hub id or a local folder")
    g.add_argument("--dtype", choices=DTYPES, help="auto: float16 on CUDA, float32 on the CPU")
    g.add_argument("--device", metavar="DEVICE", help=f"{', '.join(DEVICES)} or cuda:N")
    g.add_argument("--threads", type=_positive_int, metavar="N",
                   help="CPU threads for torch (default: torch's choice; 1 is often faster on "
                        "a machine that other jobs keep busy)")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="allow a hub model's own code to run (off by default)")
    g.add_argument("--seed", type=int, help="seed for bootstrap intervals and random (42)")

    g = p.add_argument_group("output")
    g.add_argument("--output-dir", metavar="DIR", help=f"default {DEFAULT_OUTPUT_DIR}")
    g.add_argument("--name", help="results file name (default: the preset's or config's name)")
    resume = g.add_mutually_exclusive_group()
    resume.add_argument("--resume", dest="resume", action="store_true", default=True,
                        help="reuse finished cells of an earlier run with the same name (default)")
    resume.add_argument("--fresh", dest="resume", action="store_false",
                        help="delete the stored cells and recompute everything")
    g.add_argument("--no-report", action="store_true", help="skip figures and table")
    g.add_argument("--yes", action="store_true",
                   help="never ask for confirmation (without a terminal it never asks either)")
    return p


def _base_configs(args) -> tuple:
    """(configs, notes) of the preset, file or defaults, before command-line overrides."""
    presets = sum(bool(x) for x in (args.quick_test, args.icml_full, args.config))
    if presets > 1:
        raise ConfigError("choose one of --quick-test, --icml-full, --config")
    if args.quick_test:
        config, note = quick_test_config()
        return [config], [note] if note else []
    if args.icml_full:
        return load_config(ICML_FULL_YAML), []
    if args.config:
        return load_config(args.config), []
    return [ExperimentConfig(name="perplexity")], []


def _override(config: ExperimentConfig, args) -> ExperimentConfig:
    cfg, model = config, config.model
    if args.methods and args.method:
        raise ConfigError("give --methods or --method, not both")
    simple = {"datasets": args.datasets, "methods": args.methods or (
        [args.method] if args.method else None), "data_file": args.data_file,
        "text_field": args.text_field, "max_windows": args.max_windows,
        "protocol": args.protocol, "block_size": args.block_size,
        "causal_selection": args.causal_selection, "kv_chunk": args.kv_chunk,
        "seed": args.seed, "output_dir": args.output_dir, "name": args.name}
    for name, value in simple.items():
        if value is not None:
            setattr(cfg, name, value)
    if args.data_file is not None and args.datasets is None:
        cfg.datasets = [Path(args.data_file).stem]
    if args.model is not None:
        model.name, model.max_length = args.model, None
    if args.dtype is not None:
        model.torch_dtype = args.dtype
    if args.device is not None:
        model.device = args.device
    if args.trust_remote_code:
        model.trust_remote_code = True
    if args.context_lengths is not None:
        cfg.context_length_sweep.context_lengths = args.context_lengths
        if args.fixed_context_length is None:
            cfg.sparsity_sweep.fixed_context_length = max(args.context_lengths)
    if args.fixed_context_length is not None:
        cfg.sparsity_sweep.fixed_context_length = args.fixed_context_length
    if args.fixed_sparsity is not None:
        cfg.context_length_sweep.fixed_sparsity = args.fixed_sparsity
    if args.sparsity_levels is not None:
        cfg.sparsity_sweep.sparsity_levels = args.sparsity_levels
    if args.no_context_sweep:
        cfg.context_length_sweep.enabled = False
    if args.no_sparsity_sweep:
        cfg.sparsity_sweep.enabled = False
    for method, name, value in args.param:
        cfg.method_params = {**cfg.method_params,
                             method: {**cfg.method_params.get(method, {}), name: value}}
    return cfg


def configs_from_args(args) -> tuple:
    configs, notes = _base_configs(args)
    return [_override(c, args) for c in configs], notes


def describe(config: ExperimentConfig) -> str:
    c = config
    lines = [f"experiment {c.name}: {c.description}",
             f"  model     {c.model.name} (dtype {c.model.torch_dtype}, device {c.model.device})",
             f"  datasets  {', '.join(c.datasets)}"
             + (f" (file {c.data_file})" if c.data_file else ""),
             f"  methods   {', '.join(c.methods)}  protocol {c.protocol}, block size "
             f"{c.block_size}, {c.causal_selection} selection"
             + (f", kv chunk {c.kv_chunk}" if c.protocol == "kv" else "")]
    if c.context_length_sweep.enabled:
        lines.append(f"  context sweep   L = {c.context_length_sweep.context_lengths} at "
                     f"s = {c.context_length_sweep.fixed_sparsity}")
    if c.sparsity_sweep.enabled:
        lines.append(f"  sparsity sweep  s = {c.sparsity_sweep.sparsity_levels} at "
                     f"L = {c.sparsity_sweep.fixed_context_length}")
    lines.append(f"  windows   {c.max_windows or 'all'} per cell; output "
                 f"{Path(c.output_dir) / c.name}.json")
    return "\n".join(lines)


def _confirm(args) -> bool:
    if args.yes or args.quick_test or not sys.stdin.isatty():
        return True
    return input("Continue with this configuration? [y/N]: ").strip().lower() in ("y", "yes")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        configs, notes = configs_from_args(args)
        for note in notes:
            print(f"note: {note}", flush=True)
        for config in configs:
            print(describe(config), flush=True)
            validate(config)
    except (ConfigError, CorruptFileError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    if not _confirm(args):
        print("aborted")
        return EXIT_CONFIG
    if args.threads is not None:
        import torch
        torch.set_num_threads(args.threads)
    # A plain `kill` then ends the run like Ctrl-C: the partial results are written first.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    status = EXIT_OK
    command = ["python", "-m", "eval.run", *(sys.argv[1:] if argv is None else argv)]
    for config in configs:
        runner = PerplexityBenchmarkRunner(config, resume=args.resume, notes=notes,
                                           command=command, make_report=not args.no_report)
        try:
            runner.run()
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED
        except (ConfigError, CorruptFileError) as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_CONFIG
        if runner.failed_cells():
            status = EXIT_FAILED_CELLS
    return status


if __name__ == "__main__":
    sys.exit(main())
