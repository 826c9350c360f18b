"""python -m eval.compare RESULTS.json --methods A B | --baseline A | --against OTHER.json:
paired comparisons.

For every dataset, context length L and sparsity s where both methods have a cell, the change
of B's perplexity relative to A's (PPL_B / PPL_A - 1) on the same windows, with its paired 95%
bootstrap interval, the sign-flip permutation p-value, Holm's correction over all the
comparisons printed, and the windows that would resolve a 1% and a 0.5% change
(docs/statistics.md). A dense side is its dense cell at the same L (dense has no s).
--pool-datasets compares over the windows of every dataset at once, one row per (L, s).
Task cells (docs/tasks.md) are compared on the same samples: both accuracies with their
Wilson intervals, the samples only one side got right, McNemar's exact p (a sign-flip test for
fractional scores), Holm over the task comparisons, and, for teacher-forced cells, the paired
changes of the answer's and of the prompt's perplexity (would perplexity have said so?).
--pool-datasets pools the tasks alike: one row per (L, s) over every task's samples.
--against OTHER.json compares each method of OTHER with the same method here, cell by cell on
the same windows or samples (refused where they differ): the same data and model under another
protocol or option (the answer decoded densely or sparsely, a question-aware compression).
Writes <stem>_compare_A_B.md and .tex (<stem>_compare_vs_A.* for --baseline,
<stem>_compare_against_OTHER.* for --against) next to the results; --json prints the
comparisons as a JSON list instead of the markdown table.
"""
import argparse
import json
import math
import sys
from pathlib import Path

from .report import load_results, points
from .results import CorruptFileError, scored_alike
from .statistics import ALPHA, compare_cells, holm, paired_scores, smallest_sign_flip_p
from .tasks.report import task_points


def _cells(all_points: list, method: str) -> dict:
    """{(dataset, L, s): R} of a method's finished cells; a cell that ran dense is (L, 0)."""
    cells = {}
    for p in all_points:
        if p.method == method and p.perplexity is not None:
            dense = p.method == "dense" or p.sparsity == 0.0
            cells.setdefault((p.dataset, p.context_length, 0.0 if dense else p.sparsity),
                             p.result)
    return cells


def _pair_points(a_cells: dict, b_cells: dict, a_dense: bool, b_dense: bool) -> list:
    """[(dataset, L, s, R_A, R_B)] where both sides have a cell; s > 0 (at s = 0 every method
    is dense: nothing to compare), a dense side at (dataset, L, 0)."""
    if a_dense and b_dense:
        return []
    pairs = []
    for (dataset, L, s) in sorted({key for key in [*a_cells, *b_cells] if key[2] > 0}):
        a = a_cells.get((dataset, L, 0.0 if a_dense else s))
        b = b_cells.get((dataset, L, 0.0 if b_dense else s))
        if a is not None and b is not None:
            pairs.append((dataset, L, s, a, b))
    return pairs


def method_pairs(results: dict, methods=None, baseline=None) -> list:
    """[(A, B)]: the one pair of --methods A B, or every other method against --baseline A.
    ValueError naming the methods of the file for a method it does not hold."""
    present = list(dict.fromkeys([p.method for p in points(results)]
                                 + [p.method for p in task_points(results)]))
    asked = list(methods or []) + ([baseline] if baseline else [])
    unknown = [m for m in asked if m not in present]
    if unknown:
        raise ValueError(f"method(s) {', '.join(map(repr, unknown))} not in the results; "
                         f"methods there: {', '.join(present)}")
    if baseline:
        return [(baseline, m) for m in present if m != baseline]
    if len(methods) != 2 or methods[0] == methods[1]:
        raise ValueError(f"--methods takes two different methods, got {' '.join(methods)}")
    return [tuple(methods)]


def same_method_pairs(results: dict, other: dict, methods=None) -> list:
    """[(M, M)] for the sparse methods both files hold (or `methods`, each in both)."""
    def held(r):
        return {p.method for p in points(r) + task_points(r)}
    both = held(results) & held(other)
    missing = [m for m in methods or [] if m not in both]
    if missing:
        raise ValueError(f"method(s) {', '.join(map(repr, missing))} not in both results; "
                         f"methods in both: {', '.join(sorted(both))}")
    return [(m, m) for m in (methods or sorted(both - {"dense"}))]


