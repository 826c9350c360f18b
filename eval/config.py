"""Experiment configuration: the dataclasses, YAML loading and validation (docs/running.md).

The field names follow the original benchmark (ExperimentConfig, ModelConfig,
ContextLengthSweepConfig, SparsitySweepConfig, create_quick_test) so its YAML files and Python
calls keep working. `validate()` checks every value that can be checked without loading a model
(names, ranges, files, hub access, context lengths against the model's positions), and reports
all problems at once.
"""
import functools
import math
import os
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Optional, Union

import torch
import yaml

from cabattn import PROTOCOLS, checks, grid, protocol_options
from cabattn import methods as registry

from . import data, models
from .env import DEVICES, DTYPES
from .hub import hub_reachable
from .tasks.checks import check_tasks, check_tasks_fit

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
QUICK_TEST_YAML = CONFIG_DIR / "quick_test.yaml"
ICML_FULL_YAML = CONFIG_DIR / "icml_full.yaml"
DEFAULT_OUTPUT_DIR = "results/perplexity"



class ConfigError(ValueError):
    """A configuration that cannot run; the message lists every problem found."""


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"  # eval.models.DEFAULT_MODEL, a name, hub id or local folder
    torch_dtype: str = "auto"  # float16 on CUDA, float32 on the CPU
    device: str = "auto"  # cuda when present
    max_length: Optional[int] = None  # optional cap on the context lengths of this experiment
    trust_remote_code: bool = False  # hub code never runs unless asked
    cache_dir: Optional[str] = None


@dataclass
class ContextLengthSweepConfig:
    """PPL vs context length at one sparsity (Figure 4)."""
    enabled: bool = True
    context_lengths: list = field(default_factory=lambda: [512, 1024, 2048, 4096])
    fixed_sparsity: float = 0.9


@dataclass
class SparsitySweepConfig:
    """PPL vs sparsity at one context length (Figure 8, Table 3)."""
    enabled: bool = True
    sparsity_levels: list = field(default_factory=lambda: [0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99])
    fixed_context_length: int = 4096


@dataclass
class TaskConfig:
    """Tasks beyond perplexity (docs/tasks.md), run in the same sweeps as the datasets."""
    names: list = field(default_factory=list)  # synthetic tasks (eval.tasks.TASKS)
    files: list = field(default_factory=list)  # local JSONL files in LongBench's fields
    haystack: str = "text"  # text (pd-books) or noise
    samples: int = 20  # per (task, L): needle depths spread evenly over [0, 1]
    scoring: str = "teacher_forced"  # or generated (synthetic tasks; files are generated)
    metric: str = "f1"  # of generated answers of task files: exact_match, f1, rouge_l
    max_new_tokens: int = 32  # greedy generation
    # prefill protocol: the context ends after the question (SnapKV's setting) instead of
    # before it (kvpress's, question-agnostic compression)
    question_aware: bool = False

    @property
    def enabled(self) -> bool:
        return bool(self.names or self.files)


