"""The checks of a run's tasks before any model loads (docs/tasks.md, Bad input): names,
files, choices, and whether every task fits every context length of the run (with the model's
tokenizer alone)."""
from dataclasses import replace

from .. import models
from .longbench import file_task_name, read_task_file
from .registry import HAYSTACKS, METRICS, SCORINGS, TASKS, TaskError
from .samples import TaskSpec, load_samples, task_names


def _positive(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_tasks(config, problems: list) -> None:
    """Appends each problem of config.tasks (ConfigError lists them all)."""
    tasks = config.tasks
    for field, value, choices in (("haystack", tasks.haystack, HAYSTACKS),
                                  ("scoring", tasks.scoring, SCORINGS),
                                  ("metric", tasks.metric, METRICS)):
        if value not in choices:
            problems.append(f"unknown task {field} {value!r}; valid: {', '.join(choices)}")
    for field in ("samples", "max_new_tokens"):
        if not _positive(getattr(tasks, field)):
            problems.append(f"tasks.{field} {getattr(tasks, field)!r} must be an integer >= 1")
    if not isinstance(tasks.question_aware, bool):
        problems.append(f"tasks.question_aware {tasks.question_aware!r} must be true or false")
    if not isinstance(tasks.names, list) or not isinstance(tasks.files, list):
        problems.append("tasks.names and tasks.files must be lists")
        return
    for name in tasks.names:
        if name not in TASKS:
            problems.append(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)} (or a "
                            "local JSONL file with --task-files)")
    seen = set(tasks.names)
    for path in tasks.files:
        name = file_task_name(path)
        if name in seen:
            problems.append(f"task file {path} is named {name!r} like another task of the run; "
                            "rename the file")
        seen.add(name)
        try:
            read_task_file(path)
        except (TaskError, OSError, UnicodeDecodeError) as err:
            problems.append(str(err))


def check_tasks_fit(config, problems: list) -> None:
    """Every task's first samples at every context length of the run, built with the model's
    tokenizer on the noise haystack (the fixed parts are what may not fit)."""
    try:
        tokenizer = models.load_tokenizer(config.model.name, config.model.trust_remote_code,
                                          config.model.cache_dir)
    except models.ModelLoadError as err:
        problems.append(str(err))
        return
    probe_config = replace(config, tasks=replace(config.tasks, haystack="noise",
                                                 samples=min(config.tasks.samples, 4)))
    for task in task_names(config):
        for L in config.context_lengths():
            try:
                load_samples(probe_config, tokenizer, TaskSpec(task, L, "dense", 0.0))
            except TaskError as err:
                problems.append(str(err))
                break