def _pooled(pair_points: list) -> list:
    """The pairs of every dataset at one (L, s) as one pair, their windows side by side:
    [("ds1+ds2+...", L, s, R_A, R_B)] with R = {perplexity, windows} over all the windows."""
    groups = {}
    for dataset, L, s, ra, rb in pair_points:
        groups.setdefault((L, s), []).append((dataset, ra, rb))
    pooled = []
    for (L, s), members in sorted(groups.items()):
        sides = []
        for side in (1, 2):
            windows = {field: [x for member in members for x in member[side]["windows"][field]]
                       for field in members[0][side]["windows"]}
            ppl = math.exp(sum(windows["nll_sum"]) / sum(windows["tokens"]))
            sides.append({"perplexity": ppl, "windows": windows})
        pooled.append(("+".join(m[0] for m in members), L, s, *sides))
    return pooled


def _holm_rows(pairs: list, cells_of, pooled, row_of, alpha: float, other_cells_of=None,
               labels=None) -> list:
    """row_of(A, B, name, L, s, R_A, R_B) for every pair's shared points (pooled(points) when
    pooling), Holm-corrected over the whole list. other_cells_of: B's cells come from another
    results file (its cells must hold the same windows or samples: same_windows), and the
    sides are named `labels` (A's, B's file) after their method."""
    rows = []
    for a, b in pairs:
        b_cells = (other_cells_of or cells_of)(b)
        pair_points = _pair_points(cells_of(a), b_cells, a == "dense",
                                   b == "dense" and other_cells_of is None)
        if other_cells_of is not None:  # one file's cells share their windows by construction
            for point in pair_points:
                same_windows(*point[3:], f"{point[0]} L={point[1]} s={point[2]:g}")
        if labels:
            a, b = f"{a} ({labels[0]})", f"{b} ({labels[1]})"
        rows += [row_of(a, b, *point) for point in (pooled(pair_points) if pooled
                                                     else pair_points)]
    adjusted, significant = holm([r["p_value"] for r in rows], alpha)
    for row, p, flag in zip(rows, adjusted, significant):
        row.update(p_holm=p, significant=flag)
    return rows


def same_windows(ra: dict, rb: dict, where: str) -> None:
    """ValueError unless two cells scored the same windows or samples (the pairing needs them):
    the same byte counts window by window, or the same needle depths sample by sample."""
    if "per_sample" in ra or "per_sample" in rb:
        a, b = ([x.get("depth") for x in r.get("per_sample", [])] for r in (ra, rb))
        what = "samples"
    else:
        a, b = (r.get("windows", {}).get("bytes") for r in (ra, rb))
        what = "windows"
    if a != b:
        raise ValueError(f"{where}: the two cells did not score the same {what} (other "
                         "data, model or max_windows), so they cannot be paired")


def _other_cells(other: dict, cells, all_points_of):
    """B's cells from another results file, or None when B is the same file."""
    if other is None:
        return None
    points_b = all_points_of(other)
    return lambda method: cells(points_b, method)


def comparisons(results: dict, pairs: list, alpha: float = ALPHA, pool: bool = False,
                other: dict = None, labels=None) -> list:
    """One dict per (A, B, dataset, L, s), Holm-corrected over the whole list; pool: one per
    (A, B, L, s) over the windows of every dataset (paired window by window as before).
    other: B's cells come from this results file (the same windows under another protocol
    or option), the sides named by `labels`."""
    all_points = points(results)
    seed = results.get("config", {}).get("seed", 0)

    def row_of(a, b, dataset, L, s, ra, rb):
        change = compare_cells(ra, rb, seed, where=f"{dataset} L={L} s={s:g} ({a}, {b})")
        return {"dataset": dataset, "context_length": L, "sparsity": s, "a": a, "b": b,
                "perplexity_a": ra["perplexity"], "perplexity_b": rb["perplexity"], **change}

    def pooled(pair_points):
        return _pooled([p for p in pair_points if "windows" in p[3] and "windows" in p[4]])

    return _holm_rows(pairs, lambda method: _cells(all_points, method), pool and pooled,
                      row_of, alpha, _other_cells(other, _cells, points), labels)


