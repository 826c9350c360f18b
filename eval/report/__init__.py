"""The figures and tables of a results file; `python -m eval.report RESULTS.json [MORE.json
...] [--html PAGE.html]` writes them (eval/report/__main__.py).

- Figure 4: perplexity vs context length at the fixed sparsity, one panel per dataset.
- Figure 8: perplexity vs realised density (kept / causal query-key pairs) from the sparsity
  sweep: the accuracy-compute frontier, one panel per dataset.
- Figure recall: perplexity change vs attention recall (the share of the dense softmax mass
  the kept blocks hold; written when the cells carry it, i.e. runs with --diagnostics), every
  method and sparsity, one panel per dataset: why one method loses more than another.
- Table 3: method x sparsity at the fixed context length, PPL and its change vs dense, as
  markdown and LaTeX; with key-token perplexity in the cells, its companion table
  (<stem>_table3_key_tokens.md).
- With a tasks section: the accuracy table, the needle heatmaps and accuracy against
  perplexity change (eval/tasks/report.py).
- The results page, <stem>.html: all of the above in one self-contained file with the run's
  provenance and its paired comparisons (eval/html_report.py); opens offline.
Figures are PNG and PDF, written next to the results file as <stem>_figure4.png and so on.
--html PAGE.html writes one page of every file given instead (and nothing else), with a view
across them: the same method and point under each file's model or protocol, side by side.
"""
from dataclasses import dataclass
from pathlib import Path

from ..plotting import legend_below, save_figure, style_of
from ..results import CorruptFileError, read_json
from ..results import delta_vs_dense
from ..tasks.report import make_task_report

DENSITY_TICKS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


@dataclass
class Point:
    dataset: str
    method: str
    sweep: str
    context_length: int
    sparsity: float
    result: dict

    @property
    def perplexity(self):
        return self.result.get("perplexity")


def load_results(path) -> dict:
    """A results document (docs/running.md): CorruptFileError naming the file and what is
    wrong when it cannot be read or is not one."""
    results = read_json(path)
    problem = results_shape_problem(results)
    if problem:
        raise CorruptFileError(f"{path} is not a results file written by eval.run: {problem}")
    return results


def results_shape_problem(results) -> str | None:
    """What keeps a parsed JSON value from being a results document {"config": {...},
    "results": {DATASET: {METHOD: {SWEEP: {POINT: R or null}}}}, "tasks": (the same shape)},
    or None."""
    if not isinstance(results, dict) or not isinstance(results.get("results"), dict):
        return ("it has no 'results' mapping (a results file holds 'config' and 'results'; a "
                "cell of NAME.cells/ or eval.stream's stream.json is not one)")
    if not isinstance(results.get("config", {}), dict):
        return "its 'config' is not a mapping"
    for section in ("results", "tasks"):
        for dataset, methods in (results.get(section) or {}).items():
            where = f"{section}[{dataset!r}]"
            if not isinstance(methods, dict):
                return f"{where} is not a mapping of methods"
            for method, sweeps in methods.items():
                if not isinstance(sweeps, dict) or not all(
                        isinstance(cells, dict) and all(r is None or isinstance(r, dict)
                                                        for r in cells.values())
                        for cells in sweeps.values()):
                    return (f"{where}[{method!r}] is not a mapping of sweeps, each a mapping "
                            "of points to a cell's record or null")
    return None


def points(results: dict) -> list:
    """Every cell of a results dict, with its context length and sparsity made explicit
    (files written by eval.run carry them in R; hand-made ones may only have the sweep keys)."""
    config = results.get("config", {})
    fixed_s = config.get("context_length_sweep", {}).get("fixed_sparsity")
    fixed_L = config.get("sparsity_sweep", {}).get("fixed_context_length")
    out = []
    for dataset, methods in results["results"].items():
        for method, sweeps in methods.items():
            for sweep, cells in sweeps.items():
                for key, r in cells.items():
                    r = r or {"perplexity": None, "error": "missing result"}
                    if sweep == "context_length_sweep":
                        L, s = int(key), r.get("sparsity", fixed_s)
                    elif sweep == "budget_sweep":  # "K@L", run at the sparsity that gives K
                        L, s = int(key.split("@")[1]), r.get("sparsity_run", 0.0)
                    else:
                        L, s = r.get("context_length", fixed_L), float(key)
                    s = 0.0 if method == "dense" else s
                    out.append(Point(dataset, method, sweep, L, s, r))
    return out


