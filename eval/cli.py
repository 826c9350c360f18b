"""The command line of the benchmark: `python -m eval.run [flags]` (eval/run.py starts it).

Builds the experiment configs from a preset or file plus flag overrides, validates them before
any model loads, then hands each to eval.runner.PerplexityBenchmarkRunner. Exit status: 0 all
cells finished, 1 some cell failed (its error is in the results) or the model could not be
loaded, 2 invalid configuration, 130 interrupted.
"""
import argparse
import signal
import sys
import textwrap
from pathlib import Path

import torch

from cabattn import PROTOCOLS, methods, protocol_options

from . import arguments
from .config import (DEFAULT_OUTPUT_DIR, ICML_FULL_YAML, ConfigError, ExperimentConfig,
                     check_output_location, config_warnings, default_config, load_config,
                     quick_test_config, validate)
from .data import DATASETS, HUB_DATASETS, OFFLINE_DATASETS, DatasetError, FetchError
from .env import DEVICES, DTYPES
from .executors import EXECUTORS, ExecutorError
from .models import DEFAULT_MODEL, OFFLINE_MODELS, ModelLoadError
from .results import CorruptFileError
from .runner import PerplexityBenchmarkRunner, RunDeclined
from .tasks import HAYSTACKS, METRICS, SCORINGS, TASKS

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_INTERRUPTED = 0, 1, 2, 130
# How the command is typed: from a checkout (the package is the folder eval/), or installed
# (the package is cabattn_eval, the command cabattn-eval; setup.py).
PROG = "python -m eval.run" if __package__ == "eval" else "cabattn-eval"


def registries_help() -> str:
    """The offline models, the datasets, and the methods with their parameters, as the
    registries declare them."""
    lines = ["offline models (--model NAME; docs/models.md):"]
    for entry in OFFLINE_MODELS.values():
        default = " (the default)" if entry.name == DEFAULT_MODEL else ""
        lines += textwrap.wrap(f"{entry.name}{default}: {entry.facts}", 95,
                               initial_indent="  ", subsequent_indent="      ",
                               break_on_hyphens=False)
    lines += ["", "datasets (--datasets NAME):"]
    for entry in DATASETS.values():
        where = "hub" if entry.hub else "offline"
        lines += textwrap.wrap(f"{entry.name} ({where}): {entry.description}", 95,
                               initial_indent="  ", subsequent_indent="      ",
                               break_on_hyphens=False)
    lines += ["", "methods (--methods NAME) and their parameters (--param METHOD.NAME=VALUE):"]
    for name in methods.available():
        cls = methods.METHODS[name]
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        lines.append(f"  {name}" + (f": {doc}" if doc and not doc.startswith(cls.__name__)
                                    else ""))
        for param, (default, help_text) in cls.parameters().items():
            lines += textwrap.wrap(f"{param} = {default!r}: {help_text}", 95,
                                   initial_indent="      ", subsequent_indent="        ",
                                   break_on_hyphens=False)
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
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
back, not recomputed); --fresh recomputes everything.