def _task_cells(all_points: list, method: str) -> dict:
    """{(task, L, s): R} of a method's finished task cells; a cell that ran dense is (L, 0)."""
    return {(p.task, p.context_length, 0.0 if p.method == "dense" else p.sparsity): p.result
            for p in all_points if p.method == method and p.result.get("per_sample")}


def _pooled_samples(pair_points: list) -> list:
    """The pairs of every task at one (L, s) as one pair, their samples side by side."""
    groups = {}
    for task, L, s, ra, rb in pair_points:
        groups.setdefault((L, s), []).append((task, ra, rb))
    return [("+".join(m[0] for m in members), L, s,
             *({"per_sample": [x for m in members for x in m[side]["per_sample"]]}
               for side in (1, 2)))
            for (L, s), members in sorted(groups.items())]


def _sample_windows(r: dict, nll: str, tokens: str) -> dict:
    """A task cell's samples as the windows of a perplexity cell (for compare_cells)."""
    return {"windows": {"nll_sum": [x[nll] for x in r["per_sample"]],
                        "tokens": [x[tokens] for x in r["per_sample"]]}}


def task_comparisons(results: dict, pairs: list, alpha: float = ALPHA,
                     pool: bool = False, other: dict = None, labels=None) -> list:
    """One dict per (A, B, task, L, s) with task cells on both sides, Holm-corrected over the
    whole list: the paired accuracies (paired_scores) and, where both cells were scored
    teacher-forced, the paired change of the answer's perplexity and of the prompt's. other,
    labels: as comparisons'."""
    all_points = task_points(results)
    seed = results.get("config", {}).get("seed", 0)

    def row_of(a, b, task, L, s, ra, rb):
        row = {"task": task, "context_length": L, "sparsity": s, "a": a, "b": b,
               **paired_scores([x["score"] for x in ra["per_sample"]],
                               [x["score"] for x in rb["per_sample"]], seed)}
        for name, nll, tokens in (("answer", "answer_nll", "answer_tokens"),
                                  ("prompt", "window_nll", "window_predictions")):
            change = None
            if all(nll in x for x in ra["per_sample"] + rb["per_sample"]) and (
                    name == "answer" or scored_alike(ra, rb)):
                change = compare_cells(_sample_windows(ra, nll, tokens),
                                       _sample_windows(rb, nll, tokens), seed,
                                       f"{task} L={L} s={s:g} ({a}, {b})")
            row.update({f"{name}_change": change and change["change"],
                        f"{name}_ci95": change and change["ci95"],
                        f"{name}_p": change and change["p_value"]})
        return row

    return _holm_rows(pairs, lambda method: _task_cells(all_points, method),
                      pool and _pooled_samples, row_of, alpha,
                      _other_cells(other, _task_cells, task_points), labels)


def _percent(x: float) -> str:
    return f"{x * 100:+.2f}%"


def _interval(ci) -> str:
    return f"[{ci[0] * 100:+.2f}, {ci[1] * 100:+.2f}]%"


def _p(p: float) -> str:
    return f"{p:.2g}" if p >= 0.001 else "<0.001"


def _cells_text(row: dict) -> list:
    return [row["dataset"], str(row["context_length"]), f"{row['sparsity']:g}", row["a"],
            row["b"], f"{row['perplexity_a']:.3f}", f"{row['perplexity_b']:.3f}",
            _percent(row["change"]), _interval(row["ci95"]), _p(row["p_value"]),
            _p(row["p_holm"]), "yes" if row["significant"] else "no",
            str(row["num_windows"]), str(row["windows_needed_1pct"] or "-"),
            str(row["windows_needed_0.5pct"] or "-")]


HEAD = ["dataset", "L", "s", "A", "B", "PPL A", "PPL B", "change B vs A", "95% CI", "p",
        "p (Holm)", "significant", "windows", "windows for 1%", "windows for 0.5%"]


