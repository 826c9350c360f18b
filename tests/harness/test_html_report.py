"""The results page (eval.html_report, docs/running.md) read back with an HTML parser: what it
shows of one results file and across several, and what it does with partial, failed, older and
foreign files. The page in a real browser: test_page_in_browser.py."""
import base64
import json
import re

import pytest
from helpers import REPO
from page_fixtures import results_document
from page_parsing import parse_page, tables_in

from eval import html_report, report
from eval.report.__main__ import main as report_main
from eval.results import CorruptFileError, write_json_atomic
from eval.statistics import smallest_sign_flip_p, windows_to_resolve


def write(tmp_path, name, document):
    path = tmp_path / f"{name}.json"
    write_json_atomic(path, document)
    return path


def page_of(tmp_path, *documents, names=None):
    names = names or [f"run{i}" for i in range(len(documents))]
    paths = [write(tmp_path, n, d) for n, d in zip(names, documents)]
    page = html_report.write_page(paths, tmp_path / "page.html")
    return parse_page(page.read_text()), page.read_text()


@pytest.fixture(scope="module")
def one_file(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("page")
    document = results_document(options={"question_aware": True, "continuation": 64})
    parsed, text = page_of(tmp_path, document, names=["fixture"])
    return document, parsed, text


def cell_texts(table, row_key_columns=3):
    return {tuple(c.text for c in row[:row_key_columns]): row for row in table.rows}


def test_table3_keeps_the_json_precision_and_the_markdown_intervals(one_file):
    document, parsed, _ = one_file
    (table3,) = tables_in(parsed, r"file0-table3")
    assert table3.head == ["dataset", "L", "method", "s=0", "s=0.5", "s=0.9"]
    rows = cell_texts(table3)
    markdown = {tuple(c.strip() for c in line.strip("|").split("|")[:3]): line
                for line in report.table3_markdown(document).splitlines()[2:]
                if line.startswith("|")}
    assert set(rows) == set(markdown)
    for key, row in rows.items():
        dataset, _, method = key
        for s, cell in zip(("0.0", "0.5", "0.9"), row[3:]):
            r = document["results"][dataset][method]["sparsity_sweep"].get(s)
            if r is None:
                assert cell.text == "-"  # dense has no sparsity
                continue
            assert cell.text.startswith(json.dumps(r["perplexity"]))  # every digit the JSON has
            assert float(cell.attrs["data-sort"]) == r["perplexity"]
            if "(" in cell.text:  # the change and its interval as the markdown writes them
                assert cell.text[cell.text.index("("):] in markdown[key]


def test_marks_are_those_of_the_markdown_table_and_say_what_they_mean(one_file):
    document, parsed, _ = one_file
    (table3,) = tables_in(parsed, r"file0-table3")
    marked = {(row[0].text, row[2].text, s) for row in table3.rows
              for s, c in zip((0.0, 0.5, 0.9), row[3:]) if c.bold}
    levels, rows = report.table3_rows(document)
    assert marked == {(d, m, s) for d, _, m, _, marks in rows
                      for s, mark in zip(levels, marks) if mark}
    # 12 windows resolve cab_v3's loss: it is never marked; the best of each column is.
    assert ("brown", "cab_v3", 0.9) not in marked and any(m[2] == 0.9 for m in marked)
    assert any("bold on green" in note and "Holm" in note for note in table3.notes)


def test_a_method_links_to_its_definition_in_the_docs(one_file):
    _, parsed, _ = one_file
    (table3,) = tables_in(parsed, r"file0-table3")
    links = {row[2].text: row[2].href for row in table3.rows}
    target, anchor = links["h2o"].split("#")
    # the page is outside the checkout: an absolute address of the checkout's docs
    assert target == (REPO / "docs" / "methods.md").as_uri()
    assert anchor == "h2o-heavy-hitter-oracle"  # GitHub's anchor of the heading below
    assert "\n## h2o (Heavy-Hitter Oracle)\n" in (REPO / "docs" / "methods.md").read_text()
    assert links["dense"].endswith("docs/methods.md#dense-and-every-method-at-s--0")


def test_a_page_inside_the_checkout_links_the_docs_relatively(tmp_path, monkeypatch):
    checkout = tmp_path / "checkout"  # a stand-in, so that the test writes nothing in REPO
    (checkout / "docs").mkdir(parents=True)
    for name in html_report.METHOD_DOCS:
        (checkout / name).write_text((REPO / name).read_text())
    monkeypatch.setattr(html_report, "REPO", checkout)
    path = write(tmp_path, "run", results_document(tasks=False))
    text = html_report.write_page([path], checkout / "docs" / "pages" / "p.html").read_text()
    assert 'href="../methods.md#h2o-heavy-hitter-oracle"' in text  # moves with the checkout


def test_provenance_shows_the_protocol_and_every_option_without_knowing_them(one_file):
    _, parsed, text = one_file
    # question_aware and continuation are options this code has never heard of: the config
    # block and the cells carry them, so the page shows them.
    assert re.search(r"protocol = mask; .*question_aware = true", text)
    assert "continuation = 64" in text
    assert "block_size = auto (the cells: 16)" in text
    for expected in ("tiny-llama", "num_parameters 123456", "torch 2.14.1",
                     "cabattn_commit abc123", "platform Linux-x86_64",
                     "2026-12-07T06:00:00 to 2026-12-07T06:05:00",
                     "python -m eval.run --protocol mask --name fixture"):
        assert expected in text, expected
    (methods,) = [t for t in tables_in(parsed, r"file0-provenance") if t.head[0] == "method"]
    assert [r[0].text for r in methods.rows] == ["dense", "h2o", "cab_v4", "cab_v3"]
    assert '{"recent_fraction": 0.5}' in methods.rows[1][1].text
    (config,) = [t for t in tables_in(parsed, r"file0-provenance") if t.head[0] == "setting"]
    assert ["sparsity_sweep.fixed_context_length", "256"] in [[c.text for c in r]
                                                              for r in config.rows]


def test_key_tokens_tasks_figures_and_comparisons_are_on_the_page(one_file):
    document, parsed, text = one_file
    (key_tokens,) = tables_in(parsed, r"file0-key-tokens")
    assert len(key_tokens.rows) == 8 and "Key-token perplexity" in key_tokens.notes[0]
    (tasks,) = tables_in(parsed, r"file0-tasks")
    assert tasks.caption.startswith("passkey (teacher-forced, 10 samples, mask protocol")
    h2o = next(r for r in tasks.rows if r[0].text == "h2o")
    assert h2o[-1].text == "0.5 [0.24, 0.76], PPL +1.8%"  # accuracy as the JSON has it
    names = sorted(img["alt"] for img in parsed.images)
    assert names == sorted(f"fixture_{n}" for n in (
        "figure4", "figure8", "heatmap_passkey", "accuracy_vs_ppl"))
    for img in parsed.images:
        assert img["src"].startswith("data:image/png;base64,")
        assert base64.b64decode(img["src"].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    compare = tables_in(parsed, r"file0-compare")
    # vs dense: 3 methods x 2 datasets x (L=128 s=0.9, L=256 s=0.5, 0.9), then the tasks;
    # the best two of each dataset at s = 0.9: one pair, 3 points x 2 datasets, then tasks.
    assert [len(t.rows) for t in compare] == [18, 6, 6, 2]
    assert compare[0].head[:5] == ["dataset", "L", "s", "A", "B"]
    assert "python -m eval.compare fixture.json --baseline dense" in text
    assert re.search(r"python -m eval.compare fixture.json --methods (h2o cab_v4|cab_v4 h2o)",
                     text)


def test_the_page_needs_nothing_from_outside_the_file(one_file):
    _, _, text = one_file
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)
    assert "<link" not in text and "<script src" not in text
    assert text.count("<script>") == 1


def test_every_table_is_sortable_and_has_a_heading(one_file):
    _, parsed, text = one_file
    assert parsed.tables and all(t.head for t in parsed.tables)
    assert text.count('<table class="sortable">') == len(parsed.tables)


def test_marks_only_what_the_windows_can_resolve(tmp_path):
    """4 windows a cell: no paired test can reach 5%, so "not different from the best" is
    true of every cell; nothing is marked and every table says how many windows would do."""
    document = results_document(windows=4)
    levels, rows = report.table3_rows(document)
    assert not any(any(marks) for *_, marks in rows)  # cab_v3 far behind is not bold either
    marks = report.results_marks(document)
    assert marks.tests == 2 * 2 * 2  # (brown, pd-books) x (s = 0.5, 0.9) x 2 non-best methods
    assert set(marks.unresolvable) == set(marks.tested)
    assert marks.windows_to_resolve == windows_to_resolve(8) == 9  # 8 x 2/2^9 < 0.05
    expected = ("Nothing is marked: with 4 windows a cell the paired sign-flip test cannot go "
                "below p = 0.125, and Holm's correction over the table's 8 tests needs one "
                "below 0.05 / 8")
    markdown = report.table3_markdown(document)
    assert expected in markdown and "at least 9 windows a cell are needed" in markdown
    assert "**" not in markdown
    latex = report.table3_latex(document)
    assert r"\multicolumn{6}" in latex and "at least 9 windows a cell" in latex
    parsed, _ = page_of(tmp_path, document)
    (table3,) = tables_in(parsed, r"file0-table3")
    assert not any(c.bold for row in table3.rows for c in row)
    assert any(expected in note for note in table3.notes)


def test_with_enough_windows_the_same_differences_are_marked():
    marks = report.results_marks(results_document(windows=12))
    assert not marks.unresolvable and marks.windows_to_resolve == 9
    assert ("brown", "cab_v3", 0.9) not in marks.tied
    assert {("brown", "h2o", 0.9), ("pd-books", "h2o", 0.9)} & marks.tied


def test_the_windows_a_test_needs():
    assert smallest_sign_flip_p(4) == 0.125 and smallest_sign_flip_p(13) == 2 / 2 ** 13
    assert smallest_sign_flip_p(14) == 1 / 10_001  # sampled flips: p never below 1/(1+flips)
    assert windows_to_resolve(1) == 6  # 2/2^6 = 0.031 < 0.05, 2/2^5 = 0.0625 is not
    assert windows_to_resolve(24) == 10  # 24 x 2/2^10 = 0.047
    assert windows_to_resolve(600) is None  # 600 / 10,001 > 0.05: no number of windows


def test_a_partial_run_shows_its_missing_and_failed_cells(tmp_path):
    document = results_document(tasks=False)
    document["config"]["status"] = "running"
    brown = document["results"]["brown"]
    del brown["cab_v3"]  # not reached yet
    del brown["h2o"]["sparsity_sweep"]["0.5"]
    failed = brown["cab_v4"]["context_length_sweep"]["128"]
    brown["cab_v4"]["context_length_sweep"]["128"] = {
        **{k: None for k in ("perplexity", "cross_entropy", "density")},
        "error": "RuntimeError: out of memory at layer 3"}
    brown["cab_v4"]["sparsity_sweep"]["0.5"] = {"perplexity": None, "error": "boom"}
    assert failed["perplexity"] is not None
    parsed, _ = page_of(tmp_path, document)
    (table3,) = tables_in(parsed, r"file0-table3")
    rows = cell_texts(table3)
    assert [c.text for c in rows[("brown", "256", "cab_v3")][3:]] == ["missing"] * 3
    assert rows[("brown", "256", "h2o")][4].text == "missing"
    v4 = rows[("brown", "256", "cab_v4")][4]
    assert v4.text.startswith("failed") and v4.note == "boom"
    (failures,) = tables_in(parsed, r"file0-failed")
    assert {(r[2].text, r[3].text, r[4].text, r[5].text) for r in failures.rows} == {
        ("cab_v4", "context_length_sweep", "128", "RuntimeError: out of memory at layer 3"),
        ("cab_v4", "sparsity_sweep", "0.5", "boom")}
    warnings = [p["text"] for p in parsed.paragraphs if p["class"] == "warning"]
    assert any("'running'" in w and "missing" in w for w in warnings)
    assert any("2 cells failed" in w for w in warnings)


def test_a_task_cell_is_missing_only_where_the_run_plans_one(tmp_path):
    document = results_document()
    passkey = document["tasks"]["passkey"]
    for method in passkey:  # a context-length sweep at L = 128 and 256, as a run has
        s = 0.0 if method == "dense" else 0.9
        passkey[method]["context_length_sweep"] = {
            str(L): dict(passkey[method]["sparsity_sweep"][str(s)], context_length=L)
            for L in (128, 256)}
    del passkey["h2o"]["sparsity_sweep"]["0.5"]  # not reached yet
    parsed, _ = page_of(tmp_path, document)
    (tasks,) = tables_in(parsed, r"file0-tasks")
    h2o = dict(zip(tasks.head, next(r for r in tasks.rows if r[0].text == "h2o")))
    assert h2o["L=128 s=0"].text == "-"  # h2o's s = 0 is planned at the sweep's L = 256 only
    assert h2o["L=256 s=0.5"].text == "missing"
    assert h2o["L=128 s=0.9"].text.startswith("0.5 [")


def test_an_older_results_file_gets_a_note_not_a_crash(tmp_path):
    document = results_document(tasks=False)
    for methods in document["results"].values():
        for sweeps in methods.values():
            for cells in sweeps.values():
                for r in cells.values():
                    r.pop("windows", None)
                    r.pop("delta_vs_dense_ci95", None)
    parsed, text = page_of(tmp_path, document)
    warnings = [p["text"] for p in parsed.paragraphs if p["class"] == "warning"]
    assert any("older version of the harness" in w and "cell format 2" in w for w in warnings)
    assert "Not computed:" in text and "rerun the same eval.run command" in text
    (table3,) = tables_in(parsed, r"file0-table3")
    assert not any(c.bold for row in table3.rows for c in row)


def test_a_tasks_only_run_has_its_tasks_and_no_empty_table(tmp_path):
    document = results_document(datasets=())
    document["config"]["sparsity_sweep"]["sparsity_levels"] = [0.5, 0.9]
    parsed, text = page_of(tmp_path, document)
    assert not tables_in(parsed, r"file0-table3") and all(t.rows for t in parsed.tables)
    assert "No perplexity cells of a sparsity sweep in this file." in text
    (tasks,) = tables_in(parsed, r"file0-tasks")
    assert [r[0].text for r in tasks.rows] == ["dense", "h2o", "cab_v4", "cab_v3"]
    compare = tables_in(parsed, r"file0-compare")
    assert compare[0].head[0] == "task" and len(compare[0].rows) == 6  # 3 methods x 2 s
    parsed, _ = page_of(tmp_path, document, document, names=["one", "two"])
    assert not tables_in(parsed, r"across-perplexity") and tables_in(parsed, r"across-tasks")
    assert all(t.rows for t in parsed.tables)


@pytest.mark.parametrize("content, problem", [
    ('{"key": {}, "result": {"perplexity": 3.0}}', "no 'results' mapping"),
    ('[1, 2, 3]', "no 'results' mapping"),
    ('{"config": {}, "results": {"brown": [1]}}', "results['brown'] is not a mapping"),
    ('{"config": {}, "results": {"brown": {"h2o": {"sparsity_sweep": {"0.9": 3}}}}}',
     "results['brown']['h2o'] is not a mapping of sweeps"),
    ('{"results": {"brown": ', "is corrupt and cannot be read"),
])
def test_a_file_that_is_not_a_results_document_is_refused(tmp_path, capsys, content, problem):
    good = write(tmp_path, "good", results_document(tasks=False))
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    with pytest.raises(CorruptFileError, match=re.escape(problem)):
        html_report.write_page([good, bad], tmp_path / "page.html")
    assert report_main([str(good), str(bad), "--html", str(tmp_path / "page.html")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and problem in err
    assert not (tmp_path / "page.html").exists()


def test_two_files_side_by_side_each_against_its_own_dense(tmp_path):
    mask = results_document(protocol="mask", seed=0)
    kv = results_document(protocol="kv", seed=1, options={"kv_chunk": 16},
                          offsets={"h2o": 0.08, "cab_v4": 0.02, "streaming_llm": 0.1})
    parsed, text = page_of(tmp_path, mask, kv, names=["mask_run", "kv_run"])
    assert parsed.sections[0] == "across"
    (legend, settings) = tables_in(parsed, r"across|across-settings")[:2]
    assert [r[0].text for r in legend.rows] == ["A", "B"]
    assert "protocol = mask" in legend.rows[0][2].text
    assert "protocol = kv" in legend.rows[1][2].text
    diff = {r[0].text: [c.text for c in r[1:]] for r in settings.rows}
    assert diff["protocol"] == ["mask", "kv"] and diff["kv_chunk"] == ["(absent)", "16"]
    assert "started" not in diff  # run bookkeeping is not a difference of settings
    (across,) = tables_in(parsed, r"across-perplexity")
    assert across.head[4:] == ["A: PPL", "A: change vs its dense", "A: rank",
                               "B: PPL", "B: change vs its dense", "B: rank"]
    rows = {(r[0].text, r[1].text, r[2].text, r[3].text): r for r in across.rows}
    for letter, document in (("A", mask), ("B", kv)):
        r = document["results"]["brown"]["h2o"]["sparsity_sweep"]["0.9"]
        row = rows[("brown", "256", "0.9", "h2o")]
        ppl, change = row[across.head.index(f"{letter}: PPL")], \
            row[across.head.index(f"{letter}: change vs its dense")]
        assert ppl.text == json.dumps(r["perplexity"])
        assert change.text == report.change_text(r["delta_vs_dense"], r["delta_vs_dense_ci95"])
    # h2o is second of two close methods under mask, second under kv (cab_v4 loses less)
    assert rows[("brown", "256", "0.9", "cab_v3")][7].text == "missing"  # not in B
    assert rows[("brown", "256", "0.9", "streaming_llm")][4].text == "missing"  # not in A
    assert rows[("brown", "256", "0.9", "cab_v3")][6].text == "3"  # last of A's three
    (ranking,) = tables_in(parsed, r"across-ranking")
    brown = next(r for r in ranking.rows if r[0].text == "brown" and r[2].text == "0.9"
                 and r[1].text == "256")
    a_order, b_order = brown[3].text.split(" < "), brown[4].text.split(" < ")
    assert b_order == ["cab_v4", "h2o", "streaming_llm"] and a_order[-1] == "cab_v3"
    common = [m for m in a_order if m in b_order]
    assert brown[5].text == ("+1.00" if [m for m in b_order if m in common] == common
                             else "-1.00")
    (tasks,) = tables_in(parsed, r"across-tasks")
    h2o = next(r for r in tasks.rows if r[3].text == "h2o" and r[2].text == "0.9")
    assert h2o[5].text == "-0.50"  # 0.5 against its dense 1.0
    # and each file keeps its own full section below
    assert {"file0", "file1"} <= set(parsed.sections)


def test_the_command_line_writes_the_page_beside_the_figures_or_one_page_of_several(
        tmp_path, capsys):
    a = write(tmp_path, "a", results_document(tasks=False))
    b = write(tmp_path, "b", results_document(protocol="kv", tasks=False))
    assert report_main([str(a)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'a.html'}" in out and (tmp_path / "a_figure4.png").is_file()
    page = tmp_path / "both" / "ab.html"
    assert report_main([str(a), str(b), "--html", str(page)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {page}"
    assert sorted(p.name for p in page.parent.iterdir()) == ["ab.html"]  # nothing else
    assert not (tmp_path / "b_figure4.png").exists()  # --html leaves the results' folder be
    parsed = parse_page(page.read_text())
    assert parsed.sections[0] == "across" and len(parsed.images) == 4


@pytest.mark.usefixtures("single_thread")
def test_a_run_ends_with_its_page_and_two_runs_make_one_page(tiny_model, tiny_text, tmp_path,
                                                             capsys):
    from eval_assets import tiny_run_args

    from eval import cli
    results = {}
    for protocol in ("mask", "kv"):
        args = tiny_run_args(tiny_model, tiny_text, tmp_path / protocol, "--methods", "dense",
                             "h2o", "streaming_llm", "--context-lengths", "128",
                             "--sparsity-levels", "0", "0.5", "--max-windows", "3",
                             "--no-context-sweep", "--protocol", protocol)
        assert cli.main(args) == cli.EXIT_OK
        last = capsys.readouterr().out.strip().splitlines()[-1]
        page = tmp_path / protocol / "tiny.html"
        assert last.endswith(f": {page}") and "opens offline" in last
        results[protocol] = tmp_path / protocol / "tiny.json"
        text = page.read_text()
        assert f"protocol = {protocol}" in text
        parsed = parse_page(text)
        assert len(parsed.images) == 1  # Figure 8 (one context length: no Figure 4)
    # each protocol's own options, as its cells record them
    assert "kv_chunk = 1" in (tmp_path / "kv" / "tiny.html").read_text()
    assert "kv_chunk = 1" not in (tmp_path / "mask" / "tiny.html").read_text()
    both = tmp_path / "both.html"
    assert report_main([str(results["mask"]), str(results["kv"]), "--html", str(both)]) == 0
    parsed = parse_page(both.read_text())
    (across,) = tables_in(parsed, r"across-perplexity")
    for method in ("h2o", "streaming_llm"):
        row = next(r for r in across.rows if r[3].text == method)
        for letter in "AB":
            change = row[across.head.index(f"{letter}: change vs its dense")].text
            assert re.fullmatch(r"[+-]\d+\.\d% \[[+-]\d+\.\d, [+-]\d+\.\d\]", change)
    (settings,) = tables_in(parsed, r"across-settings")
    assert ["protocol", "mask", "kv"] in [[c.text for c in r] for r in settings.rows]