def dense_perplexity(all_points: list, dataset: str, context_length: int):
    """The dense PPL of (dataset, L): recorded with the cell, else any dense cell there."""
    for p in all_points:
        if (p.dataset == dataset and p.context_length == context_length
                and (p.method == "dense" or p.sparsity == 0.0) and p.perplexity is not None):
            return p.perplexity
    return None


def point_delta_vs_dense(all_points: list, p: Point):
    dense = p.result.get("dense_perplexity") or dense_perplexity(all_points, p.dataset,
                                                                 p.context_length)
    return delta_vs_dense(p.perplexity, dense)


def _datasets(all_points):
    return list(dict.fromkeys(p.dataset for p in all_points))


def _methods(all_points):
    return list(dict.fromkeys(p.method for p in all_points))


def _log_if_wide(ax, values, axis="y"):
    """Log scale when the values span more than a factor of 3 (a blown-up method would
    otherwise flatten every other curve)."""
    from matplotlib.ticker import FormatStrFormatter
    values = [v for v in values if v]
    if values and max(values) / min(values) > 3:
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
        target = ax.yaxis if axis == "y" else ax.xaxis
        target.set_major_formatter(FormatStrFormatter("%g"))  # 60, not 6 x 10^1
        target.set_minor_formatter(FormatStrFormatter("%g"))


def _drop_overlapping_labels(fig, axes) -> None:
    """Hide each point label that would overlap one already shown in its panel: methods at
    the same sparsity sit at about the same density, and one `s=` label says it for all."""
    fig.canvas.draw()  # lays the figure out, so that the labels have their final places
    renderer = fig.canvas.get_renderer()
    for ax in axes:
        shown = []
        for text in ax.texts:
            box = text.get_window_extent(renderer)
            if any(box.overlaps(other) for other in shown):
                text.set_visible(False)
            else:
                shown.append(box)


def _perplexity_figure(pts: list, stem: Path, suffix: str, title: str, draw) -> list:
    """One perplexity panel per dataset of pts, one legend, PNG and PDF. draw(ax, dataset,
    methods, style) plots a panel's methods, sets its x axis and title, and returns the
    perplexities it plotted (they decide whether the y axis is logarithmic)."""
    import matplotlib.pyplot as plt
    datasets, methods = _datasets(pts), _methods(pts)
    style = style_of(methods)
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.6 * len(datasets), 4.6),
                             squeeze=False, layout="constrained")
    axes = axes[0]
    for ax, dataset in zip(axes, datasets):
        _log_if_wide(ax, draw(ax, dataset, methods, style))
        ax.set_ylabel("perplexity (lower is better)")
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    legend_below(fig, axes)
    _drop_overlapping_labels(fig, axes)
    paths = save_figure(fig, stem, suffix)
    plt.close(fig)
    return paths


def paired_interval(p: Point):
    """(low, high) perplexity of a sparse cell's paired 95% interval vs dense (dense's PPL
    times 1 + the interval of the change), or None when the cell has none."""
    ci, dense = p.result.get("delta_vs_dense_ci95"), p.result.get("dense_perplexity")
    if ci is None or dense is None or p.perplexity is None:
        return None
    return dense * (1 + ci[0]), dense * (1 + ci[1])


def _interval_note(pts: list) -> str:
    """The title's second line, when the figure draws intervals."""
    return ("\nbars: paired 95% interval of the change vs dense on the same windows"
            if any(paired_interval(p) for p in pts) else "")


def _interval_bars(ax, cells: list, color) -> list:
    """Error bars of the paired intervals of cells [(x, Point)]; returns their ends (so the
    axis scale sees them). Dense, the reference of every interval, has none."""
    bars = [(x, p.perplexity, paired_interval(p)) for x, p in cells]
    bars = [(x, y, ci) for x, y, ci in bars if ci is not None]
    if not bars:
        return []
    ax.errorbar([x for x, _, _ in bars], [y for _, y, _ in bars],
                yerr=[[max(y - ci[0], 0) for _, y, ci in bars],
                      [max(ci[1] - y, 0) for _, y, ci in bars]],
                fmt="none", ecolor=color, capsize=2.5, linewidth=1)
    return [end for _, _, ci in bars for end in ci]


