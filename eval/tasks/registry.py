"""The task registry and the objects a task produces (docs/tasks.md, Tasks).

A synthetic task is a function (rng, words, depth) -> Layout registered with @task; the
prompt builder (eval/tasks/prompt.py) places the layout's needles into a haystack at their
depths and fills the cell's context length with it.
"""
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

HAYSTACKS = ("text", "noise")  # the first is the default
SCORINGS = ("teacher_forced", "generated")
METRICS = ("exact_match", "f1", "rouge_l")  # of generated answers (local task files)


class TaskError(ValueError):
    """A task that cannot run as asked; the message names the valid choices."""


@dataclass
class Layout:
    """One synthetic sample before it is tokenised: an instruction, needles to hide in the
    haystack at depths in [0, 1], the question, and the answers. `target` is what the
    prompt's last words expect next (the answers in the order the question asks for them);
    teacher-forced scoring scores it."""
    instruction: str
    needles: list  # [(depth, text)]
    question: str
    answers: list
    target: str
    depth: Optional[float]
    # Instead of a haystack: (tokens available, count(text) -> tokens) -> the whole context,
    # at most that long (common_words' list, which is sized to the context length).
    fill: Optional[Callable] = None


@dataclass
class Sample:
    """A tokenised sample: the prompt (context and question) and the target continuation."""
    prompt_ids: list  # the BOS token first when the model's tokenizer puts one before a text
    target_ids: list
    answers: list  # strings: generated scoring looks for each in the output
    # Where the question's tokens begin in prompt_ids: prompt_ids[:question_start] is the
    # context (with the BOS and instruction), which a protocol may compress before the
    # question arrives (docs/tasks.md, Prompt building).
    question_start: int
    depth: Optional[float] = None
    all_classes: Optional[list] = None

    @property
    def ids(self) -> list:
        """The teacher-forced window: prompt then target."""
        return self.prompt_ids + self.target_ids


@dataclass
class TaskSamples:
    """The samples of one (task, context length): what the runner's windows are for a
    perplexity cell."""
    task: str
    context_length: int
    samples: list
    description: str
    info: dict = field(default_factory=dict)  # recorded as the cell's provenance

    @property
    def input_ids(self) -> torch.Tensor:
        """[samples, shortest window]: the teacher-forced windows, cut to a common length, for
        the runner's size estimate (which reads the shape and times a forward of the first)."""
        shortest = min(len(s.ids) for s in self.samples)
        return torch.tensor([s.ids[:shortest] for s in self.samples], dtype=torch.long)

    @property
    def num_tokens(self) -> int:
        return sum(len(s.ids) for s in self.samples)


@dataclass(frozen=True)
class TaskEntry:
    name: str
    description: str
    layout: Callable  # (numpy Generator, words, depth) -> Layout
    multi_answer: bool  # several answers, all asked for


TASKS: dict = {}


def task(name: str, description: str, multi_answer: bool = False):
    """Decorator: registers a synthetic task's layout function under `name`."""
    def register(layout: Callable) -> Callable:
        TASKS[name] = TaskEntry(name, description, layout, multi_answer)
        return layout
    return register


def available_tasks() -> tuple:
    return tuple(TASKS)


def random_number(rng, digits: int) -> str:
    """A number of exactly `digits` digits (no leading zero)."""
    return str(int(rng.integers(10 ** (digits - 1), 10 ** digits)))


def other_depths(rng, count: int) -> list:
    """Depths of the needles that are not the measured one: uniform in [0, 1]."""
    return [float(d) for d in rng.random(count)]
