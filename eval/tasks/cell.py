"""The task cell (docs/tasks.md, Cells and outputs): one (task, method, sparsity, context
length), keyed and computed like a perplexity cell (eval.cell), its samples scored instead of
windows. eval.cells hands the runner and the executors the right one of the two."""
import time
from dataclasses import replace

import cabattn
import torch
from tqdm.auto import tqdm

from .. import env, logits
from ..cell import RunSpec, attention, data_identity, now
from ..cell import cell_key as perplexity_key
from ..results import finite_or_none
from . import scoring
from .samples import TaskSpec, file_for, scoring_of

# Bump when a generator or the prompt builder changes the samples, so stored cells are redone.
GENERATOR_VERSION = 1


def context_split(config) -> str:
    """Where a task sample's context ends under the run's protocol (docs/tasks.md): "question"
    (before it) for a protocol that compresses its context once unless tasks.question_aware,
    else "prompt" (after the question: the answer is the continuation)."""
    one_shot = cabattn.get_protocol(config.protocol).one_shot
    return "question" if one_shot and not config.tasks.question_aware else "prompt"


def context_length(sample, split: str) -> int:
    return sample.question_start if split == "question" else len(sample.prompt_ids)


def cell_key(config, spec: TaskSpec) -> dict:
    """Everything that defines a task cell's numbers (the perplexity key's model, protocol and
    method part, with the task's samples in place of the windows)."""
    key = perplexity_key(config, RunSpec(spec.dataset, spec.context_length, spec.method,
                                         spec.sparsity))
    for name in ("dataset", "data_file", "text_field", "max_windows", "continuation"):
        key.pop(name)
    path = file_for(config, spec.task)
    scored = scoring_of(config, spec.task)
    key.update(task=spec.task, generator_version=GENERATOR_VERSION,
               samples=config.tasks.samples, scoring=scored)
    if spec.method != "dense":
        key.update(context_split=context_split(config))
    if path is None:
        key.update(haystack=None if spec.task == "common_words" else config.tasks.haystack)
    else:
        key.update(task_file=data_identity(replace(config, data_file=path)),
                   metric=config.tasks.metric)
    if scored == "generated":
        key.update(max_new_tokens=config.tasks.max_new_tokens)
    return key


def compute_task_cell(config, loaded, samples, spec: TaskSpec, progress: bool = False) -> dict:
    """R of one task cell: every sample scored under the cell's attention (split where the
    sample's context ends: context_split), the summary (accuracy with its interval, answer
    NLL, accuracy by depth), the per-sample scores, the protocol's record and the cost.
    Writes nothing; raises on failure."""
    device = env.resolve_device(config.model.device)
    model, tokenizer = loaded.model, loaded.tokenizer
    scored = scoring_of(config, spec.task)
    metric = config.tasks.metric if file_for(config, spec.task) else None
    max_new = config.tasks.max_new_tokens
    split = None if spec.method == "dense" else context_split(config)
    torch.manual_seed(config.seed)
    env.reset_peak_memory(device)
    records = []
    defer = logits.can_defer(model)
    start = time.perf_counter()
    protocol = attention(config, model, spec)
    with protocol as stats, torch.inference_mode():
        for sample in tqdm(samples.samples, desc=spec.label, unit="sample",
                           disable=not progress, leave=False, dynamic_ncols=True):
            context = None if split is None else context_length(sample, split)
            if scored == "teacher_forced":
                record = scoring.teacher_forced(model, sample, device, context, defer)
            else:
                prompt = torch.tensor([sample.prompt_ids], device=device)
                new = protocol.generate(prompt, max_new, budget_length=len(sample.ids),
                                        context_length=context)
                record = scoring.generated(sample, new[0].tolist(), tokenizer, metric)
            records.append({"depth": sample.depth, **record})
    env.synchronize(device)
    wall = time.perf_counter() - start
    memory, memory_kind = env.peak_memory_mb(device)
    result = {"kind": "task", "task": spec.task, "scoring": scored, "metric": metric,
              "context_split": split, **scoring.summarize(records, config.seed)}
    result.update(stats.record())
    result.update(per_sample=records, wall_seconds=wall,
                  tokens_per_second=samples.num_tokens / wall, peak_memory_mb=memory,
                  peak_memory_kind=memory_kind, finished=now())
    return {name: finite_or_none(v) if isinstance(v, float) else v
            for name, v in result.items()}


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