def figure4(results: dict, stem: Path) -> list:
    """PPL vs context length at the fixed sparsity, one panel per dataset."""
    pts = [p for p in points(results) if p.sweep == "context_length_sweep"]
    if not pts:
        return []

    def draw(ax, dataset, methods, style):
        plotted = []
        for method in methods:
            cells = sorted([((p.context_length, p.perplexity), p) for p in pts
                            if p.dataset == dataset and p.method == method
                            and p.perplexity is not None], key=lambda cell: cell[0])
            if cells:
                xs, ys = zip(*(xy for xy, _ in cells))
                ax.plot(xs, ys, label=method, **style[method])
                plotted += [*ys, *_interval_bars(ax, [(x, p) for (x, _), p in cells],
                                               style[method]["color"])]
        lengths = sorted({p.context_length for p in pts if p.dataset == dataset})
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(L) for L in lengths])
        ax.minorticks_off()
        ax.set_title(dataset)
        ax.set_xlabel("context length L (tokens)")
        return plotted

    sparsity = results.get("config", {}).get("context_length_sweep", {}).get("fixed_sparsity")
    return _perplexity_figure(pts, stem, "figure4", "Figure 4: perplexity vs context length "
                              f"(sparsity s = {sparsity}; dense ignores s)" + _interval_note(pts),
                              draw)


def figure8(results: dict, stem: Path) -> list:
    """PPL vs realised density over the sparsity sweep: the accuracy-compute frontier."""
    pts = [p for p in points(results) if p.sweep == "sparsity_sweep"
           and p.perplexity is not None and p.result.get("density") is not None]
    if not pts:
        return []

    def draw(ax, dataset, methods, style):
        plotted = []
        for method in methods:
            cells = sorted([((p.result["density"], p.perplexity, p.sparsity), p) for p in pts
                            if p.dataset == dataset and p.method == method],
                           key=lambda cell: cell[0])
            if not cells:
                continue
            xs, ys, ss = zip(*(xys for xys, _ in cells))
            ax.plot(xs, ys, label=method, **style[method])
            plotted += [*ys, *_interval_bars(ax, [(xys[0], p) for xys, p in cells],
                                           style[method]["color"])]
            if method != "dense":
                for x, y, s in zip(xs, ys, ss):
                    if s > 0:
                        ax.annotate(f"s={s:g}", (x, y), textcoords="offset points",
                                    xytext=(4, 3), fontsize=7, color=style[method]["color"])
        ax.set_xscale("log")
        densities = [p.result["density"] for p in pts if p.dataset == dataset]
        ticks = [t for t in DENSITY_TICKS if min(densities) / 1.5 <= t <= 1.0]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
        lengths = sorted({p.context_length for p in pts if p.dataset == dataset})
        ax.set_title(f"{dataset} (L = {', '.join(map(str, lengths))})")
        ax.set_xlabel("realised density (kept / causal query-key pairs)")
        return plotted

    return _perplexity_figure(pts, stem, "figure8", "Figure 8: perplexity vs realised "
                              "attention density (accuracy-compute frontier)"
                              + _interval_note(pts), draw)


def recall_cells(results: dict) -> dict:
    """{(dataset, method, L, s): (attention recall, PPL change vs dense in %)} of every sparse
    cell that carries its recall (both sweeps, each (L, s) once)."""
    all_points = points(results)
    cells = {}
    for p in all_points:
        recall, delta = p.result.get("attention_recall"), point_delta_vs_dense(all_points, p)
        if p.method != "dense" and p.sparsity > 0 and recall is not None and delta is not None:
            cells[(p.dataset, p.method, p.context_length, p.sparsity)] = (recall, delta * 100)
    return cells


