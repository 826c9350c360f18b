"""What scripts/gpu_check.sh runs before the operator tests, run here on the CPU: the
self-check (`python -m cabattn.selfcheck`) and the comparison of both kernel paths
(scripts/compare_paths.py, at the self-check's tiny shape through --tiny). Each runs in a fresh
interpreter that must not import what the GPU machine lacks (it has torch and transformers; no
Ray, gguf, datasets, nor the harness)."""
import subprocess
import sys

import pytest
from helpers import REPO, subprocess_env

pytestmark = pytest.mark.slow  # fresh interpreters (pyproject.toml: markers)
# (scipy is absent there too, but transformers imports it where present, optionally.)
ABSENT_ON_THE_GPU_MACHINE = ("ray", "gguf", "datasets", "eval", "pandas", "pyarrow")
# Runs a module or script like `python -m` / `python FILE` would, then names what it imported
# of ABSENT_ON_THE_GPU_MACHINE.
RUNNER = """
import runpy, sys
target, args = sys.argv[1], sys.argv[2:]
sys.argv = [target, *args]
try:
    if target.endswith(".py"):
        runpy.run_path(target, run_name="__main__")
    else:
        runpy.run_module(target, run_name="__main__", alter_sys=True)
except SystemExit as done:
    status = done.code
else:
    status = 0
imported = sorted(name for name in {absent} if name in sys.modules)
print("imported:", imported)
sys.exit(status)
""".format(absent=ABSENT_ON_THE_GPU_MACHINE)


def _run(*args):
    result = subprocess.run([sys.executable, "-c", RUNNER, *args], cwd=REPO, text=True,
                            capture_output=True, timeout=900, env=subprocess_env())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "imported: []" in result.stdout, result.stdout
    return result.stdout


def test_the_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(REPO / "scripts" / "gpu_check.sh")], check=True)


def test_the_self_check_needs_only_torch_and_transformers(tmp_path):
    out = _run("cabattn.selfcheck", "--device", "cpu", "--force", "--cache-dir", str(tmp_path))
    assert "PASSED, 39 checks" in out, out


def test_both_paths_agree_at_the_tiny_shape_with_only_torch_and_transformers():
    out = _run("scripts/compare_paths.py", "--tiny", "--device", "cpu", "--methods", "h2o",
               "cab_v4", "--kv-chunk", "16")
    lines = [line for line in out.splitlines() if line.startswith(("mask ", "kv "))]
    assert len(lines) == 4 and all(line.endswith(" s)") and "  ok  " in line
                                   for line in lines), out
    assert "every cell within the bar" in out
