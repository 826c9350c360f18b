"""What a task cell computes and from what (docs/tasks.md, Cells and outputs): `TaskSpec`
mirrors eval.cell.RunSpec (every method at s = 0 runs as dense) with `dataset` =
"task:NAME", so that the runner's grouping, claims, provenance and shards treat a (task, L) as
one more (dataset, L) group, whose samples play the windows' part."""
from dataclasses import dataclass

from .longbench import file_samples, file_task_name
from .prompt import synthetic_samples


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

    # A task cell runs once, with the run's seed (which also seeds its samples): --seeds
    # repeats perplexity cells only (docs/statistics.md).
    seed_offset = 0

    def dense(self) -> "TaskSpec":
        return TaskSpec(self.task, self.context_length, "dense", 0.0)

    def with_seeds(self, seeds: int) -> list:
        return [self]

    @property
    def label(self) -> str:
        if self.method == "dense":
            return f"{self.task} dense L={self.context_length}"
        return f"{self.task} {self.method} s={self.sparsity:g} L={self.context_length}"


def task_names(config) -> list:
    """The run's tasks: the synthetic ones, then one per local task file (its stem)."""
    return list(config.tasks.names) + [file_task_name(path) for path in config.tasks.files]


def file_for(config, task: str):
    return next((p for p in config.tasks.files if file_task_name(p) == task), None)


def scoring_of(config, task: str) -> str:
    """Local task files are generated and scored by the metric; synthetic tasks as asked."""
    return "generated" if file_for(config, task) else config.tasks.scoring


def load_samples(config, tokenizer, spec: TaskSpec):
    """The samples of (task, L): generated, or read from the task's file."""
    path = file_for(config, spec.task)
    if path is not None:
        return file_samples(path, tokenizer, spec.context_length, config.tasks.samples,
                            config.tasks.max_new_tokens)
    return synthetic_samples(spec.task, tokenizer, spec.context_length, config.tasks.samples,
                             config.seed, config.tasks.haystack, cache_dir=config.model.cache_dir)
