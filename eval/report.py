"""python -m eval.report RESULTS.json: Figure 4, Figure 8 and Table 3 of a results file.

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
Figures are PNG and PDF, written next to the results file as <stem>_figure4.png and so on.
"""
import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from .plotting import legend_below, save_figure, style_of
from .results import CorruptFileError, read_json
from .results import delta_vs_dense
from .tasks.report import make_task_report

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
    results = read_json(path)
    if not isinstance(results, dict) or not isinstance(results.get("results"), dict):
        raise CorruptFileError(f"{path} is not a results file: it has no 'results' mapping")
    return results


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
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.6 * len(datasets) + 0.6, 4.2),
                             squeeze=False)
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
    paths = save_figure(fig, stem, "figure_recall")
    plt.close(fig)
    return paths


def tied_with_best(pts: list, seed: int = 0) -> set:
    """{(dataset, method, s)} of Table 3's sparse cells that are the best (lowest PPL) of their
    column or not significantly different from it: paired sign-flip tests of every other
    method against the column's best, Holm-corrected over all the table's tests. Columns whose
    cells lack their per-window sums (older files) mark nothing."""
    from .statistics import compare_cells, holm
    columns = {}
    for p in pts:
        if p.method != "dense" and p.sparsity > 0 and p.perplexity is not None:
            columns.setdefault((p.dataset, p.sparsity), []).append(p)
    tied, tests = set(), []
    for (dataset, s), cells in columns.items():
        if not all("windows" in p.result for p in cells):
            continue
        best = min(cells, key=lambda p: p.perplexity)
        tied.add((dataset, best.method, s))
        tests += [(p, compare_cells(best.result, p.result, seed)["p_value"])
                  for p in cells if p is not best]
    _, significant = holm([p_value for _, p_value in tests])
    tied |= {(p.dataset, p.method, p.sparsity) for (p, _), flag in zip(tests, significant)
             if not flag}
    return tied


def sweep_table(pts: list, cell_text) -> tuple:
    """(sparsity levels, rows) of the sparsity-sweep points pts: a row is (dataset, L, method,
    [cell text per level]); cell_text(point) writes a computed cell, 'failed' or '-' when
    the cell failed or was not run."""
    levels = sorted({p.sparsity for p in pts if p.method != "dense"} | {0.0}) if pts else []
    rows = []
    for dataset in _datasets(pts):
        for method in _methods([p for p in pts if p.dataset == dataset]):
            mine = [p for p in pts if p.dataset == dataset and p.method == method]
            by_level = {p.sparsity: p for p in mine}
            cells = [("-" if by_level.get(s) is None else "failed"
                      if by_level[s].perplexity is None else cell_text(by_level[s]))
                     for s in levels]
            L = sorted({p.context_length for p in mine})
            rows.append((dataset, ",".join(map(str, L)), method, cells))
    return levels, rows


def table3_rows(results: dict) -> tuple:
    """(sparsity levels, rows): a row is (dataset, L, method, [cell text per level], [marked
    per level]); a cell is 'PPL (+x.x% [low, high])' against dense at the same L with the
    paired 95% interval of the change (when the cells carry their windows), 'failed' or '-'
    when not run; marked: best of its column or not significantly different from it."""
    all_points = points(results)
    pts = [p for p in all_points if p.sweep == "sparsity_sweep"]
    tied = tied_with_best(pts, results.get("config", {}).get("seed", 0))

    def text(p):
        delta = point_delta_vs_dense(all_points, p)
        if p.method == "dense" or p.sparsity == 0.0 or delta is None:
            return f"{p.perplexity:.3f}"
        ci = p.result.get("delta_vs_dense_ci95")
        interval = f" [{ci[0] * 100:+.1f}, {ci[1] * 100:+.1f}]" if ci is not None else ""
        return f"{p.perplexity:.3f} ({delta * 100:+.1f}%{interval})"

    levels, rows = sweep_table(pts, text)
    return levels, [(d, L, m, cells, [(d, m, s) in tied for s in levels])
                    for d, L, m, cells in rows]


TABLE3_NOTE = ("PPL (change vs dense [paired 95% interval of the change, %]); marked: the "
               "best of its column and the methods not significantly different from it "
               "(paired sign-flip test, Holm-corrected over the table's tests, 5%).")


def table3_markdown(results: dict) -> str:
    levels, rows = table3_rows(results)
    note = ("\n" + TABLE3_NOTE.replace("marked", "bold") + "\n"
            if any(any(marks) for *_, marks in rows) else "")
    return _markdown(levels, [(d, L, m, [f"**{c}**" if mark else c
                                         for c, mark in zip(cells, marks)])
                              for d, L, m, cells, marks in rows]) + note


def key_token_rows(results: dict) -> tuple:
    """table3_rows for key-token perplexity (docs/metrics.md): 'PPL (+x.x%)' against the
    dense key-token perplexity of the same windows, '*' when the cell had fewer key tokens
    than eval.key_tokens.MIN_KEY_TOKENS (indicative only); no rows when no cell has it."""
    pts = [p for p in points(results) if p.sweep == "sparsity_sweep"
           and p.result.get("key_token_perplexity") is not None]

    def text(p):
        value, dense = p.result["key_token_perplexity"], p.result["key_token_perplexity_dense"]
        star = "*" if p.result.get("key_tokens_indicative_only") else ""
        if p.method == "dense" or p.sparsity == 0.0 or not dense:
            return f"{value:.3f}{star}"
        return f"{value:.3f} ({(value / dense - 1) * 100:+.1f}%){star}"

    return sweep_table(pts, text)


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
    lines += [r"\bottomrule", r"\end{tabular}"]
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="a results JSON written by python -m eval.run")
    parser.add_argument("--output-dir", help="where to write (default: beside the results)")
    args = parser.parse_args(argv)
    try:
        paths = make_report(args.results, args.output_dir)
    except CorruptFileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"wrote {path}")
    print()
    results = load_results(args.results)
    print(table3_markdown(results) + key_token_markdown(results), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
