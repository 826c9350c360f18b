"""eval.report on a small hand-made results file: figures, Table 3 in markdown and LaTeX."""
import json

import pytest

from eval import report
from eval.report.__main__ import main as report_main


def _r(ppl, density, L, s, **extra):
    return {"perplexity": ppl, "cross_entropy": None, "density": density, "context_length": L,
            "sparsity": s, **extra}


@pytest.fixture
def results_file(tmp_path):
    results = {
        "config": {"context_length_sweep": {"fixed_sparsity": 0.9},
                   "sparsity_sweep": {"fixed_context_length": 1024}},
        "results": {
            "brown": {
                "dense": {"context_length_sweep": {"512": _r(30.0, 1.0, 512, 0.0),
                                                   "1024": _r(25.0, 1.0, 1024, 0.0)},
                          "sparsity_sweep": {"0.0": _r(25.0, 1.0, 1024, 0.0)}},
                "h2o": {"context_length_sweep": {"512": _r(33.0, 0.2, 512, 0.9),
                                                 "1024": _r(27.5, 0.11, 1024, 0.9)},
                        "sparsity_sweep": {"0.0": _r(25.0, 1.0, 1024, 0.0),
                                           "0.5": _r(25.5, 0.52, 1024, 0.5),
                                           "0.9": _r(27.5, 0.11, 1024, 0.9)}},
                "cab_v4": {"context_length_sweep": {"512": _r(32.0, 0.2, 512, 0.9),
                                                    "1024": None},
                           "sparsity_sweep": {"0.0": _r(25.0, 1.0, 1024, 0.0),
                                              "0.5": {"perplexity": None, "error": "boom"},
                                              "0.9": _r(30.0, 0.11, 1024, 0.9)}},
            },
            "pd-books": {
                "dense": {"context_length_sweep": {"512": _r(40.0, 1.0, 512, 0.0)},
                          "sparsity_sweep": {"0.0": _r(38.0, 1.0, 1024, 0.0)}},
                "h2o": {"context_length_sweep": {"512": _r(44.0, 0.2, 512, 0.9)},
                        "sparsity_sweep": {"0.9": _r(41.8, 0.11, 1024, 0.9)}},
            },
        },
    }
    path = tmp_path / "demo.json"
    path.write_text(json.dumps(results))
    return path


def test_report_writes_every_file(results_file):
    paths = report.make_report(results_file)
    names = sorted(p.name for p in paths)
    assert names == sorted(f"demo_{stem}" for stem in (
        "figure4.png", "figure4.pdf", "figure8.png", "figure8.pdf", "table3.md", "table3.tex"))
    for p in paths:
        data = p.read_bytes()
        assert len(data) > 1000 or p.suffix in (".md", ".tex")
        if p.suffix == ".png":
            assert data[:8] == b"\x89PNG\r\n\x1a\n"
        if p.suffix == ".pdf":
            assert data[:5] == b"%PDF-"


def test_table3_rows_and_deltas(results_file):
    md = (results_file.parent / "demo_table3.md")
    report.make_report(results_file)
    lines = md.read_text().splitlines()
    assert lines[0] == "| dataset | L | method | s=0 | s=0.5 | s=0.9 |"
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:3]): line for line in lines[2:]
            if line.startswith("|")}
    assert set(rows) == {("brown", "1024", "dense"), ("brown", "1024", "h2o"),
                         ("brown", "1024", "cab_v4"), ("pd-books", "1024", "dense"),
                         ("pd-books", "1024", "h2o")}
    # Delta against dense at the same dataset and context length: 27.5 / 25 - 1 = +10.0%.
    assert "27.500 (+10.0%)" in rows[("brown", "1024", "h2o")]
    assert "30.000 (+20.0%)" in rows[("brown", "1024", "cab_v4")]
    assert "failed" in rows[("brown", "1024", "cab_v4")]
    assert "41.800 (+10.0%)" in rows[("pd-books", "1024", "h2o")]
    # A sparsity that was not run is a dash, not a number.
    assert rows[("pd-books", "1024", "h2o")].count("| - ") == 2
    tex = (results_file.parent / "demo_table3.tex").read_text()
    assert r"cab\_v4" in tex and r"27.500 (+10.0\%)" in tex and r"\begin{tabular}" in tex
    assert tex.count(r" \\") == 1 + len(rows)  # header + one line per row


