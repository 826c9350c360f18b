"""The results page (docs/running.md, The results page): one self-contained HTML file with
everything a run produced, or one page for several results files with a view across them.

Per results file: the run's provenance, Table 3 with its paired intervals and marks, the
key-token companion, the task tables, the figures, the paired comparisons `python -m
eval.compare` prints (every method against dense, and the best against the runner-up), and
the cells that failed. With several files: the same method and point under each file side by
side, each with its change against its own dense, and whether the ranking holds.

Everything is inside the file (the figures as PNG data, the style, a few lines of script that
sort the tables), so it opens from disk without a server or network. Numbers are written as
the JSON holds them; changes and intervals as in the markdown tables.
"""
import base64
import html
import json
import math
import os
import shlex
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from .compare import (best_and_runner_up, comparisons, method_pairs, sections,
                      task_comparisons)
from .report import (KEY_TOKENS_NOTE, change_text, key_token_cell_text,
                     key_token_points, load_results, make_report, point_delta_vs_dense,
                     points, results_marks, sweep_grid, table3_cell_text, table3_notes)
from .tasks.report import accuracy_tables, task_cell_text, task_points

REPO = Path(__file__).resolve().parent.parent
METHOD_DOCS = ("docs/methods.md", "docs/baselines.md")
# Config keys that say how a run went, not what it computed: left out of "what differs".
BOOKKEEPING = {"status", "started", "written", "command", "notes", "cells_computed",
               "cells_reused", "cells_missing", "output_dir", "name", "description",
               "windows", "torch_threads", "executor", "batch_size"}


@dataclass
class Cell:
    """A table cell: its text, the value its column sorts by (default: the number the text
    starts with, else the text), a mark (bold), a line under it, a CSS class, a link."""
    text: str
    sort: object = None
    marked: bool = False
    note: str = ""
    kind: str = ""
    href: str = ""


@dataclass
class Document:
    """One results file on the page."""
    path: Path
    results: dict
    label: str
    figures: list  # PNG paths


def number(value) -> str:
    """A number as the JSON holds it (every digit)."""
    return json.dumps(value)


# -- HTML pieces -----------------------------------------------------------------------------

def _e(text) -> str:
    return html.escape(str(text))


def _td(cell) -> str:
    cell = cell if isinstance(cell, Cell) else Cell(str(cell))
    attributes = ""
    if cell.sort is not None:
        attributes += f' data-sort="{_e(cell.sort)}"'
    classes = " ".join(c for c in (cell.kind, "marked" if cell.marked else "") if c)
    if classes:
        attributes += f' class="{classes}"'
    text = f'<a href="{_e(cell.href)}">{_e(cell.text)}</a>' if cell.href else _e(cell.text)
    if cell.marked:
        text = f"<b>{text}</b>"
    if cell.note:
        text += f'<div class="cell-note">{_e(cell.note)}</div>'
    return f"<td{attributes}>{text}</td>"


def table(head: list, rows: list, caption: str = "", notes=()) -> str:
    """A sortable table (a click on a column's heading sorts by it) and its notes."""
    out = ['<table class="sortable">']
    if caption:
        out.append(f"<caption>{_e(caption)}</caption>")
    out.append("<thead><tr>" + "".join(f'<th title="sort by this column">{_e(h)}</th>'
                                       for h in head) + "</tr></thead><tbody>")
    out += ["<tr>" + "".join(_td(c) for c in row) + "</tr>" for row in rows]
    out.append("</tbody></table>")
    out += [f'<p class="note">{_e(note)}</p>' for note in notes if note]
    return "\n".join(out)


def section(anchor: str, title: str, body: str, level: int = 3) -> str:
    return f'<section id="{anchor}"><h{level}>{_e(title)}</h{level}>\n{body}\n</section>'


def _paragraph(text: str, kind: str = "note") -> str:
    return f'<p class="{kind}">{_e(text)}</p>'


# -- method links ----------------------------------------------------------------------------