@dataclass
class ExperimentConfig:
    name: str = "perplexity_benchmark"
    description: str = "Language model perplexity under sparse attention / KV eviction"
    seed: int = 42
    model: ModelConfig = field(default_factory=ModelConfig)
    datasets: list = field(default_factory=lambda: ["wikitext-103"])
    methods: list = field(default_factory=lambda: ["dense", "h2o", "cab_v4"])
    # {method: {param: value}} (docs/methods.md); the protocol parameters below apply to all.
    method_params: dict = field(default_factory=dict)
    context_length_sweep: ContextLengthSweepConfig = field(
        default_factory=ContextLengthSweepConfig)
    sparsity_sweep: SparsitySweepConfig = field(default_factory=SparsitySweepConfig)
    tasks: TaskConfig = field(default_factory=TaskConfig)
    protocol: str = "mask"
    block_size: Union[str, int] = "auto"
    causal_selection: str = "strict"
    k_min: int = 64  # the smallest token budget K (docs/methods.md)
    kv_chunk: int = 1
    diagnostics: bool = False  # mask protocol: measure attention recall (an oracle pass)
    decoding: str = "dense"  # mask protocol: what a continuation's queries attend to
    kernels: str = "extension"  # the compiled operators, or "reference" (docs/selfcheck.md)
    # Perplexity windows: score only each window's last `continuation` tokens, the rest being
    # its context (docs/protocols.md, the split); None: the protocol's default (prefill:
    # L // 8; mask and kv: the whole window).
    continuation: Optional[int] = None
    # Key-token perplexity in every cell (docs/metrics.md): a few dense forwards per (dataset, L).
    key_tokens: bool = True
    # Seeds of a randomised method's cells (seed, seed + 1, ...): mean and spread over them.
    seeds: int = 1
    # Fixed token budgets (cache sizes) run at every context length, besides the sweeps.
    budget_tokens: Optional[list] = None
    max_windows: Optional[int] = None  # windows per cell, evenly spaced over the corpus
    # Windows per forward: the numbers match batch size 1 to rounding (not part of a cell's key).
    batch_size: int = 1
    data_file: Optional[str] = None  # a local .txt/.jsonl/.parquet corpus
    text_field: str = "text"
    output_dir: str = DEFAULT_OUTPUT_DIR
    # Replacement values used when the Hugging Face hub cannot be reached (the quick test).
    offline_fallback: Optional[dict] = None

    def to_dict(self) -> dict:
        return asdict(self)

    def sweep_points(self) -> list:
        """Every (context length, sparsity) point of the two sweeps."""
        points = []
        if self.context_length_sweep.enabled:
            s = self.context_length_sweep.fixed_sparsity
            points += [(int(L), float(s)) for L in self.context_length_sweep.context_lengths]
        if self.sparsity_sweep.enabled:
            L = self.sparsity_sweep.fixed_context_length
            points += [(int(L), float(s)) for s in self.sparsity_sweep.sparsity_levels]
        return points

    def context_lengths(self) -> list:
        return sorted({L for L, _ in self.sweep_points()})


# ---------------------------------------------------------------------------------------------
# Building configs from mappings (YAML) with clear errors for unknown keys and wrong types.

def _build(cls, data, where: str):
    if data is None:
        return cls()
    if is_dataclass(data):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {', '.join(known)}")
    nested = {"model": ModelConfig, "context_length_sweep": ContextLengthSweepConfig,
              "sparsity_sweep": SparsitySweepConfig, "tasks": TaskConfig}
    values = {}
    for key, value in data.items():
        if key == "tasks" and cls is ExperimentConfig and isinstance(value, list):
            value = {"names": value}  # `tasks: [passkey, niah_single]`
        if key in nested and cls is ExperimentConfig:
            value = _build(nested[key], value, f"{where}.{key}")
        values[key] = value
    return cls(**values)


def experiment_from_dict(data: dict, where: str = "config") -> ExperimentConfig:
    return _build(ExperimentConfig, data, where)


def _merge(base: dict, override: dict) -> dict:
    """Nested dict update: mappings merge key by key, everything else replaces."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path) -> list:
    """The experiments of a YAML (or JSON) file: one experiment mapping, or
    `experiments: [...]` (the original BenchmarkConfig layout) whose entries may share
    `defaults:`. Raises ConfigError naming the file for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping, got "
                          f"{type(data).__name__}")
    if "experiments" in data:
        defaults = data.get("defaults") or {}
        extra = sorted(set(data) - {"experiments", "defaults"})
        if extra:
            raise ConfigError(f"{path}: unknown top-level key(s) {extra} next to 'experiments'; "
                              "valid: experiments, defaults")
        experiments = data["experiments"]
        if not isinstance(experiments, list) or not all(isinstance(e, dict) for e in experiments):
            raise ConfigError(f"{path}: 'experiments' must be a list of mappings")
        if not isinstance(defaults, dict):
            raise ConfigError(f"{path}: 'defaults' must be a mapping")
        return [experiment_from_dict(_merge(defaults, exp), f"{path}: experiments[{i}]")
                for i, exp in enumerate(experiments)]
    return [experiment_from_dict(data, str(path))]


def apply_offline_fallback(config: ExperimentConfig, hub_online: bool) -> tuple:
    """(config to run, note saying which variant was chosen). The fallback block replaces the
    hub model and corpora by the embedded offline ones when the hub is unreachable."""
    if config.offline_fallback is None:
        return config, None
    if hub_online:
        return config, "the Hugging Face hub is reachable: running the original configuration"
    merged = _merge(config.to_dict(), config.offline_fallback)
    merged["offline_fallback"] = None
    fallback = experiment_from_dict(merged, f"{config.name}.offline_fallback")
    note = ("the Hugging Face hub is unreachable: running the offline defaults "
            f"(model {fallback.model.name}, datasets {', '.join(fallback.datasets)}) instead of "
            f"the original (model {config.model.name}, datasets {', '.join(config.datasets)})")
    return fallback, note