def test_key_token_companion_of_table3(results_file):
    results = json.loads(results_file.read_text())
    brown = results["results"]["brown"]
    for method, value, count in (("dense", 12.0, 80), ("h2o", 15.0, 80), ("cab_v4", 13.2, 20)):
        brown[method]["sparsity_sweep"]["0.9" if method != "dense" else "0.0"].update(
            key_token_perplexity=value, key_token_perplexity_dense=12.0, num_key_tokens=count,
            key_tokens_indicative_only=count < 30)
    results_file.write_text(json.dumps(results))
    paths = report.make_report(results_file)
    md = results_file.parent / "demo_table3_key_tokens.md"
    assert md in paths
    lines = md.read_text().splitlines()
    assert lines[0] == "| dataset | L | method | s=0 | s=0.9 |"
    # the change against dense on the same key tokens: 15 / 12 - 1 = +25%; too few: starred
    assert "| brown | 1024 | h2o | - | 15.000 (+25.0%) |" in lines
    assert "| brown | 1024 | cab_v4 | - | 13.200 (+10.0%)* |" in lines
    assert "| brown | 1024 | dense | 12.000 | - |" in lines
    assert not any("pd-books" in line for line in lines)  # no key tokens measured there


def test_figure_points_skip_failures(results_file):
    results = report.load_results(results_file)
    pts = report.points(results)
    ok = [p for p in pts if p.perplexity is not None]
    assert len(pts) == 17 and len(ok) == 15
    h2o = [p for p in pts if p.method == "h2o" and p.sweep == "context_length_sweep"]
    assert {(p.dataset, p.context_length, p.sparsity) for p in h2o} == {
        ("brown", 512, 0.9), ("brown", 1024, 0.9), ("pd-books", 512, 0.9)}


def test_report_cli_names_a_corrupt_file(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"results": {"brown": ')
    assert report_main([str(bad)]) == 2
    assert str(bad) in capsys.readouterr().err


def test_recall_figure_is_written_when_cells_carry_their_recall(results_file):
    results = json.loads(results_file.read_text())
    brown = results["results"]["brown"]
    brown["h2o"]["sparsity_sweep"]["0.9"]["attention_recall"] = 0.8
    brown["h2o"]["context_length_sweep"]["1024"]["attention_recall"] = 0.8  # the same cell
    brown["h2o"]["sparsity_sweep"]["0.5"]["attention_recall"] = 0.95
    brown["cab_v4"]["sparsity_sweep"]["0.9"]["attention_recall"] = 0.6
    brown["cab_v4"]["sparsity_sweep"]["0.5"]["attention_recall"] = 0.9  # failed: left out
    results_file.write_text(json.dumps(results))
    cells = report.recall_cells(report.load_results(results_file))
    expected = {("brown", "h2o", 1024, 0.9): (0.8, 10.0), ("brown", "h2o", 1024, 0.5): (0.95, 2.0),
                ("brown", "cab_v4", 1024, 0.9): (0.6, 20.0)}
    assert set(cells) == set(expected)
    for key, point in expected.items():
        assert cells[key] == pytest.approx(point)
    names = {p.name for p in report.make_report(results_file)}
    assert {"demo_figure_recall.png", "demo_figure_recall.pdf"} <= names


def test_figure8_labels_do_not_overlap_and_the_legend_is_under_the_panels(tmp_path,
                                                                         monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = ("h2o", "cab_v4", "cab_v3", "streaming_llm", "local_strided", "random")
    levels = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
    # Every method at about the same density for a given s, and about the same perplexity.
    sweep = {m: {"sparsity_sweep": {str(s): _r(25.0 + i * 0.05 + s, 1.0 - s + 0.002 * i, 1024, s)
                                    for s in levels}} for i, m in enumerate(methods)}
    sweep["dense"] = {"sparsity_sweep": {"0.0": _r(25.0, 1.0, 1024, 0.0)}}
    path = tmp_path / "crowded.json"
    path.write_text(json.dumps({"config": {}, "results": {"brown": sweep, "pd-books": sweep}}))
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    report.figure8(report.load_results(path), tmp_path / "crowded")
    (fig,) = figures
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        shown = [t.get_window_extent(renderer) for t in ax.texts if t.get_visible()]
        assert {t.get_text() for t in ax.texts if t.get_visible()} == {f"s={s:g}" for s in levels}
        assert not any(a.overlaps(b) for i, a in enumerate(shown) for b in shown[i + 1:])
    (legend,) = fig.legends
    box = legend.get_window_extent(renderer)
    panels = [ax.get_window_extent(renderer) for ax in fig.axes]
    assert box.y1 <= min(p.y0 for p in panels)  # under the panels, not beside them
    assert box.x0 >= 0 and box.x1 <= fig.bbox.x1  # inside the figure: no margin added for it