def figure_recall(results: dict, stem: Path) -> list:
    """Perplexity change vs dense against attention recall, one panel per dataset."""
    import matplotlib.pyplot as plt
    cells = recall_cells(results)
    if not cells:
        return []
    datasets = list(dict.fromkeys(key[0] for key in cells))
    methods = list(dict.fromkeys(key[1] for key in cells))
    style = style_of(methods)
    # constrained: the legend below the panels gets room of its own (legend_below)
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.6 * len(datasets) + 0.6, 4.2),
                             squeeze=False, layout="constrained")
    axes = axes[0]
    several_lengths = len({key[2] for key in cells}) > 1
    for ax, dataset in zip(axes, datasets):
        for method in methods:
            mine = sorted((xy, L, s) for (d, m, L, s), xy in cells.items()
                          if d == dataset and m == method)
            if not mine:
                continue
            ax.scatter([xy[0] for xy, _, _ in mine], [xy[1] for xy, _, _ in mine],
                       label=method, color=style[method]["color"],
                       marker=style[method]["marker"])
            for (x, y), L, s in mine:
                ax.annotate(f"s={s:g}" + (f" L={L}" if several_lengths else ""), (x, y),
                            textcoords="offset points", xytext=(4, 3), fontsize=7,
                            color=style[method]["color"])
        ax.axhline(0.0, color="black", linestyle="--", linewidth=0.8)
        ax.set_title(dataset)
        ax.set_xlabel("attention recall (dense softmax mass kept)")
        ax.set_ylabel("perplexity change vs dense (%)")
        ax.grid(True, alpha=0.3)
    fig.suptitle("Perplexity change vs attention recall")
    legend_below(fig, axes)
    _drop_overlapping_labels(fig, axes)
    paths = save_figure(fig, stem, "figure_recall")
    plt.close(fig)
    return paths


@dataclass
class Table3Marks:
    """What Table 3 marks, and what its windows cannot resolve (docs/statistics.md, Table 3)."""
    tied: set  # {(dataset, method, s)}: the best of a column and those not resolved from it
    tested: dict  # {(dataset, s): windows} of the columns with tests
    unresolvable: dict  # the columns of tested that no test could resolve: not marked
    tests: int  # the paired tests of the table (Holm's family)
    windows_to_resolve: int | None  # windows a cell before any test of the family could pass
    windows_for_1pct: int | None  # median over the tests of the windows to resolve 1%


