"""Imports go one way (docs/architecture.md, Layers): the harness (eval) uses the library
(cabattn), which uses its kernels (cabattn.ops, cabattn._C); inside each, a module imports only
modules of its own or a lower layer, and the imports form no cycle. Every import counts, also
one inside a function: a cycle hidden there breaks as soon as the order of first use changes.
Each module also imports on its own, in a fresh interpreter."""
import ast
import concurrent.futures
import fnmatch
import graphlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, subprocess_env

PACKAGES = ("cabattn", "eval", "experiments")
EXTENSIONS = ("cabattn._C", "cabattn._emu")  # compiled: they import nothing of ours

# Bottom to top. A module may import modules of its own layer (no cycle) and of lower ones.
LAYERS = [
    ("value checks", ["cabattn.checks", "cabattn.correctness", "cabattn.cache"]),
    ("kernels", ["cabattn._C", "cabattn._emu", "cabattn.reference", "cabattn.ops",
                 "cabattn.emu", "cabattn.reference_path"]),
    ("block grid and statistics", ["cabattn.grid", "cabattn.stats", "cabattn.ties"]),
    ("methods", ["cabattn.methods", "cabattn.methods.*"]),
    ("selection and cache", ["cabattn.sparse", "cabattn.kv_cache"]),
    ("protocols", ["cabattn.protocol", "cabattn.mask_protocol", "cabattn.kv_protocol",
                   "cabattn.prefill_protocol"]),
    ("library entry", ["cabattn.protocols", "cabattn"]),
    ("the self-check", ["cabattn.selfcheck"]),
    ("harness foundations", ["eval", "eval.cache", "eval.hub", "eval.env", "eval.results",
                             "eval.metrics", "eval.statistics"]),
    ("data and models", ["eval.data", "eval.data.*", "eval.models", "eval.plotting",
                         "eval.logits"]),
    ("task samples", ["eval.tasks", "eval.tasks.registry", "eval.tasks.passkey",
                      "eval.tasks.niah", "eval.tasks.variable_tracking",
                      "eval.tasks.common_words", "eval.tasks.prompt", "eval.tasks.longbench",
                      "eval.tasks.scoring", "eval.tasks.samples"]),
    ("configuration", ["eval.tasks.checks", "eval.config"]),
    ("one cell", ["eval.cell", "eval.key_tokens", "eval.tasks.cell", "eval.cells"]),
    ("executors and report", ["eval.executors", "eval.executors.*", "eval.tasks.report",
                              "eval.report", "eval.compare"]),
    ("results page", ["eval.html_report"]),
    ("runner", ["eval.runner", "eval.arguments"]),
    ("command lines", ["eval.cli", "eval.stream"]),
    ("python -m entry", ["eval.run", "eval.report.__main__"]),
    ("the original benchmark's paths", ["experiments", "experiments.*"]),
]


def module_files() -> dict:
    """Module name -> source file, for every module of the packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports_of(name: str, path: Path, known: set) -> set:
    """The modules of the packages that `name` imports anywhere in its source."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = name.split(".")
                anchor = anchor[:len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module
            # `from package import module` imports the module; `from module import name` the
            # module that holds the name.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                       for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t.split(".")[0] in PACKAGES}
    return found - {name}


def layer_of(name: str) -> int:
    for rank, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
            return rank
    raise AssertionError(f"module {name} has no layer: add it to LAYERS in {__file__} "
                         "(and to docs/architecture.md, Layers)")


def import_graph() -> dict:
    files = module_files()
    known = set(files) | set(EXTENSIONS)
    return {name: imports_of(name, path, known) for name, path in files.items()}


def test_every_module_has_a_layer():
    for name in import_graph():
        layer_of(name)


def test_no_module_imports_a_higher_layer():
    upward = [f"{name} ({LAYERS[layer_of(name)][0]}) imports {target} "
              f"({LAYERS[layer_of(target)][0]})"
              for name, targets in import_graph().items() for target in sorted(targets)
              if layer_of(target) > layer_of(name)]
    assert not upward, "imports must go down:\n" + "\n".join(upward)


def test_the_library_never_imports_the_harness():
    graph = import_graph()
    assert not {(name, t) for name, targets in graph.items() if name.startswith("cabattn")
                for t in targets if t.split(".")[0] == "eval"}


def test_the_imports_form_no_cycle():
    try:
        tuple(graphlib.TopologicalSorter(import_graph()).static_order())
    except graphlib.CycleError as err:
        pytest.fail(f"import cycle: {' -> '.join(err.args[1])}")


def test_the_guard_sees_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    """The checks above can fail: a relative import from a package's own __init__ (the kind a
    registry decorator invites) and an upward import are both found."""
    package = tmp_path / "eval"
    package.mkdir()
    (package / "__init__.py").write_text("from .cell import compute\n")
    (package / "cell.py").write_text("def compute():\n    from . import cli\n"
                                     "    from eval import compute\n")
    (package / "cli.py").write_text("")
    known = {"eval", "eval.cell", "eval.cli"}
    assert imports_of("eval", package / "__init__.py", known) == {"eval.cell"}
    cell_imports = imports_of("eval.cell", package / "cell.py", known)
    assert cell_imports == {"eval.cli", "eval"}
    assert layer_of("eval.cli") > layer_of("eval.cell")
    with pytest.raises(graphlib.CycleError):
        tuple(graphlib.TopologicalSorter({"eval": {"eval.cell"},
                                          "eval.cell": cell_imports}).static_order())


def _import_alone(name: str) -> tuple:
    proc = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    return name, proc.returncode, proc.stderr[-2000:]


@pytest.mark.slow
def test_each_module_imports_alone_in_a_fresh_interpreter():
    names = sorted(set(import_graph()) | set(EXTENSIONS))
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        failed = [f"{name}: exit {code}\n{err}"
                  for name, code, err in pool.map(_import_alone, names) if code != 0]
    assert not failed, "\n".join(failed)
