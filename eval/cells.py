"""Any cell the runner plans: a perplexity cell (eval.cell, a RunSpec) or a task cell
(eval.tasks.cell, a TaskSpec; docs/tasks.md). The runner keys cells and the executors compute
them through these two functions, which hand each spec to its own module."""
from . import cell
from .tasks import cell as task_cell
from .tasks.samples import TaskSpec


def cell_key(config, spec) -> dict:
    """Everything that defines the cell's numbers (eval.cell.cell_key, or the task's)."""
    return (task_cell.cell_key if isinstance(spec, TaskSpec) else cell.cell_key)(config, spec)


def try_cell(config, loaded, windows, spec, progress: bool = False) -> dict:
    """R of the cell, or a failed R (null metrics and the error) when it fails."""
    if isinstance(spec, TaskSpec):
        return cell.try_cell(config, loaded, windows, spec, progress=progress,
                             compute=task_cell.compute_task_cell)
    return cell.try_cell(config, loaded, windows, spec, progress=progress)