def table3_marks(pts: list, seed: int = 0) -> Table3Marks:
    """Table 3's marks: in each column (dataset, s) with two or more sparse cells, the best
    (lowest PPL) and every method not significantly different from it: paired sign-flip tests
    of every other method against the column's best, Holm-corrected over all the table's
    tests. A column whose windows cannot make any test significant, whatever the numbers (its
    smallest possible p is not below 5%, or the table's smallest possible p times the number
    of tests is not), marks nothing: "not different from the best" would then be true of
    every cell. Columns whose cells lack their per-window sums (older files) mark nothing."""
    from ..statistics import ALPHA, compare_cells, holm, smallest_sign_flip_p, windows_to_resolve
    columns = {}
    for p in pts:
        if p.method != "dense" and p.sparsity > 0 and p.perplexity is not None:
            columns.setdefault((p.dataset, p.sparsity), []).append(p)
    tests = []  # (column, best, other, comparison)
    for column, cells in columns.items():
        if len(cells) < 2 or not all("windows" in p.result for p in cells):
            continue
        best = min(cells, key=lambda p: p.perplexity)
        tests += [(column, best, p, compare_cells(best.result, p.result, seed))
                  for p in cells if p is not best]
    windows = {column: c["num_windows"] for column, _, _, c in tests}
    table_floor = len(tests) * min(map(smallest_sign_flip_p, windows.values()), default=1.0)
    unresolvable = {column: n for column, n in windows.items()
                    if table_floor >= ALPHA or smallest_sign_flip_p(n) >= ALPHA}
    _, significant = holm([c["p_value"] for *_, c in tests])
    tied = set()
    for (column, best, other, _), flag in zip(tests, significant):
        if column not in unresolvable:
            tied |= {(best.dataset, best.method, best.sparsity)} | (
                set() if flag else {(other.dataset, other.method, other.sparsity)})
    needed = sorted(c["windows_needed_1pct"] for *_, c in tests
                    if c["windows_needed_1pct"] is not None)
    return Table3Marks(tied, windows, unresolvable, len(tests), windows_to_resolve(len(tests)),
                       needed[len(needed) // 2] if needed else None)


def unresolved_note(marks: Table3Marks) -> str:
    """What the table says when some of its columns can resolve nothing ('' when all can)."""
    from ..statistics import ALPHA, smallest_sign_flip_p
    if not marks.unresolvable:
        return ""
    counts = sorted(set(marks.unresolvable.values()))
    windows = " or ".join(map(str, counts))
    floor = ", ".join(f"{smallest_sign_flip_p(n):.3g}" for n in counts)
    where = ("Nothing is marked" if marks.unresolvable == marks.tested
             else "Not marked: " + ", ".join(f"{d} s={s:g}" for d, s in marks.unresolvable))
    needs = (f"at least {marks.windows_to_resolve} windows a cell are needed before any can"
             if marks.windows_to_resolve else "no number of windows can")
    one_percent = (f"; a 1% difference from the best needs about {marks.windows_for_1pct} "
                   "(the median of the table's estimates)" if marks.windows_for_1pct else "")
    return (f"{where}: with {windows} windows a cell the paired sign-flip test cannot go below "
            f"p = {floor}, and Holm's correction over the table's {marks.tests} tests needs "
            f"one below {ALPHA:.2g} / {marks.tests}, so no difference there can be resolved; "
            f"{needs}{one_percent}.")


def sweep_grid(pts: list, plan: dict | None = None) -> tuple:
    """(sparsity levels, rows) of the sparsity-sweep points pts: a row is (dataset, L, method,
    [Point or None per level]). plan ({datasets, methods, levels, context_length}, from the
    config) adds the rows and levels a partial run has not reached yet."""
    plan = plan or {}
    levels = sorted({p.sparsity for p in pts if p.method != "dense"} | {0.0}
                    | set(plan.get("levels", ()))) if pts or plan else []
    rows = []
    for dataset in dict.fromkeys(_datasets(pts) + list(plan.get("datasets", ()))):
        mine = [p for p in pts if p.dataset == dataset]
        for method in dict.fromkeys(_methods(mine) + list(plan.get("methods", ()))):
            by_level = {p.sparsity: p for p in mine if p.method == method}
            lengths = sorted({p.context_length for p in by_level.values()}) or [
                plan.get("context_length")]
            rows.append((dataset, ",".join(map(str, lengths)), method,
                         [by_level.get(s) for s in levels]))
    return levels, rows


def sweep_table(pts: list, cell_text) -> tuple:
    """sweep_grid as text: cell_text(point) writes a computed cell, 'failed' or '-' when the
    cell failed or was not run."""
    levels, grid = sweep_grid(pts)
    return levels, [(d, L, m, ["-" if p is None else "failed" if p.perplexity is None
                               else cell_text(p) for p in cells]) for d, L, m, cells in grid]


def change_text(delta: float, ci=None) -> str:
    """'+x.x%' and, when there is one, its paired interval ' [low, high]' in percent."""
    interval = f" [{ci[0] * 100:+.1f}, {ci[1] * 100:+.1f}]" if ci is not None else ""
    return f"{delta * 100:+.1f}%{interval}"


def table3_cell_text(all_points: list, p: Point, number=lambda v: f"{v:.3f}") -> str:
    """'PPL (+x.x% [low, high])' against dense at the same L with the paired 95% interval of
    the change (when the cell carries it); number(PPL) writes the perplexity."""
    delta = point_delta_vs_dense(all_points, p)
    if p.method == "dense" or p.sparsity == 0.0 or delta is None:
        return number(p.perplexity)
    return f"{number(p.perplexity)} ({change_text(delta, p.result.get('delta_vs_dense_ci95'))})"


def table3_rows(results: dict) -> tuple:
    """(sparsity levels, rows): a row is (dataset, L, method, [cell text per level], [marked
    per level]); a cell is table3_cell_text, 'failed' or '-' when not run; marked: see
    table3_marks."""
    all_points = points(results)
    tied = results_marks(results).tied
    levels, rows = sweep_table([p for p in all_points if p.sweep == "sparsity_sweep"],
                               lambda p: table3_cell_text(all_points, p))
    return levels, [(d, L, m, cells, [(d, m, s) in tied for s in levels])
                    for d, L, m, cells in rows]


def results_marks(results: dict) -> Table3Marks:
    """table3_marks of a results dict's sparsity sweep."""
    return table3_marks([p for p in points(results) if p.sweep == "sparsity_sweep"],
                        results.get("config", {}).get("seed", 0))


TABLE3_NOTE = ("PPL (change vs dense [paired 95% interval of the change, %]); marked: the "
               "best of its column and the methods not significantly different from it "
               "(paired sign-flip test, Holm-corrected over the table's tests, 5%).")


def table3_notes(results: dict, marked: bool, mark: str) -> list:
    """The notes under Table 3: what its marks mean, said with `mark` (how the table shows
    them), when it marks any; which columns its windows cannot resolve (unresolved_note)."""
    unresolved = unresolved_note(results_marks(results))
    return ([TABLE3_NOTE.replace("marked", mark)] if marked else []) + \
        ([unresolved] if unresolved else [])


def table3_markdown(results: dict) -> str:
    levels, rows = table3_rows(results)
    notes = table3_notes(results, any(any(marks) for *_, marks in rows), "bold")
    return _markdown(levels, [(d, L, m, [f"**{c}**" if mark else c
                                         for c, mark in zip(cells, marks)])
                              for d, L, m, cells, marks in rows]) + \
        "".join(f"\n{note}\n" for note in notes)


def key_token_rows(results: dict) -> tuple:
    """table3_rows for key-token perplexity (docs/metrics.md): 'PPL (+x.x%)' against the
    dense key-token perplexity of the same windows, '*' when the cell had fewer key tokens
    than eval.key_tokens.MIN_KEY_TOKENS (indicative only); no rows when no cell has it."""
    return sweep_table(key_token_points(results), key_token_cell_text)


def key_token_points(results: dict) -> list:
    """The sparsity-sweep points that measured their key-token perplexity."""
    return [p for p in points(results) if p.sweep == "sparsity_sweep"
            and p.result.get("key_token_perplexity") is not None]


def key_token_cell_text(p: Point, number=lambda v: f"{v:.3f}") -> str:
    value, dense = p.result["key_token_perplexity"], p.result["key_token_perplexity_dense"]
    star = "*" if p.result.get("key_tokens_indicative_only") else ""
    if p.method == "dense" or p.sparsity == 0.0 or not dense:
        return f"{number(value)}{star}"
    return f"{number(value)} ({change_text(value / dense - 1)}){star}"


KEY_TOKENS_NOTE = ("Key-token perplexity: the perplexity of the tokens whose prediction the "
                   "long context improves (docs/metrics.md), change vs dense on the same "
                   "tokens; * fewer key tokens than needed for a stable number.")


def key_token_markdown(results: dict) -> str:
    """The companion of Table 3 for key tokens ('' when no cell measured them)."""
    levels, rows = key_token_rows(results)
    return _markdown(levels, rows) + "\n" + KEY_TOKENS_NOTE + "\n" if rows else ""


def _markdown(levels, rows) -> str:
    head = ["dataset", "L", "method"] + [f"s={s:g}" for s in levels]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([d, L, m, *cells]) + " |" for d, L, m, cells in rows]
    return "\n".join(lines) + "\n"


def _tex(text: str) -> str:
    return text.replace("\\", r"\textbackslash{}").replace("_", r"\_").replace("%", r"\%") \
        .replace("&", r"\&").replace("#", r"\#")


def table3_latex(results: dict) -> str:
    levels, rows = table3_rows(results)
    head = ["Dataset", "$L$", "Method"] + [f"$s={s:g}$" for s in levels]
    lines = [r"% Table 3: " + TABLE3_NOTE.replace("marked", "bold"),
             r"\begin{tabular}{ll l" + "r" * len(levels) + "}", r"\toprule",
             " & ".join(head) + r" \\", r"\midrule"]
    lines += [" & ".join([_tex(d), _tex(L), _tex(m), *(rf"\textbf{{{_tex(c)}}}" if mark
                                                       else _tex(c)
                                                       for c, mark in zip(cells, marks))])
              + r" \\" for d, L, m, cells, marks in rows]
    lines.append(r"\bottomrule")
    unresolved = unresolved_note(results_marks(results))
    if unresolved:  # beneath the table, where a reader of the typeset table sees it
        lines.append(rf"\multicolumn{{{len(head)}}}{{p{{0.9\linewidth}}}}"
                     rf"{{\footnotesize {_tex(unresolved)}}} \\")
    lines += [r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def make_report(results_path, output_dir=None) -> list:
    """Write the figures (PNG + PDF) and Table 3 (.md + .tex); return the paths written."""
    import matplotlib
    matplotlib.use("Agg")
    results_path = Path(results_path)
    results = load_results(results_path)
    folder = Path(output_dir) if output_dir else results_path.parent
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / results_path.stem
    paths = figure4(results, stem) + figure8(results, stem) + figure_recall(results, stem)
    for name, text in (("table3.md", table3_markdown(results)),
                       ("table3.tex", table3_latex(results)),
                       ("table3_key_tokens.md", key_token_markdown(results))):
        if text:
            path = stem.with_name(f"{stem.name}_{name}")
            path.write_text(text)
            paths.append(path)
    return paths + make_task_report(results, stem)
