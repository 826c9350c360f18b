"""The task outputs of a results file (docs/tasks.md, Cells and outputs), written by eval.report:

- the accuracy table: method x (L, s) per task, each accuracy with its 95% interval and the
  change of the windows' perplexity against dense (would perplexity have said so?), markdown;
- the needle heatmap: accuracy by needle depth x context length (x sparsity when the run has
  one context length), one panel per method, one figure per task;
- accuracy against perplexity change: per task, each method's points over its sparsities.
"""
from dataclasses import dataclass
from pathlib import Path

from ..plotting import legend_below, save_figure, style_of


@dataclass
class TaskPoint:
    task: str
    method: str
    context_length: int
    sparsity: float
    sweep: str
    result: dict


def task_points(results: dict) -> list:
    """Every finished task cell of a results dict, once per (task, method, L, s)."""
    seen, out = set(), []
    for task, methods in (results.get("tasks") or {}).items():
        for method, sweeps in methods.items():
            for sweep, cells in sweeps.items():
                for r in cells.values():
                    if not r or r.get("accuracy") is None:
                        continue
                    key = (task, method, r["context_length"], float(r["sparsity"]))
                    if key not in seen:
                        seen.add(key)
                        out.append(TaskPoint(*key, sweep, r))
    return out


def task_cell_text(r: dict, number=lambda v: f"{v:.2f}") -> str:
    """'accuracy [low, high], PPL +x.x%' of a task cell; number(accuracy) writes the accuracy."""
    low, high = r["accuracy_ci95"]
    text = f"{number(r['accuracy'])} [{low:.2f}, {high:.2f}]"
    if r.get("delta_vs_dense") is not None and r.get("method_run") != "dense":
        text += f", PPL {r['delta_vs_dense'] * 100:+.1f}%"
    return text


def accuracy_tables(results: dict) -> list:
    """Per task: (task, caption, columns [(L, s)], rows [(method, [TaskPoint or None per
    column])])."""
    pts = task_points(results)
    protocol = results.get("config", {}).get("protocol", "?")
    tables = []
    for task in dict.fromkeys(p.task for p in pts):
        mine = [p for p in pts if p.task == task]
        columns = sorted({(p.context_length, p.sparsity) for p in mine})
        first = mine[0].result
        caption = (f"{first.get('scoring', '').replace('_', '-')}, {first['samples']} samples, "
                   f"{protocol} protocol; accuracy [95% interval], PPL = change of the prompt's "
                   "perplexity vs dense" + (
                       "" if any(p.result.get("delta_vs_dense") is not None
                                 for p in mine if p.result.get("method_run") != "dense")
                       else " (none: the cells score the prompt from the compressed context's "
                            "end on, dense from its first token)"))
        rows = []
        for method in dict.fromkeys(p.method for p in mine):
            by_point = {(p.context_length, p.sparsity): p for p in mine if p.method == method}
            rows.append((method, [by_point.get(c) for c in columns]))
        tables.append((task, caption, columns, rows))
    return tables


def accuracy_table_markdown(results: dict) -> str:
    """Per task: a row per method, a column per (L, s) point."""
    lines = []
    for task, caption, columns, rows in accuracy_tables(results):
        lines += [f"**{task}** ({caption})", "",
                  "| method | " + " | ".join(f"L={L} s={s:g}" for L, s in columns) + " |",
                  "|---|" + "---|" * len(columns)]
        lines += [f"| {method} | " + " | ".join("-" if p is None else task_cell_text(p.result)
                                                for p in cells) + " |"
                  for method, cells in rows]
        lines.append("")
    return "\n".join(lines)


def heatmaps(results: dict, stem: Path) -> list:
    """One figure per task with by-depth accuracies: depth x length (or x sparsity)."""
    import matplotlib.pyplot as plt
    import numpy as np

    paths = []
    pts = [p for p in task_points(results) if p.result.get("by_depth")]
    for task in dict.fromkeys(p.task for p in pts):
        mine = [p for p in pts if p.task == task]
        lengths = sorted({p.context_length for p in mine})
        over_length = len(lengths) > 1
        methods = list(dict.fromkeys(p.method for p in mine))
        depths = sorted({d for p in mine for d in p.result["by_depth"]}, key=float)
        fig, axes = plt.subplots(1, len(methods), figsize=(2.2 + 1.6 * len(methods), 3.6),
                                 squeeze=False, layout="constrained")
        for ax, method in zip(axes[0], methods):
            cells = [p for p in mine if p.method == method and (
                p.sweep == "context_length_sweep" if over_length else True)]
            xs = sorted({p.context_length if over_length else p.sparsity for p in cells})
            grid = np.full((len(depths), len(xs)), np.nan)
            for p in cells:
                x = xs.index(p.context_length if over_length else p.sparsity)
                for d, cell in p.result["by_depth"].items():
                    grid[depths.index(d), x] = cell["accuracy"]
            image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto",
                              origin="upper")
            ax.set_xticks(range(len(xs)), [f"{x:g}" for x in xs])
            ax.set_yticks(range(len(depths)), depths)
            ax.set_xlabel("context length" if over_length else "sparsity")
            ax.set_title(method)
        axes[0][0].set_ylabel("needle depth")
        fig.colorbar(image, ax=axes[0].tolist(), label="accuracy", shrink=0.8)
        fig.suptitle(f"{task}: accuracy by needle depth")
        paths += save_figure(fig, stem, f"heatmap_{task}")
        plt.close(fig)
    return paths


def accuracy_vs_perplexity(results: dict, stem: Path) -> list:
    """Per task: accuracy against the change of the prompt's perplexity, each method's points
    joined over its sparsities (teacher-forced cells, which measure both)."""
    import matplotlib.pyplot as plt

    pts = [p for p in task_points(results) if p.result.get("delta_vs_dense") is not None]
    tasks = list(dict.fromkeys(p.task for p in pts if p.result.get("method_run") != "dense"))
    if not tasks:
        return []
    methods = list(dict.fromkeys(p.method for p in pts))
    style = style_of(methods)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.4 * len(tasks), 4.2), squeeze=False,
                             layout="constrained")
    for ax, task in zip(axes[0], tasks):
        # the sparsities at one context length: the sparsity sweep's (else the longest)
        lengths = {p.context_length for p in pts if p.task == task}
        fixed = results.get("config", {}).get("sparsity_sweep", {}).get("fixed_context_length")
        fixed = fixed if fixed in lengths else max(lengths)
        for method in methods:
            mine = sorted((p for p in pts if p.task == task and p.method == method
                           and p.context_length == fixed), key=lambda p: p.sparsity)
            if not mine:
                continue
            x = [p.result["delta_vs_dense"] * 100 for p in mine]
            y = [p.result["accuracy"] for p in mine]
            ax.plot(x, y, label=method, **style[method])
            for p, xi, yi in zip(mine, x, y):
                if method != "dense":
                    ax.annotate(f"{p.sparsity:g}", (xi, yi), fontsize=7,
                                textcoords="offset points", xytext=(3, 3))
        ax.set_xlabel("prompt perplexity change vs dense (%)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(f"{task}, L = {fixed}")
        ax.grid(True, alpha=0.3)
    legend_below(fig, axes[0])
    paths = save_figure(fig, stem, "accuracy_vs_ppl")
    plt.close(fig)
    return paths


def make_task_report(results: dict, stem: Path) -> list:
    if not task_points(results):
        return []
    path = stem.with_name(f"{stem.name}_tasks.md")
    path.write_text(accuracy_table_markdown(results))
    return [path] + heatmaps(results, stem) + accuracy_vs_perplexity(results, stem)