def _slug(heading: str) -> str:
    """The anchor a Markdown renderer (GitHub's) gives a heading."""
    kept = "".join(c for c in heading.strip().lower() if c.isalnum() or c in " -_")
    return kept.replace(" ", "-")


def method_anchors() -> dict:
    """{method: (doc file, anchor)} from the '## name ...' headings of the method pages
    (empty in an installed copy, which has no docs/)."""
    anchors = {}
    for relative in METHOD_DOCS:
        path = REPO / relative
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            if line.startswith("## "):
                heading = line[3:]
                name = heading.split()[0].strip("`").lower()
                anchors.setdefault(name, (path, _slug(heading)))
    return anchors


def _link_from(page: Path, target: Path) -> str:
    """A link from the page to a file: relative when both are in this checkout (the page then
    moves with it), else an absolute file address."""
    page_folder = page.resolve().parent
    if REPO in page_folder.parents or page_folder == REPO:
        return Path(os.path.relpath(target, page_folder)).as_posix()
    return target.as_uri()


def method_cell(method: str, page: Path, anchors: dict) -> Cell:
    """The method's name, linked to its definition in docs/ where it has one."""
    if method not in anchors:
        return Cell(method)
    path, anchor = anchors[method]
    return Cell(method, href=f"{_link_from(page, path)}#{anchor}")


# -- what a results file holds --------------------------------------------------------------