def quick_test_config(hub_online: Optional[bool] = None) -> tuple:
    """(configs/quick_test.yaml, on its offline defaults when the hub is unreachable; a note
    saying which variant was chosen)."""
    online = hub_reachable() if hub_online is None else hub_online
    return apply_offline_fallback(load_config(QUICK_TEST_YAML)[0], online)


def default_config(hub_online: Optional[bool] = None) -> tuple:
    """(the experiment `python -m eval.run` runs without a preset, a file or --datasets; a note
    or None): its hub corpus, or every offline corpus when the hub is unreachable."""
    config = ExperimentConfig(name="perplexity")
    if hub_reachable() if hub_online is None else hub_online:
        return config, None
    note = (f"the Hugging Face hub is unreachable: running on the offline corpora "
            f"({', '.join(data.OFFLINE_DATASETS)}) instead of {', '.join(config.datasets)} "
            "(--datasets chooses)")
    config.datasets = list(data.OFFLINE_DATASETS)
    return config, note


def create_quick_test(hub_online: Optional[bool] = None) -> ExperimentConfig:
    """The quick test (original API); the variant chosen is noted in `description`."""
    config, note = quick_test_config(hub_online)
    config.description = f"{config.description} ({note})"
    return config


# ---------------------------------------------------------------------------------------------
# Validation: every check that needs no model weights.

def _check_context_lengths(config: ExperimentConfig, problems: list) -> None:
    lengths = []
    sweeps = [("context_length_sweep.context_lengths", config.context_length_sweep.context_lengths)]
    sweeps.append(("sparsity_sweep.fixed_context_length",
                   [config.sparsity_sweep.fixed_context_length]))
    for where, values in sweeps:
        if not isinstance(values, (list, tuple)) or not values:
            problems.append(f"{where} must be a non-empty list of integers, got {values!r}")
            continue
        for L in values:
            if not checks.is_integer(L) or L < 2:
                problems.append(f"{where}: context length {L!r} must be an integer >= 2")
            else:
                lengths.append(L)
    cap = config.model.max_length
    if cap is not None:
        for L in sorted(set(lengths)):
            if L > cap:
                problems.append(f"context length {L} exceeds model.max_length {cap}")


def _check_sparsities(config: ExperimentConfig, problems: list) -> None:
    values = [("context_length_sweep.fixed_sparsity", config.context_length_sweep.fixed_sparsity)]
    levels = config.sparsity_sweep.sparsity_levels
    if not isinstance(levels, (list, tuple)) or not levels:
        problems.append(f"sparsity_sweep.sparsity_levels must be a non-empty list, got {levels!r}")
        levels = []
    values += [("sparsity_sweep.sparsity_levels", s) for s in levels]
    for where, s in values:
        try:
            grid.check_options(s)
        except ValueError as err:
            problems.append(f"{where}: {err}")


def _check_choice(problems: list, where: str, value, choices) -> None:
    if value not in choices:
        problems.append(f"{where} {value!r} is not one of: {', '.join(map(str, choices))}")


def _check_methods(config: ExperimentConfig, problems: list) -> None:
    names = registry.available()
    if not config.methods:
        problems.append("no methods given; valid: " + ", ".join(names))
    problems += filter(None, (checks.unknown("method", name, names) for name in config.methods))
    if not isinstance(config.method_params, dict):
        problems.append(f"method_params must map a method to its parameters, got "
                        f"{config.method_params!r}")
        return
    for name, params in config.method_params.items():
        if name not in names:
            problems.append(f"method_params: {checks.unknown('method', name, names)}")
        elif not isinstance(params, dict):
            problems.append(f"method_params.{name} must be a mapping, got {params!r}")
    # Every method's parameters, run or not: a typo must not wait for the run that uses it.
    for name in dict.fromkeys([*config.methods, *config.method_params]):
        if name in names and isinstance(config.method_params.get(name, {}), dict):
            try:
                method = registry.get_method(name, **config.method_params.get(name, {}))
                if name in config.methods and config.protocol in PROTOCOLS:
                    # a method without a rule for the protocol (oracle_topk under kv)
                    method.check_protocol(config.protocol)
            except (ValueError, TypeError) as err:
                problems.append(f"method {name!r}: {err}")
    try:  # the protocol options both protocols share, checked as the protocols check them
        grid.check_options(0.0, config.block_size, config.k_min)
    except ValueError as err:
        problems.append(str(err))
    for option in protocol_options().values():  # and each protocol's own, as declared
        message = checks.problem(option.name, getattr(config, option.name), option.check)
        if message:
            problems.append(message)


