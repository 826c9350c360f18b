"""The task cell (docs/tasks.md, Cells and outputs): one (task, method, sparsity, context
length), planned by the same sweeps as the perplexity cells, keyed, computed and stored like them.

`TaskSpec` mirrors eval.cell.RunSpec (what is computed: every method at s = 0 runs as dense)
with `dataset` = "task:NAME", so the runner's grouping, claims, provenance and shards treat it
as one more (dataset, L) group; the samples of a (task, L) play the windows' part.
"""
import time
from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from .. import env
from ..results import finite_or_none
from . import scoring

# Bump when a generator or the prompt builder changes the samples, so stored cells are redone.
GENERATOR_VERSION = 1


@dataclass(frozen=True)
class TaskSpec:
    task: str
    context_length: int
    method: str
    sparsity: float

    @classmethod
    def for_cell(cls, task: str, context_length: int, method: str, sparsity: float):
        if method == "dense" or sparsity == 0.0:
            return cls(task, context_length, "dense", 0.0)
        return cls(task, context_length, method, float(sparsity))

    @property
    def dataset(self) -> str:
        return f"task:{self.task}"

    def dense(self) -> "TaskSpec":
        return TaskSpec(self.task, self.context_length, "dense", 0.0)

    @property
    def label(self) -> str:
        if self.method == "dense":
            return f"{self.task} dense L={self.context_length}"
        return f"{self.task} {self.method} s={self.sparsity:g} L={self.context_length}"


def task_names(config) -> list:
    """The run's tasks: the synthetic ones, then one per local task file (its stem)."""
    from .longbench import file_task_name
    return list(config.tasks.names) + [file_task_name(path) for path in config.tasks.files]


def plan_task_cells(config) -> list:
    """The task cells, by the same sweeps as the perplexity cells (eval.runner.plan_cells) with
    the tasks in the datasets' place."""
    from ..runner import plan_cells
    cells = plan_cells(replace(config, datasets=task_names(config)))
    return [replace(cell, spec=TaskSpec.for_cell(cell.dataset, cell.spec.context_length,
                                                 cell.spec.method, cell.spec.sparsity))
            for cell in cells]


def plan_task_runs(config) -> list:
    """Unique task computations, grouped by (task, L) with dense first."""
    specs = {cell.spec for cell in plan_task_cells(config)}
    specs |= {spec.dense() for spec in specs}
    order = {name: i for i, name in enumerate(task_names(config))}
    methods = {name: i for i, name in enumerate(["dense", *config.methods])}
    return sorted(specs, key=lambda s: (order[s.task], s.context_length, methods[s.method],
                                        s.sparsity))


def file_for(config, task: str):
    from .longbench import file_task_name
    return next((p for p in config.tasks.files if file_task_name(p) == task), None)


def scoring_of(config, task: str) -> str:
    """Local task files are generated and scored by the metric; synthetic tasks as asked."""
    return "generated" if file_for(config, task) else config.tasks.scoring


def cell_key(config, spec: TaskSpec) -> dict:
    """Everything that defines a task cell's numbers (the perplexity key's model, protocol and
    method part, with the task's samples in place of the windows)."""
    from ..cell import RunSpec, cell_key as perplexity_key, data_identity
    key = perplexity_key(config, RunSpec(spec.dataset, spec.context_length, spec.method,
                                         spec.sparsity))
    for name in ("dataset", "data_file", "text_field", "max_windows"):
        key.pop(name)
    path = file_for(config, spec.task)
    scored = scoring_of(config, spec.task)
    key.update(task=spec.task, generator_version=GENERATOR_VERSION,
               samples=config.tasks.samples, scoring=scored)
    if path is None:
        key.update(haystack=None if spec.task == "common_words" else config.tasks.haystack)
    else:
        key.update(task_file=data_identity(replace(config, data_file=path)),
                   metric=config.tasks.metric)
    if scored == "generated":
        key.update(max_new_tokens=config.tasks.max_new_tokens)
    return key


def load_samples(config, tokenizer, spec: TaskSpec):
    """The samples of (task, L): generated, or read from the task's file."""
    path = file_for(config, spec.task)
    if path is not None:
        from .longbench import file_samples
        return file_samples(path, tokenizer, spec.context_length, config.tasks.samples,
                            config.tasks.max_new_tokens)
    from .prompt import synthetic_samples
    return synthetic_samples(spec.task, tokenizer, spec.context_length, config.tasks.samples,
                             config.seed, config.tasks.haystack, cache_dir=config.model.cache_dir)