def _footnote(rows: list) -> str:
    return (f"Change: PPL_B / PPL_A - 1 on the same windows; 95% CI: paired percentile bootstrap "
            f"(10,000 resamples); p: paired sign-flip permutation test, Holm-corrected over the "
            f"{len(rows)} comparisons (significant: p (Holm) < {ALPHA:g}); windows for 1%: "
            "windows whose interval would be +-1% wide, from the spread of the per-window "
            "differences.")


def _change_text(row: dict, name: str) -> str:
    if row[f"{name}_change"] is None:
        return "-"
    return f"{_percent(row[f'{name}_change'])} {_interval(row[f'{name}_ci95'])}"


def _task_cells_text(row: dict) -> list:
    discordant = ("-" if row["a_only"] is None else f"{row['a_only']} / {row['b_only']}")
    return [row["task"], str(row["context_length"]), f"{row['sparsity']:g}", row["a"],
            row["b"], f"{row['accuracy_a']:.2f}", f"{row['accuracy_b']:.2f}",
            f"{row['difference']:+.2f}", discordant, _p(row["p_value"]), _p(row["p_holm"]),
            "yes" if row["significant"] else "no", _change_text(row, "answer"),
            _change_text(row, "prompt"), str(row["samples"])]


TASK_HEAD = ["task", "L", "s", "A", "B", "acc A", "acc B", "B - A", "only A / only B", "p",
             "p (Holm)", "significant", "answer PPL change B vs A", "prompt PPL change B vs A",
             "samples"]


def _task_footnote(rows: list) -> str:
    tests = {"McNemar": "McNemar's exact test on the samples only one side got right",
             "sign-flip": "paired sign-flip test of the per-sample score differences"}
    used = " or ".join(tests[t] for t in sorted({r["test"] for r in rows}))
    return (f"Task cells on the same samples. p: {used}, Holm-corrected over the "
            f"{len(rows)} task comparisons (significant: p (Holm) < {ALPHA:g}); answer and "
            "prompt PPL change: PPL_B / PPL_A - 1 of the answer tokens and of the whole "
            "prompt, with paired percentile bootstrap intervals over samples (teacher-forced "
            "cells only).")


def sections(rows: list, task_rows: list) -> list:
    """[(head, cell rows as text, footnote)] of the perplexity and the task comparisons."""
    return ([(HEAD, [_cells_text(r) for r in rows], _footnote(rows))] if rows else []) + \
        ([(TASK_HEAD, [_task_cells_text(r) for r in task_rows], _task_footnote(task_rows))]
         if task_rows else [])


def markdown(rows: list, task_rows: list = ()) -> str:
    parts = []
    for head, cells, footnote in sections(rows, task_rows):
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(c) + " |" for c in cells]
        parts.append("\n".join(lines) + "\n\n" + footnote + "\n")
    return "\n".join(parts)


def latex(rows: list, task_rows: list = ()) -> str:
    from .report import _tex
    parts = []
    for head, cells, footnote in sections(rows, task_rows):
        lines = [f"% {footnote}", r"\begin{tabular}{llrll" + "r" * (len(head) - 5) + "}",
                 r"\toprule", " & ".join(_tex(h) for h in head) + r" \\", r"\midrule"]
        lines += [" & ".join(_tex(c) for c in row) + r" \\" for row in cells]
        lines += [r"\bottomrule", r"\end{tabular}"]
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def write_tables(results_path: Path, rows: list, label: str, task_rows: list = ()) -> list:
    paths = []
    for suffix, text in (("md", markdown(rows, task_rows)), ("tex", latex(rows, task_rows))):
        path = results_path.with_name(f"{results_path.stem}_compare_{label}.{suffix}")
        path.write_text(text)
        paths.append(path)
    return paths



def best_and_runner_up(results: dict) -> list:
    """[(best, runner-up)] Points per dataset at the sparsity sweep's highest s: the two sparse
    methods with the lowest perplexity there (the comparison a reader of Table 3 makes
    first); datasets with fewer than two such cells (or none with per-window sums) have none."""
    all_points = [p for p in points(results) if p.sweep == "sparsity_sweep"
                  and p.method != "dense" and p.sparsity > 0 and p.perplexity is not None
                  and "windows" in p.result]
    pairs = []
    for dataset in dict.fromkeys(p.dataset for p in all_points):
        mine = [p for p in all_points if p.dataset == dataset]
        s = max(p.sparsity for p in mine)
        ranked = sorted((p for p in mine if p.sparsity == s), key=lambda p: p.perplexity)
        if len(ranked) >= 2:
            pairs.append(tuple(ranked[:2]))
    return pairs