""" + registries_help())
    g = p.add_argument_group("presets")
    g.add_argument("--quick-test", action="store_true",
                   help="configs/quick_test.yaml; on the offline defaults (SmolLM2-135M, "
                        "enwiki-sample, pd-books, brown) when the hub is unreachable")
    g.add_argument("--icml-full", action="store_true", help="configs/icml_full.yaml (GPU + hub)")
    g.add_argument("--config", metavar="FILE.yaml", help="a YAML (or JSON) experiment file")

    g = p.add_argument_group("what to run")
    g.add_argument("--datasets", nargs="+", metavar="NAME",
                   help=f"corpora (offline: {' '.join(OFFLINE_DATASETS)}; hub: "
                        f"{' '.join(HUB_DATASETS)}; see below)")
    g.add_argument("--data-file", metavar="PATH",
                   help="a local .txt, .jsonl or .parquet corpus, labelled in the results by "
                        "--datasets NAME or else by the file's stem")
    g.add_argument("--text-field", metavar="FIELD", help="text column of --data-file (text)")
    g.add_argument("--methods", nargs="+", metavar="NAME",
                   help=f"{' '.join(methods.available())} (see below)")
    g.add_argument("--method", metavar="NAME", help="a single method (same as --methods NAME)")
    g.add_argument("--param", action="append", type=arguments.method_param, default=[],
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
    g.add_argument("--budget-tokens", nargs="+", type=int, metavar="K",
                   help="also run fixed token budgets (cache sizes) at every context length "
                        "(StreamingLLM's convention), results under budget_sweep['K@L']")
    g.add_argument("--no-context-sweep", action="store_true")
    g.add_argument("--no-sparsity-sweep", action="store_true")
    g.add_argument("--max-windows", type=int, metavar="N",
                   help="windows per cell, evenly spaced over the corpus (default: all)")
    g.add_argument("--no-key-tokens", dest="key_tokens", action="store_false", default=None,
                   help="skip the key-token perplexity of each cell (docs/metrics.md; it costs "
                        "a few dense forwards per dataset and context length)")

    g = p.add_argument_group("tasks beyond perplexity (docs/tasks.md)")
    g.add_argument("--tasks", nargs="+", metavar="TASK",
                   help=f"synthetic tasks scored in the same cells: {' '.join(TASKS)}; "
                        "without --datasets only tasks run")
    g.add_argument("--task-files", nargs="+", metavar="FILE.jsonl",
                   help="local task files in LongBench's fields (context, input, answers, "
                        "optional all_classes), generated and scored by --task-metric")
    g.add_argument("--haystack", choices=HAYSTACKS,
                   help="text: consecutive pd-books text (default); noise: repeated filler")
    g.add_argument("--task-samples", type=arguments.positive_int, metavar="N",
                   help="samples per (task, L), needle depths spread over [0, 1] (20)")
    g.add_argument("--task-scoring", choices=SCORINGS,
                   help="teacher_forced (default): exact match of the answer as one window; "
                        "generated: greedy decoding (kv: decode-time eviction; mask: "
                        "block-sparse prompt, dense decoding unless --decoding sparse; "
                        "prefill: against the compressed cache)")
    g.add_argument("--task-metric", choices=METRICS, help="of task files' answers (f1)")
    g.add_argument("--max-new-tokens", type=arguments.positive_int, metavar="N",
                   help="greedy generation length (32)")
    g.add_argument("--question-aware", action="store_true", default=None,
                   help="prefill protocol: the compressed context ends after the question "
                        "(SnapKV's setting) instead of before it (kvpress's default)")

    g = p.add_argument_group("protocol")
    g.add_argument("--protocol", choices=list(PROTOCOLS),
                   help="mask: block-sparse attention, one forward per window (default); "
                        "kv: streaming KV-cache eviction; prefill: a dense prefill of the "
                        "context, each layer's cache compressed once, the continuation "
                        "against it (docs/protocols.md)")
    g.add_argument("--continuation", type=arguments.positive_int, metavar="T",
                   help="perplexity windows: score only each window's last T tokens, the rest "
                        "being its context (default: prefill L/8; mask and kv the whole "
                        "window); dense cells score the same tokens")
    g.add_argument("--block-size", type=arguments.block_size, metavar="B",
                   help="auto (about 64 blocks a window), 16, 32, 64 or 128")
    g.add_argument("--k-min", type=arguments.positive_int, metavar="K",
                   help="the smallest token budget: K = max(k_min, (1 - s) L) (64)")
    for option in protocol_options().values():  # each protocol's own, as it declares them
        owners = [p.name for p in PROTOCOLS.values() if option in p.OPTIONS]
        arguments.add_option(g, option, help_prefix="" if len(owners) > 1
                             else f"{owners[0]} protocol: ")

    g = p.add_argument_group("model and machine")
    g.add_argument("--model", metavar="NAME_OR_PATH",
                   help=f"an offline model ({', '.join(OFFLINE_MODELS)}; see below; default "
                        f"{DEFAULT_MODEL}), a hub id or a local folder")
    g.add_argument("--dtype", choices=("auto", *DTYPES),
                   help="auto: float16 on CUDA, float32 on the CPU")
    g.add_argument("--device", metavar="DEVICE", help=f"{', '.join(DEVICES)} or cuda:N")
    g.add_argument("--threads", type=arguments.positive_int, metavar="N",
                   help="CPU threads for torch (default: torch's choice; 1 is often faster on "
                        "a machine that other jobs keep busy)")
    g.add_argument("--batch-size", type=arguments.positive_int, metavar="N",
                   help="windows per forward (1); the numbers match batch size 1 to rounding")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="allow a hub model's own code to run (off by default)")
    g.add_argument("--seed", type=int, help="seed for bootstrap intervals and random (42)")
    g.add_argument("--seeds", type=arguments.positive_int, metavar="N",
                   help="run randomised methods (random) with N seeds (seed, seed + 1, ...) and "
                        "report the mean and the spread between them (1)")

    g = p.add_argument_group("scaling out (docs/running.md, on a cluster)")
    g.add_argument("--executor", choices=EXECUTORS, default="serial",
                   help="serial: every cell in this process (default); ray: one Ray actor per "
                        "GPU (or per --threads CPU cores), each loading the model once")
    g.add_argument("--ray-address", metavar="ADDRESS",
                   help="the Ray cluster to use (auto: the one `ray start` started here; "
                        "default: start a local one)")
    g.add_argument("--shard", type=arguments.shard, metavar="I/N",
                   help="compute only shard I of N of the cells (a job array's task); the "
                        "shards share one cell store and write no results file")
    g.add_argument("--assemble", action="store_true",
                   help="compute nothing: write the results, figures and table from the cell "
                        "store and name the cells still missing")

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
    if args.datasets is None and args.data_file is None:
        config, note = default_config()
        return [config], [note] if note else []
    return [ExperimentConfig(name="perplexity")], []


def _override(config: ExperimentConfig, args) -> ExperimentConfig:
    cfg, model = config, config.model
    if args.methods and args.method:
        raise ConfigError("give --methods or --method, not both")
    simple = {"datasets": args.datasets, "methods": args.methods or (
        [args.method] if args.method else None), "data_file": args.data_file,
        "text_field": args.text_field, "max_windows": args.max_windows,
        "protocol": args.protocol, "block_size": args.block_size, "k_min": args.k_min,
        **{name: getattr(args, name) for name in protocol_options()},
        "key_tokens": args.key_tokens, "seeds": args.seeds, "continuation": args.continuation,
        "budget_tokens": args.budget_tokens, "batch_size": args.batch_size, "seed": args.seed,
        "output_dir": args.output_dir, "name": args.name}
    for name, value in simple.items():
        if value is not None:
            setattr(cfg, name, value)
    tasks = {"names": args.tasks, "files": args.task_files, "haystack": args.haystack,
             "samples": args.task_samples, "scoring": args.task_scoring,
             "metric": args.task_metric, "max_new_tokens": args.max_new_tokens,
             "question_aware": args.question_aware}
    for name, value in tasks.items():
        if value is not None:
            setattr(cfg.tasks, name, value)
    if (args.tasks or args.task_files) and args.datasets is None and args.data_file is None:
        cfg.datasets = []  # --tasks without --datasets: tasks only
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
             f"{c.block_size}, k_min {c.k_min}, {c.causal_selection} selection"
             + (f", kv chunk {c.kv_chunk}" if c.protocol == "kv" else "")
             + (", on the reference path" if c.kernels == "reference" else "")]
    if c.context_length_sweep.enabled:
        lines.append(f"  context sweep   L = {c.context_length_sweep.context_lengths} at "
                     f"s = {c.context_length_sweep.fixed_sparsity}")
    if c.sparsity_sweep.enabled:
        lines.append(f"  sparsity sweep  s = {c.sparsity_sweep.sparsity_levels} at "
                     f"L = {c.sparsity_sweep.fixed_context_length}")
    if c.budget_tokens:
        lines.append(f"  budget sweep    K = {c.budget_tokens} tokens at L = "
                     f"{c.context_lengths()}")
    if c.tasks.enabled:
        t = c.tasks
        lines.append(f"  tasks     {', '.join(t.names + t.files)} ({t.samples} samples, "
                     f"{t.haystack} haystack, {t.scoring} scoring)")
    lines.append(f"  windows   {c.max_windows or 'all'} per cell; output "
                 f"{Path(c.output_dir) / c.name}.json")
    return "\n".join(lines)


# A run estimated to take longer asks before it starts (on a terminal, without --yes).
LONG_RUN_SECONDS = 600


def _confirm(args, seconds: float) -> bool:
    if args.yes or args.quick_test or seconds < LONG_RUN_SECONDS or not sys.stdin.isatty():
        return True
    return input("Continue with this run? (--yes skips this question) [y/N]: "
                 ).strip().lower() in ("y", "yes")


def _check_scaling(args) -> None:
    if args.shard and args.assemble:
        raise ConfigError("give --shard I/N (compute one shard) or --assemble (compute nothing), "
                          "not both")
    if (args.shard or args.assemble) and not args.resume:
        raise ConfigError("--fresh deletes every stored cell, the other shards' too; clear "
                          "the cell store once before starting the shards")
    if args.ray_address and args.executor != "ray":
        raise ConfigError(f"--ray-address {args.ray_address} needs --executor ray")


def main(argv=None) -> int:
    try:
        return run_command(argv)
    except KeyboardInterrupt:
        # Ctrl-C while torch imports, a model loads or validation reads files: nothing to
        # keep yet (a run in progress has already written its partial results).
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def run_command(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_scaling(args)
        configs, notes = configs_from_args(args)
        for note in notes:
            print(f"note: {note}", flush=True)
        for config in configs:
            print(describe(config), flush=True)
            validate(config)
        for config in configs:  # only once every config is valid: this creates folders
            check_output_location(config)
            for warning in config_warnings(config):
                print(f"warning: {warning}", file=sys.stderr, flush=True)
    except (ConfigError, CorruptFileError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # A plain `kill` then ends the run like Ctrl-C: the partial results are written first.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    status = EXIT_OK
    command = [*PROG.split(), *(sys.argv[1:] if argv is None else argv)]
    for config in configs:
        runner = PerplexityBenchmarkRunner(
            config, resume=args.resume, notes=notes, command=command,
            make_report=not args.no_report, executor=args.executor,
            ray_address=args.ray_address, threads=args.threads or 1, shard=args.shard,
            assemble=args.assemble, confirm=lambda seconds: _confirm(args, seconds),
            validated=True)
        try:
            runner.run()
        except RunDeclined:
            print("aborted: nothing computed")
            return EXIT_CONFIG
        except (ConfigError, CorruptFileError, DatasetError) as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_CONFIG
        except (ModelLoadError, ExecutorError, FetchError) as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_FAILED
        if runner.failed_cells() or runner.missing:
            status = EXIT_FAILED
    return status


if __name__ == "__main__":
    sys.exit(main())