def _check_datasets(config: ExperimentConfig, problems: list) -> None:
    if not config.datasets and not config.tasks.enabled:
        problems.append("no datasets or tasks given; valid datasets: "
                        + ", ".join(data.available_datasets()))
    found = len(problems)
    for name in config.datasets:
        try:
            data.validate_dataset(name, data_file=config.data_file)
        except (ValueError, FileNotFoundError, OSError) as err:
            problems.append(str(err))
    if config.data_file is not None and len(problems) == found and config.datasets:
        try:  # read it now: a broken line must not wait until the model has loaded
            data.check_data_file(config.datasets[0], config.data_file, config.text_field)
        except (ValueError, OSError) as err:
            problems.append(str(err))


@functools.lru_cache(maxsize=8)
def _model_max_positions(name: str, trust_remote_code: bool, cache_dir) -> int:
    """The longest context a model allows, read from its configuration alone (no weights)."""
    return models.max_positions(models.load_model_config(name, trust_remote_code, cache_dir))


def _check_model(config: ExperimentConfig, problems: list) -> None:
    """Context lengths against the model's positions."""
    try:
        positions = _model_max_positions(config.model.name, config.model.trust_remote_code,
                                         config.model.cache_dir)
    except (ValueError, OSError, RuntimeError) as err:
        problems.append(f"model {config.model.name!r} cannot be used: {err}")
        return
    for L in config.context_lengths():
        if L > positions:
            problems.append(f"context length {L} exceeds what model {config.model.name!r} "
                            f"allows ({positions} positions)")


def config_warnings(config: ExperimentConfig) -> list:
    """What is valid but probably not meant (a valid config assumed): parameters of methods
    the run does not include, and sparsity points whose budget leaves no method a choice."""
    found = [f"parameters {params} are given for method {name!r}, which this run does not "
             f"include (methods: {', '.join(config.methods)}); they have no effect"
             for name, params in config.method_params.items() if name not in config.methods]
    sparse = [m for m in config.methods if m != "dense"]
    if not sparse or config.protocol != "mask":
        return found
    shift = 1 if config.causal_selection == "strict" else 0
    for L, s in dict.fromkeys(config.sweep_points()):
        if s == 0.0:
            continue
        budget = grid.token_budget(L, s, config.k_min)
        block = grid.resolve_block_size(config.block_size, L)
        # Each row keeps its diagonal (and, strict, the block before): with no more blocks
        # than that, every method keeps the same layout and gives the same perplexity.
        if math.ceil(budget / block) <= 1 + shift:
            choices = [b for b in grid.BLOCK_SIZES if math.ceil(budget / b) > 1 + shift]
            advice = (f"block size {choices[-1]} (--block-size {choices[-1]}) would leave a "
                      "choice" if choices else "no block size leaves a choice; lower the "
                      "sparsity or raise k_min")
            blocks = math.ceil(budget / block)
            layout = "its diagonal block" if blocks == 1 else "its diagonal and the block before"
            found.append(f"at L = {L}, s = {s:g} the budget K = {budget} tokens is {blocks} "
                         f"block(s) of {block} per row: every method keeps the same layout "
                         f"(each row {layout}) and gives the same perplexity; {advice}")
    return found


# The longest file name a run writes: atomic_path's temporary for NAME_latest.json
# (".NAME_latest.json." + mkstemp's 8 random characters + ".tmp").
_LONGEST_NAME = ".{name}_latest.json.XXXXXXXX.tmp"


