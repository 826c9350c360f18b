"""Tasks beyond perplexity (docs/tasks.md): samples of (context, question, answers) scored in
the same cells, under the same methods and protocols, as the perplexity windows.

A task is one entry of TASKS, registered by the @task decorator on the function that lays out
one sample (eval/tasks/passkey.py, niah.py, variable_tracking.py, common_words.py: the
RULER-style synthetic tasks); a local JSONL file in LongBench's fields is a task too
(eval/tasks/longbench.py). eval/tasks/prompt.py turns a layout into token ids that fill the
cell's context length, eval/tasks/scoring.py scores a sample teacher-forced or by greedy
generation, eval/tasks/cell.py is the task cell the runner plans, computes and stores.
"""
from .registry import (HAYSTACKS, METRICS, SCORINGS, TASKS, Layout, Sample, TaskError,
                       TaskSamples, available_tasks, task)
# in the order --help lists them
from . import passkey, niah, variable_tracking, common_words  # noqa: F401,E402,I001

__all__ = ["HAYSTACKS", "METRICS", "SCORINGS", "TASKS", "Layout", "Sample", "TaskError",
           "TaskSamples", "available_tasks", "task"]