def kv_protocol(config, model, spec: TaskSpec):
    """The KVProtocol of a sparse cell, built as cabattn.apply builds it (generation needs the
    protocol itself: KVProtocol.generate)."""
    import cabattn
    from ..cell import protocol_settings
    settings = protocol_settings(config, spec)
    settings.pop("protocol")
    return cabattn.KVProtocol(model, spec.method, spec.sparsity, seed=config.seed, **settings,
                              **config.method_params.get(spec.method, {}))


def compute_task_cell(config, loaded, samples, spec: TaskSpec, progress: bool = False) -> dict:
    """R of one task cell: every sample scored under the cell's attention, the summary
    (accuracy with its interval, answer NLL, accuracy by depth), the per-sample scores, the
    protocol's record and the cost. Writes nothing; raises on failure."""
    from ..cell import attention, now
    device = env.resolve_device(config.model.device)
    model, tokenizer = loaded.model, loaded.tokenizer
    scored = scoring_of(config, spec.task)
    metric = config.tasks.metric if file_for(config, spec.task) else None
    max_new = config.tasks.max_new_tokens
    own = model.config._attn_implementation
    torch.manual_seed(config.seed)
    env.reset_peak_memory(device)
    kv = scored == "generated" and spec.method != "dense" and config.protocol == "kv"
    # decode-time eviction needs the KVProtocol itself (its generate), not just its stats
    generator = kv_protocol(config, model, spec) if kv else None
    records = []
    start = time.perf_counter()
    with (generator or attention(config, model, spec)) as stats, torch.inference_mode():
        for sample in tqdm(samples.samples, desc=spec.label, unit="sample",
                           disable=not progress, leave=False, dynamic_ncols=True):
            prompt = torch.tensor([sample.prompt_ids], device=device)
            if scored == "teacher_forced":
                record = scoring.teacher_forced(model, sample, device)
            else:
                if kv:
                    new = generator.generate(prompt, max_new, budget_length=len(sample.ids))
                    new = new[0].tolist()
                else:
                    new = scoring.greedy_cached(model, prompt, max_new, own)
                record = scoring.generated(sample, new, tokenizer, metric)
            records.append({"depth": sample.depth, **record})
    env.synchronize(device)
    wall = time.perf_counter() - start
    memory, memory_kind = env.peak_memory_mb(device)
    result = {"kind": "task", "task": spec.task, "scoring": scored, "metric": metric,
              **scoring.summarize(records, config.seed)}
    if scored == "generated":
        result["protocol_decoding"] = ("dense decoding after a block-sparse prefill"
                                       if config.protocol == "mask" and spec.method != "dense"
                                       else "decode-time eviction" if kv else "dense")
    result.update(stats.record())
    result.update(per_sample=records, wall_seconds=wall,
                  tokens_per_second=samples.num_tokens / wall, peak_memory_mb=memory,
                  peak_memory_kind=memory_kind, finished=now())
    return {name: finite_or_none(v) if isinstance(v, float) else v
            for name, v in result.items()}


def assemble_tasks(config, outcomes: dict) -> dict:
    """The results' tasks section: tasks[TASK][METHOD][sweep][point] = R, shaped like the
    perplexity results (eval.results.assemble), each R with dense's accuracy beside its own
    (and dense's perplexity of the same windows, for teacher-forced cells)."""
    from ..results import assemble
    cells = plan_task_cells(config)
    tasks = assemble(cells, outcomes, {})["results"]
    for cell in cells:
        record = tasks.get(cell.dataset, {}).get(cell.method, {}).get(cell.sweep, {}).get(
            cell.point)
        if record is not None:
            record["dense_accuracy"] = outcomes.get(cell.spec.dense(), {}).get("accuracy")
    return tasks


def summary_line(spec: TaskSpec, result: dict, dense) -> str:
    """The one line a finished task cell prints (like a perplexity cell's)."""
    low, high = result["accuracy_ci95"]
    versus = (f" (dense {dense['accuracy']:.2f})" if spec.method != "dense" and dense
              and dense.get("accuracy") is not None else "")
    nll = (f"  answer NLL {result['answer_nll']:.3f}  window PPL {result['perplexity']:.3f}"
           if result.get("answer_nll") is not None else "")
    return (f"{spec.label:<40} acc {result['accuracy']:.2f} [{low:.2f}, {high:.2f}]{versus}  "
            f"n={result['samples']}{nll}  density {result['density']:.3f}  "
            f"{result['wall_seconds']:.1f} s")