def check_output_location(config: ExperimentConfig) -> None:
    """Create the output folder and the cell store's folder and write and remove a file with
    the longest name the run will need: ConfigError now, not after the first cell."""
    folder = Path(config.output_dir)
    longest = _LONGEST_NAME.format(name=config.name)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        limit = os.pathconf(folder, "PC_NAME_MAX")
        if len(os.fsencode(longest)) > limit:
            spare = limit - len(os.fsencode(_LONGEST_NAME.format(name="")))
            raise ConfigError(f"name {config.name[:40]!r}... is too long: "
                              f"{len(os.fsencode(config.name))} bytes, and the run's longest "
                              f"file name (.NAME_latest.json.XXXXXXXX.tmp) must fit in {limit} "
                              f"bytes; give --name at most {spare} bytes")
        (folder / f"{config.name}.cells").mkdir(exist_ok=True)
        probe = folder / longest.replace("XXXXXXXX", f"{os.getpid():08d}"[-8:])
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"output folder {str(folder)!r} cannot be written: "
                          f"{err.strerror or err} ({err.filename or folder}); give --output-dir "
                          "a folder you can create and write") from None


def _check_kernels(config: ExperimentConfig, problems: list) -> None:
    """An extension with kernels for the run's device (a build without nvcc has CPU kernels
    only), said here, before any model loads; the path itself is a protocol option."""
    from cabattn import ops
    device = str(config.model.device)
    if (config.kernels == "extension" and device.startswith("cuda")
            and not ops.has_kernels_for("cuda")):
        problems.append(f"model.device {device!r}: cabattn's extension was built without CUDA "
                        "kernels (CPU only); rebuild it on this machine with nvcc present "
                        "(python setup.py build_ext --inplace) or run on the reference path "
                        "(--kernels reference)")


def validate(config: ExperimentConfig, check_model: bool = True) -> None:
    """Raise ConfigError listing every problem; loads no weights."""
    problems = []
    if not isinstance(config.name, str) or not config.name or "/" in config.name:
        problems.append(f"name {config.name!r} must be a non-empty file name without '/'")
    if not checks.is_integer(config.seed):
        problems.append(f"seed {config.seed!r} must be an integer")
    if message := checks.unknown("protocol", config.protocol, PROTOCOLS):
        problems.append(message)
    _check_choice(problems, "model.torch_dtype", config.model.torch_dtype, ("auto", *DTYPES))
    device = str(config.model.device)
    if device not in DEVICES and not device.startswith("cuda:"):
        problems.append(f"model.device {device!r} is not one of: {', '.join(DEVICES)}, cuda:N")
    elif device.startswith("cuda"):
        if not torch.cuda.is_available():
            problems.append(f"model.device {device!r} was asked for but no CUDA device is "
                            "present; use --device cpu or auto")
    budgets = config.budget_tokens
    if budgets is not None and (not isinstance(budgets, list) or not budgets or not all(
            checks.is_integer(K) and K >= config.k_min for K in budgets)):
        problems.append(f"budget_tokens {budgets!r} must be a non-empty list of integers >= "
                        f"k_min = {config.k_min} (token budgets) or null")
    problems += filter(None, (checks.problem("seeds", config.seeds, checks.positive_int),
                              checks.problem("key_tokens", config.key_tokens, checks.boolean)))
    if config.continuation is not None:
        if checks.positive_int(config.continuation):
            problems.append(f"continuation {config.continuation!r} must be a positive integer "
                            "(tokens) or null")
        elif config.datasets and config.continuation >= min(config.context_lengths() or [2]):
            problems.append(f"continuation {config.continuation} must be shorter than every "
                            f"context length ({', '.join(map(str, config.context_lengths()))})")
    if config.max_windows is not None and checks.positive_int(config.max_windows):
        problems.append(f"max_windows {config.max_windows!r} must be an integer >= 1 or null")
    if checks.positive_int(config.batch_size):
        problems.append(f"batch_size {config.batch_size!r} must be an integer >= 1")
    if config.data_file is not None and not Path(config.data_file).is_file():
        problems.append(f"data file {config.data_file!r} does not exist")
    if not (config.context_length_sweep.enabled or config.sparsity_sweep.enabled):
        problems.append("both sweeps are disabled: nothing to run")
    _check_context_lengths(config, problems)
    _check_sparsities(config, problems)
    _check_methods(config, problems)
    _check_datasets(config, problems)
    _check_kernels(config, problems)
    check_tasks(config, problems)
    if check_model and not problems:
        _check_model(config, problems)
    if check_model and not problems and config.tasks.enabled:
        check_tasks_fit(config, problems)
    if problems:
        raise ConfigError(f"invalid configuration {config.name!r}:\n  - " + "\n  - ".join(problems))
