"""A user's own script outside the checkout (docs/running.md, From Python): after `make venv`
(which `make test` and `make demo` run) the venv imports this checkout's cabattn and eval from
any folder. Checked as a new user would meet it: the README's "One method on a model, from
Python" example saved in a folder outside the checkout and run with the venv's python, on a
venv that `make importable` has just prepared (a fresh one, so the test does not depend on,
or change, the venv that runs it)."""
import re
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from helpers import REPO


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## One method on a model, from Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def adapted(code: str, model, text_file) -> str:
    """The README's example on the tiny model and text (it names the offline default model
    and a book of the user's); each replacement must find its target, so the test follows
    the README's example rather than one of its own."""
    for old, new in (('"smollm2-135m"', repr(str(model))), ('"book.txt"', repr(str(text_file))),
                     (":1024]", ":256]")):  # the tiny model has 512 positions
        assert old in code, f"the README's example no longer has {old}: update this test"
        code = code.replace(old, new)
    return code


def fresh_venv(folder):
    """A venv without this checkout that sees the packages of the venv running the tests
    (those `make venv` installs), stamped as `make venv` stamps it once they are in."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    python = folder / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; "
                              "print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    packages = dict.fromkeys([sysconfig.get_path("purelib"), *site.getsitepackages()])
    (Path(purelib) / "installed-packages.pth").write_text("\n".join(packages) + "\n")
    (folder / ".installed").touch()
    return python


def test_the_readme_example_runs_from_a_script_outside_the_checkout(tmp_path, tiny_model,
                                                                    tiny_text):
    make = shutil.which("make")
    if make is None:
        pytest.skip("no `make` on PATH: the set-up this test checks is the Makefile's")
    python = fresh_venv(tmp_path / "venv")
    elsewhere = tmp_path / "some" / "dir"
    elsewhere.mkdir(parents=True)
    script = elsewhere / "try.py"
    script.write_text(adapted(readme_example(), tiny_model, tiny_text))
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}

    before = subprocess.run([str(python), str(script)], cwd=elsewhere, env=env,
                            capture_output=True, text=True, timeout=600)
    assert before.returncode != 0 and "No module named 'cabattn'" in before.stderr

    subprocess.run([make, "-s", "importable", f"VENV={tmp_path / 'venv'}"], cwd=REPO,
                   check=True, timeout=120)
    after = subprocess.run([str(python), str(script)], cwd=elsewhere, env=env,
                           capture_output=True, text=True, timeout=600)
    assert after.returncode == 0, after.stderr[-3000:]
    mask_line, prefill_line = after.stdout.strip().splitlines()
    perplexity, density = map(float, mask_line.split())
    assert perplexity > 1 and 0 < density < 1  # a sparse method ran: part of the pairs kept
    assert float(prefill_line.split()[0]) > 1 and "torch.Size" in prefill_line  # kept positions
    where = subprocess.run([str(python), "-c", "import cabattn, eval.models; "
                            "print(cabattn.__file__); print(eval.models.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True)
    assert all(line.startswith(str(REPO)) for line in where.stdout.split())