def headline(results: dict) -> list:
    """Lines for the end of a run: per dataset, at the sparsity sweep's highest s, the best
    sparse method against the runner-up (best_and_runner_up), with its paired interval,
    p-value, whether it is resolved and the windows that would resolve a 1% and a 0.5% change
    (docs/statistics.md, How many windows)."""
    seed = results.get("config", {}).get("seed", 0)
    lines = []
    for best, second in best_and_runner_up(results):
        c = compare_cells(second.result, best.result, seed)
        n = c["num_windows"]
        floor = smallest_sign_flip_p(n)
        verdict = ("resolved" if c["p_value"] < ALPHA else "NOT resolved"
                   + (f" (with {n} windows no p-value can be below {floor:.3g})"
                      if floor >= ALPHA else ""))
        lines.append(f"  {best.dataset} L={best.context_length} s={best.sparsity:g}: "
                     f"{best.method} (PPL {best.perplexity:.3f}) vs {second.method} "
                     f"({second.perplexity:.3f}): {_percent(c['change'])} "
                     f"{_interval(c['ci95'])}, p {_p(c['p_value'])}, {n} windows: {verdict}; "
                     f"windows to resolve 1%: {c['windows_needed_1pct'] or '-'}, 0.5%: "
                     f"{c['windows_needed_0.5pct'] or '-'}")
    if lines:
        lines.insert(0, "paired statistics, best vs runner-up at the highest sparsity "
                        "(python -m eval.compare RESULTS.json --baseline dense for all):")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="a results JSON written by python -m eval.run")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--methods", nargs="+", metavar="M",
                       help="compare B against A (two methods); with --against, the methods to "
                       "compare across the two files (default: every method both hold)")
    which.add_argument("--baseline", metavar="A", help="compare every other method against A")
    parser.add_argument("--against", metavar="OTHER.json",
                        help="compare each method of OTHER.json with the same method here, on "
                        "the same windows or samples (another protocol or option of the same "
                        "data and model): change of OTHER's against this file's")
    parser.add_argument("--pool-datasets", action="store_true",
                        help="one comparison per (L, s) over the windows of every dataset "
                        "(more windows, so smaller differences resolve; the change is then "
                        "over all their tokens), and over the samples of every task")
    parser.add_argument("--json", action="store_true",
                        help="print the comparisons as a JSON list (no table)")
    args = parser.parse_args(argv)
    path = Path(args.results)
    if args.against is None and args.baseline is None and (args.methods is None
                                                           or len(args.methods) != 2):
        parser.error("give --methods A B, --baseline A, or --against OTHER.json")
    try:
        results = load_results(path)
        other = labels = None
        if args.against:
            other = load_results(args.against)
            labels = (path.stem, Path(args.against).stem)
            pairs = same_method_pairs(results, other, args.methods)
        else:
            pairs = method_pairs(results, args.methods, args.baseline)
        rows = comparisons(results, pairs, pool=args.pool_datasets, other=other,
                           labels=labels)
        task_rows = task_comparisons(results, pairs, pool=args.pool_datasets, other=other,
                                     labels=labels)
    except (CorruptFileError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not rows and not task_rows:
        print("error: the two sides share no (dataset or task, L, s) with finished cells at "
              "s > 0", file=sys.stderr)
        return 2
    label = (f"against_{labels[1]}" if labels else f"vs_{args.baseline}" if args.baseline
             else "_".join(args.methods)) + ("_pooled" if args.pool_datasets else "")
    paths = write_tables(path, rows, label, task_rows)
    if args.json:
        print(json.dumps(rows + task_rows, indent=2))
        return 0
    for written in paths:
        print(f"wrote {written}")
    print()
    print(markdown(rows, task_rows), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