def _flatten(value, prefix: str = "") -> dict:
    """{dotted key: value} of nested mappings; lists and scalars are leaves."""
    if isinstance(value, dict) and value:
        out = {}
        for key, inner in value.items():
            out.update(_flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _value_text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def records(results: dict) -> list:
    """Every cell record (R) of the results and tasks sections, None for an empty one, with
    where it sits: [(section, dataset or task, method, sweep, point, R)]."""
    return [(section_name, dataset, method, sweep, point, r)
            for section_name in ("results", "tasks")
            for dataset, methods in (results.get(section_name) or {}).items()
            for method, sweeps in methods.items()
            for sweep, cells in sweeps.items()
            for point, r in cells.items()]


def protocol_settings(results: dict) -> list:
    """[(setting, configured value, values the cells record)]: every setting of the config
    block that the computed cells also record, i.e. the protocol and each of its options
    (docs/architecture.md: an option is a config field of its own name), whatever they are;
    the protocol first."""
    cells = [r for *_, r in records(results)
             if r and not r.get("error") and r.get("protocol") not in (None, "dense")]
    settings = []
    for key, value in results.get("config", {}).items():
        recorded = [r[key] for r in cells if key in r]
        if recorded and not isinstance(value, (dict, list)):
            seen = list(dict.fromkeys(_value_text(v) for v in recorded))
            settings.append((key, _value_text(value), seen))
    return sorted(settings, key=lambda s: s[0] != "protocol")


def method_parameters(results: dict) -> dict:
    """{method: [parameters as JSON, each distinct set once]} from the computed cells."""
    found = {}
    for _, _, method, _, _, r in records(results):
        if r and isinstance(r.get("params"), dict) and r.get("method_run", method) == method:
            found.setdefault(method, {})[json.dumps(r["params"], sort_keys=True)] = None
    return {method: list(params) for method, params in found.items()}


def failed_cells(results: dict) -> list:
    return [(section_name, dataset, method, sweep, point, (r or {}).get("error") or "no result")
            for section_name, dataset, method, sweep, point, r in records(results)
            if r is None or r.get("error")]


def older_format_note(results: dict) -> str:
    """A note when finished perplexity cells lack their per-window sums (written before cell
    format 2): no paired intervals, marks or comparisons for them."""
    finished = [r for section_name, *_, r in records(results)
                if section_name == "results" and r and r.get("perplexity") is not None]
    old = [r for r in finished if "windows" not in r]
    if not old:
        return ""
    return (f"{len(old)} of the {len(finished)} computed perplexity cells carry no per-window "
            "sums: they were written by an older version of the harness (before cell format 2, "
            "docs/statistics.md), so they have no paired intervals, no marks and no paired "
            "comparisons. Rerunning the same eval.run command recomputes them.")


# -- one results file ----------------------------------------------------------------------

def provenance(doc: Document, page: Path, anchors: dict) -> str:
    config = doc.results.get("config", {})
    model = config.get("model", {})
    info = config.get("model_info") or {}
    machine, versions = config.get("machine") or {}, config.get("versions") or {}
    command = config.get("command")
    rows = [
        ("model", ", ".join(filter(None, [
            _value_text(model.get("name")) if model.get("name") else "",
            *(f"{k} {_value_text(v)}" for k, v in info.items() if k != "name")]))),
        ("protocol and options", "; ".join(
            f"{key} = {configured}" + ("" if cells == [configured] else
                                       f" (the cells: {', '.join(cells)})")
            for key, configured, cells in protocol_settings(doc.results))),
        ("device", ", ".join(f"{k} {_value_text(config[k])}" for k in (
            "resolved_device", "resolved_dtype", "torch_threads", "executor") if k in config)),
        ("machine", ", ".join(f"{k} {_value_text(v)}" for k, v in machine.items()
                              if v not in (None, ""))),
        ("versions", ", ".join(f"{k} {_value_text(v)}" for k, v in versions.items())),
        ("date", " to ".join(_value_text(config[k]) for k in ("started", "written")
                             if config.get(k))),
        ("status", _value_text(config.get("status", "not recorded"))),
        ("command", shlex.join(map(str, command)) if isinstance(command, list)
         else _value_text(command) if command else "not recorded"),
        ("seed", _value_text(config.get("seed", "not recorded"))),
    ]
    out = ['<dl class="provenance">']
    out += [f"<dt>{_e(k)}</dt><dd>{_e(v) or '-'}</dd>" for k, v in rows]
    out.append("</dl>")
    parameters = method_parameters(doc.results)
    methods = list(dict.fromkeys(config.get("methods", []) + [p.method for p in
                                                             points(doc.results)]))
    if methods:
        out.append(table(["method", "parameters (as the cells record them)"],
                         [[method_cell(m, page, anchors),
                           Cell("; ".join(parameters.get(m, [])) or "-", kind="text")]
                          for m in methods],
                         caption="Methods (each links to its definition)"))
    flat = _flatten(config)
    out.append("<details><summary>The whole config block "
               f"({len(flat)} settings)</summary>"
               + table(["setting", "value"],
                       [[k, Cell(_value_text(v), kind="text")] for k, v in flat.items()])
               + "</details>")
    return "\n".join(out)


def _plan(config: dict) -> dict | None:
    """The sparsity sweep the config planned (datasets, methods, levels, L), or None."""
    sweep = config.get("sparsity_sweep") or {}
    if not sweep.get("enabled", True) or not sweep.get("sparsity_levels"):
        return None
    return {"datasets": config.get("datasets", []), "methods": config.get("methods", []),
            "levels": [float(s) for s in sweep["sparsity_levels"]],
            "context_length": sweep.get("fixed_context_length")}


def _absent(method: str, s: float, planned: bool = True) -> Cell:
    """A cell the file does not hold: missing where the run plans one, '-' where it does not
    (dense has no sparsity)."""
    if (method == "dense" and s > 0) or not planned:
        return Cell("-", kind="absent")
    return Cell("missing", kind="missing")


def table3_html(doc: Document, page: Path, anchors: dict) -> str:
    results = doc.results
    all_points = points(results)
    pts = [p for p in all_points if p.sweep == "sparsity_sweep"]
    levels, grid = sweep_grid(pts, _plan(results.get("config", {})))
    if not grid:
        return _paragraph("No perplexity cells of a sparsity sweep in this file.")
    tied = results_marks(results).tied
    rows = []
    for dataset, L, method, cells in grid:
        row = [dataset, L, method_cell(method, page, anchors)]
        for s, p in zip(levels, cells):
            if p is None:
                row.append(_absent(method, s))
            elif p.perplexity is None:
                row.append(Cell("failed", note=p.result.get("error", ""), kind="failed"))
            else:
                row.append(Cell(table3_cell_text(all_points, p, number), sort=p.perplexity,
                                marked=(dataset, method, s) in tied))
        rows.append(row)
    notes = table3_notes(results, bool(tied), "bold on green")
    return table(["dataset", "L", "method"] + [f"s={s:g}" for s in levels], rows,
                 notes=notes)


def key_tokens_html(doc: Document, page: Path, anchors: dict) -> str:
    pts = key_token_points(doc.results)
    if not pts:
        return ""
    levels, grid = sweep_grid(pts)
    # A cell without key tokens is in Table 3 as computed, failed or missing.
    rows = [[dataset, L, method_cell(method, page, anchors)]
            + [Cell("-", kind="absent") if p is None else
               Cell(key_token_cell_text(p, number), sort=p.result["key_token_perplexity"])
               for s, p in zip(levels, cells)]
            for dataset, L, method, cells in grid]
    return table(["dataset", "L", "method"] + [f"s={s:g}" for s in levels], rows,
                 notes=[KEY_TOKENS_NOTE])


def tasks_html(doc: Document, page: Path, anchors: dict) -> str:
    # A sparse method's s = 0 cell (dense's) is planned at the sparsity sweep's L only.
    sweep_length = (_plan(doc.results.get("config", {})) or {}).get("context_length")
    out = []
    for task, caption, columns, rows in accuracy_tables(doc.results):
        out.append(table(
            ["method"] + [f"L={L} s={s:g}" for L, s in columns],
            [[method_cell(method, page, anchors)]
             + [_absent(method, s, s > 0 or L == sweep_length) if p is None else
                Cell(task_cell_text(p.result, number), sort=p.result["accuracy"])
                for (L, s), p in zip(columns, cells)]
             for method, cells in rows],
            caption=f"{task} ({caption})"))
    return "\n".join(out)


def figures_html(doc: Document) -> str:
    out = []
    for path in doc.figures:
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        out.append(f'<figure><img alt="{_e(Path(path).stem)}" '
                   f'src="data:image/png;base64,{data}"><figcaption>{_e(Path(path).name)}'
                   "</figcaption></figure>")
    return "\n".join(out) or _paragraph("No figures: no cell this file holds can be drawn.")


def _comparison_tables(results: dict, pairs: list) -> str:
    rows, task_rows = comparisons(results, pairs), task_comparisons(results, pairs)
    if not rows and not task_rows:
        return _paragraph("No finished cells at s > 0 on both sides.")
    return "\n".join(table(head, cells, notes=[footnote])
                     for head, cells, footnote in sections(rows, task_rows))


def comparisons_html(doc: Document) -> str:
    """What `python -m eval.compare` prints for the file: every method against dense, and the
    best sparse method against the runner-up of each dataset at the highest sparsity."""
    blocks = [("--baseline dense", lambda: method_pairs(doc.results, baseline="dense"))]
    pairs = {}  # each pair once, whichever of the two leads on which dataset
    for best, second in best_and_runner_up(doc.results):
        pairs.setdefault(frozenset((best.method, second.method)), (second.method, best.method))
    blocks += [(f"--methods {second} {best}", lambda pair=(second, best): [pair])
               for second, best in pairs.values()]
    out = []
    for arguments, pairs_of in blocks:
        try:
            body = _comparison_tables(doc.results, pairs_of())
        except ValueError as err:  # no dense in the file; cells without per-window sums
            body = _paragraph(f"Not computed: {err}")
        out.append(f"<h4><code>python -m eval.compare {_e(doc.path.name)} {_e(arguments)}"
                   f"</code></h4>\n{body}")
    return "\n".join(out)


def failed_html(doc: Document) -> str:
    failed = failed_cells(doc.results)
    if not failed:
        return ""
    return table(["section", "dataset or task", "method", "sweep", "point", "error"],
                 [[*where, Cell(error, kind="failed text")] for *where, error in failed],
                 caption="Cells that failed (a rerun of the same command retries them)")


def status_notes(doc: Document) -> list:
    config = doc.results.get("config", {})
    notes = []
    status = config.get("status")
    if status not in (None, "complete"):
        notes.append(f"This run's status is '{status}' (it was written before every cell "
                     "had finished, or some failed): cells it does not hold are shown as "
                     "missing.")
    if config.get("cells_missing"):
        notes.append("Missing cells: " + ", ".join(map(str, config["cells_missing"])) + ".")
    failed = len(failed_cells(doc.results))
    if failed:
        notes.append(f"{failed} {'cell' if failed == 1 else 'cells'} failed; the errors are "
                     "under 'Failed cells'.")
    older = older_format_note(doc.results)
    return notes + ([older] if older else [])


def document_html(index: int, doc: Document, page: Path, anchors: dict) -> str:
    anchor = f"file{index}"
    parts = [f'<p class="path">{_e(doc.path)}</p>']
    parts += [_paragraph(note, "warning") for note in status_notes(doc)]
    parts.append(section(f"{anchor}-provenance", "Provenance",
                         provenance(doc, page, anchors)))
    parts.append(section(f"{anchor}-table3", "Table 3: perplexity by method and sparsity",
                         table3_html(doc, page, anchors)))
    key_tokens = key_tokens_html(doc, page, anchors)
    if key_tokens:
        parts.append(section(f"{anchor}-key-tokens", "Key-token perplexity", key_tokens))
    if task_points(doc.results):
        parts.append(section(f"{anchor}-tasks", "Tasks: accuracy with Wilson 95% intervals",
                             tasks_html(doc, page, anchors)))
    parts.append(section(f"{anchor}-figures", "Figures", figures_html(doc)))
    parts.append(section(f"{anchor}-compare", "Paired comparisons", comparisons_html(doc)))
    failed = failed_html(doc)
    if failed:
        parts.append(section(f"{anchor}-failed", "Failed cells", failed))
    return section(anchor, doc.label, "\n".join(parts), level=2)


# -- several results files -----------------------------------------------------------------

def _letters(docs: list) -> list:
    return [chr(ord("A") + i) if i < 26 else f"F{i + 1}" for i in range(len(docs))]


def differences(docs: list) -> list:
    """[(setting, [value in each file])] of the config settings (run bookkeeping aside) whose
    values differ between the files."""
    flat = [{k: v for k, v in _flatten(d.results.get("config", {})).items()
             if k.split(".")[0] not in BOOKKEEPING} for d in docs]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    missing = object()
    return [(k, ["(absent)" if f.get(k, missing) is missing else _value_text(f[k])
                 for f in flat])
            for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1
            or any(k not in f for f in flat)]


def _points_by_key(results: dict) -> dict:
    """{(dataset, L, s, method): Point} of the perplexity cells, each point once (a finished
    cell before a failed one); a sparse method's s = 0 cell, dense's, is left out."""
    found = {}
    for p in sorted(points(results), key=lambda p: p.perplexity is None):
        if p.method == "dense" or p.sparsity > 0:
            found.setdefault((p.dataset, p.context_length, p.sparsity, p.method), p)
    return found


def _ranks(found: dict) -> dict:
    """{key: rank} of the finished sparse cells among those at the same (dataset, L, s), 1
    the lowest perplexity."""
    groups = {}
    for key, p in found.items():
        if p.method != "dense" and p.perplexity is not None:
            groups.setdefault(key[:3], []).append((p.perplexity, key))
    return {key: rank for group in groups.values()
            for rank, (_, key) in enumerate(sorted(group), start=1)}


def _keys_in_order(found: list) -> list:
    """The (dataset or task, L, s, method) keys of every file, datasets and methods in the
    order the files first name them, then by L and s."""
    names = list(dict.fromkeys(k[0] for f in found for k in f))
    methods = list(dict.fromkeys(k[3] for f in found for k in f))
    return sorted({k for f in found for k in f}, key=lambda k: (
        names.index(k[0]), k[1], k[2], methods.index(k[3])))


def across_perplexity(docs: list, letters: list, page: Path, anchors: dict) -> str:
    found = [_points_by_key(d.results) for d in docs]
    every_point = [points(d.results) for d in docs]
    ranks = [_ranks(f) for f in found]
    keys = _keys_in_order(found)
    if not keys:
        return ""
    head = ["dataset", "L", "s", "method"]
    for letter in letters:
        head += [f"{letter}: PPL", f"{letter}: change vs its dense", f"{letter}: rank"]
    rows = []
    for key in keys:
        row = [key[0], str(key[1]), f"{key[2]:g}", method_cell(key[3], page, anchors)]
        for f, all_points, rank in zip(found, every_point, ranks):
            p = f.get(key)
            if p is None or p.perplexity is None:
                row += [Cell("missing", kind="missing") if p is None else
                        Cell("failed", note=p.result.get("error", ""), kind="failed"),
                        Cell("-"), Cell("-")]
                continue
            delta = point_delta_vs_dense(all_points, p)
            reference = p.method == "dense" or p.sparsity == 0 or delta is None
            row += [Cell(number(p.perplexity), sort=p.perplexity),
                    Cell("-") if reference else Cell(change_text(
                        delta, p.result.get("delta_vs_dense_ci95")), sort=delta),
                    Cell(str(rank[key]), sort=rank[key]) if key in rank else Cell("-")]
        rows.append(row)
    return table(head, rows, notes=[
        "Each file's change is against its own dense cell at the same dataset and L, with its "
        "paired 95% interval (docs/statistics.md); rank: 1 is the lowest perplexity among the "
        "sparse methods at that dataset, L and s in that file. The page does not pair the "
        "files: where two scored the same windows (one model and data under two protocols or "
        "options), python -m eval.compare A.json --against B.json pairs each method's cells; "
        "another model tokenises the text into other windows, so compare the changes and "
        "ranks, each with its own interval."])


def ranking_agreement(docs: list, letters: list) -> str:
    """Per (dataset, L, s) that several files hold: each file's order of the sparse methods
    and Kendall's tau of each file's order against the first file's (1: the same order)."""
    from scipy.stats import kendalltau
    found = [_points_by_key(d.results) for d in docs]
    groups = {}
    for i, f in enumerate(found):
        for key, p in f.items():
            if p.method != "dense" and p.perplexity is not None:
                groups.setdefault(key[:3], {}).setdefault(i, {})[key[3]] = p.perplexity
    head = ["dataset", "L", "s"] + [f"{letter}: order (best first)" for letter in letters] \
        + [f"Kendall's tau {letter} vs {letters[0]}" for letter in letters[1:]]
    rows = []
    for (dataset, L, s), by_file in groups.items():
        if len(by_file) < 2:
            continue
        row = [dataset, str(L), f"{s:g}"]
        row += [" < ".join(sorted(by_file[i], key=by_file[i].get)) if i in by_file else
                Cell("missing", kind="missing") for i in range(len(docs))]
        for i in range(1, len(docs)):
            common = [m for m in by_file.get(0, {}) if m in by_file.get(i, {})]
            tau = (kendalltau([by_file[0][m] for m in common],
                              [by_file[i][m] for m in common]).statistic
                   if len(common) >= 2 else math.nan)
            row.append(Cell(f"{tau:+.2f}", sort=tau) if math.isfinite(tau) else Cell("-"))
        rows.append(row)
    if not rows:
        return ""
    return table(head, rows, notes=[
        "Kendall's tau over the methods both files hold at that point: +1 the same order, "
        "-1 the reverse; with a few methods and a few windows a cell, a swap of two methods "
        "within their intervals moves it as much as a real change of ranking."])


def _task_accuracies(results: dict) -> dict:
    """{(task, L, s, method): R} of the finished task cells; a sparse method's s = 0 cell,
    dense's, is left out."""
    return {(p.task, p.context_length, p.sparsity, p.method): p.result
            for p in task_points(results) if p.method == "dense" or p.sparsity > 0}


def across_tasks(docs: list, letters: list, page: Path, anchors: dict) -> str:
    found = [_task_accuracies(d.results) for d in docs]
    keys = _keys_in_order(found)
    if not keys:
        return ""
    head = ["task", "L", "s", "method"]
    for letter in letters:
        head += [f"{letter}: accuracy [95% interval]", f"{letter}: vs its dense"]
    rows = []
    for key in keys:
        row = [key[0], str(key[1]), f"{key[2]:g}", method_cell(key[3], page, anchors)]
        for f in found:
            r = f.get(key)
            if r is None:
                row += [Cell("missing", kind="missing"), Cell("-")]
                continue
            dense = next((d for (t, L, _, m), d in f.items()
                          if (t, L, m) == (key[0], key[1], "dense")), None)
            difference = None if dense is None or key[3] == "dense" else \
                r["accuracy"] - dense["accuracy"]
            row += [Cell(task_cell_text(r, number), sort=r["accuracy"]),
                    Cell("-") if difference is None else Cell(f"{difference:+.2f}",
                                                              sort=difference)]
        rows.append(row)
    return table(head, rows, notes=[
        "vs its dense: the accuracy minus that of the same file's dense cell on the same task "
        "and L; python -m eval.compare gives the paired test within a file."])


def across_html(docs: list, page: Path, anchors: dict) -> str:
    letters = _letters(docs)
    diff = differences(docs)
    legend = table(["file", "results", "what sets it apart (the first settings that differ)"],
                   [[letter, str(d.path), "; ".join(f"{k} = {values[i]}"
                                                    for k, values in diff[:4]) or "-"]
                    for i, (letter, d) in enumerate(zip(letters, docs))])
    parts = [legend, section("across-settings", "Settings that differ", table(
        ["setting"] + letters, [[k, *values] for k, values in diff]) if diff else
        _paragraph("The files' settings are the same (run bookkeeping aside)."), level=3)]
    perplexity = across_perplexity(docs, letters, page, anchors)
    if perplexity:
        parts.append(section("across-perplexity", "Perplexity, the same method and point in "
                             "each file", perplexity))
    agreement = ranking_agreement(docs, letters)
    if agreement:
        parts.append(section("across-ranking", "Does the ranking hold?", agreement))
    tasks = across_tasks(docs, letters, page, anchors)
    if tasks:
        parts.append(section("across-tasks", "Tasks, the same method and point in each file",
                             tasks))
    return section("across", "Across the files", "\n".join(parts), level=2)


# -- the page ------------------------------------------------------------------------------

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 2em 4em; color: #222; }
header { border-bottom: 1px solid #ccc; margin-bottom: 1em; }
nav a { margin-right: 1em; }
h2 { border-top: 3px solid #345; padding-top: .6em; margin-top: 2em; }
table { border-collapse: collapse; margin: .6em 0; font-variant-numeric: tabular-nums; }
caption { text-align: left; font-weight: 600; padding: .3em 0; }
th, td { border: 1px solid #ccc; padding: .25em .55em; text-align: left; vertical-align: top;
         white-space: nowrap; }
td.text { white-space: normal; max-width: 50em; word-break: break-word; }
th { background: #eef1f5; cursor: pointer; user-select: none; position: sticky; top: 0; }
th[aria-sort=ascending]::after { content: " \\25B2"; }
th[aria-sort=descending]::after { content: " \\25BC"; }
td.marked { background: #e6f4e6; }
td.missing, td.absent { color: #888; font-style: italic; }
td.failed { color: #a00; }
.cell-note { font-size: 12px; color: #a00; white-space: pre-wrap; max-width: 40em; }
p.note { color: #444; max-width: 70em; font-size: 13px; }
p.warning { background: #fff4d6; border-left: 4px solid #e0a800; padding: .4em .8em;
            max-width: 70em; }
p.path { color: #666; font-family: monospace; }
dl.provenance { display: grid; grid-template-columns: max-content 1fr; gap: .2em 1em; }
dl.provenance dt { font-weight: 600; }
dl.provenance dd { margin: 0; font-family: monospace; word-break: break-word; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #666; font-size: 12px; }
"""

# Sorts a table by the clicked column: by data-sort when a cell has it, else by the number
# its text starts with ("<0.001" just below 0.001), else by its text; cells without a number
# stay below those with one in either direction.
SCRIPT = r"""
function sortKey(td) {
  const raw = td.dataset.sort !== undefined ? td.dataset.sort : td.textContent.trim();
  const m = raw.match(/^(<)?\s*([+-]?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?)/i);
  return m ? parseFloat(m[2]) * (m[1] ? 1 - 1e-9 : 1) : raw;
}
document.querySelectorAll("table.sortable thead th").forEach(th => {
  th.addEventListener("click", () => {
    const table = th.closest("table"), body = table.tBodies[0], i = th.cellIndex;
    const ascending = th.getAttribute("aria-sort") !== "ascending";
    table.querySelectorAll("thead th").forEach(h => h.removeAttribute("aria-sort"));
    th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    const rows = Array.from(body.rows);
    rows.sort((a, b) => {
      const x = sortKey(a.cells[i]), y = sortKey(b.cells[i]);
      const xn = typeof x === "number", yn = typeof y === "number";
      if (xn !== yn) return xn ? -1 : 1;
      const order = xn ? x - y : x.localeCompare(y);
      return ascending ? order : -order;
    });
    rows.forEach(row => body.appendChild(row));
  });
});
"""


def _labels(paths: list) -> list:
    """File names, with their folder where two share a name."""
    names = [p.name for p in paths]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]


def page_html(docs: list, page: Path) -> str:
    anchors = method_anchors()
    title = "cabattn results: " + ", ".join(d.label for d in docs)
    nav = ['<a href="#across">across the files</a>'] if len(docs) > 1 else []
    nav += [f'<a href="#file{i}">{_e(d.label)}</a>' for i, d in enumerate(docs)]
    command = shlex.join(["python", "-m", "eval.report", *map(str, (d.path for d in docs)),
                          "--html", str(page)])
    statistics = REPO / "docs" / "statistics.md"
    reading = (f'<a href="{_e(_link_from(page, statistics))}">docs/statistics.md</a>'
               if statistics.is_file() else "docs/statistics.md")
    body = [f"<header><h1>{_e(title)}</h1>",
            f'<p class="note">Written {_e(datetime.now().isoformat(timespec="seconds"))}; '
            f"<code>{_e(command)}</code> writes it again. Click a column's heading to sort by "
            "it; a method links to its definition. How to read the intervals, p-values and "
            f"marks: {reading}.</p>",
            f"<nav>{' '.join(nav)}</nav></header><main>"]
    if len(docs) > 1:
        body.append(across_html(docs, page, anchors))
    body += [document_html(i, d, page, anchors) for i, d in enumerate(docs)]
    body.append("</main>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(body) + f"\n<script>{SCRIPT}</script>\n</body></html>\n")


def write_page(results_paths: list, page, figures: dict | None = None) -> Path:
    """Write the page of the results files to `page` and return its path. figures: {results
    path: paths make_report wrote for it} (its PNGs are embedded); a file not in it has its
    figures drawn into a temporary folder. CorruptFileError for a file that is not a results
    document."""
    page = Path(page)
    paths = [Path(p) for p in results_paths]
    loaded = [load_results(p) for p in paths]  # every file checked before anything is drawn
    figures = dict(figures or {})
    with tempfile.TemporaryDirectory() as scratch:
        docs = []
        for path, results, label in zip(paths, loaded, _labels(paths)):
            written = figures.get(path)
            if written is None:
                written = make_report(path, Path(scratch) / str(len(docs)))
            docs.append(Document(path, results, label,
                                 [p for p in written if Path(p).suffix == ".png"]))
        text = page_html(docs, page)
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(text)
    return page


def write_report(results_path, output_dir=None) -> list:
    """make_report's figures and tables, then the page of the results file beside them
    (<stem>.html); the paths written, the page last."""
    results_path = Path(results_path)
    paths = make_report(results_path, output_dir)
    folder = Path(output_dir) if output_dir else results_path.parent
    page = write_page([results_path], folder / f"{results_path.stem}.html",
                      {results_path: paths})
    return paths + [page]
