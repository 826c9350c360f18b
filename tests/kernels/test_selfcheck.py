"""python -m cabattn.selfcheck on the CUDA kernels emulated on the CPU (`emu`: the code path a
GPU takes, with cabattn.emu standing in for CUDA): it passes, it catches a deliberately broken
operator and names operator, shape, dtype and error, it caches its verdict per device and
build, and a failure points at the reference path (docs/selfcheck.md)."""
import json
import types

import pytest
import torch

from cabattn import emu, selfcheck

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.slow  # a minute of emulated tensor-core kernels on 2 cores
def test_the_emulated_cuda_kernels_pass_every_check():
    verdict = selfcheck.run_checks("emu")
    assert verdict.passed, verdict.failures
    checks = selfcheck.operator_checks() + selfcheck.model_checks()
    assert verdict.checks == len(checks) == 39
    assert {c.operator for c in checks} == {
        "coarsen", "block_scores", "frc_scores", "select_blocks", "block_sparse_attention",
        "attention_with_scores", "kv_compact_", "model"}


class _Broken:
    """torch.ops.cabattn_emu with block_sparse_attention's last query row off by 1e-3 (a kernel
    that mishandles the partial last block, say)."""

    def __getattr__(self, name):
        return getattr(torch.ops.cabattn_emu, name)

    @staticmethod
    def block_sparse_attention(*args):
        out, lse = torch.ops.cabattn_emu.block_sparse_attention(*args)
        out[:, :, -1] += 1e-3
        return out, lse


def _attention_checks():
    return [c for c in selfcheck.operator_checks()
            if c.operator == "block_sparse_attention" and c.dtype == torch.float32]


def test_a_broken_operator_is_caught_and_named(monkeypatch, tmp_path):
    attention_checks = _attention_checks()
    monkeypatch.setattr(emu, "OPS", _Broken())
    monkeypatch.setattr(selfcheck, "operator_checks", lambda half_reference: attention_checks)
    monkeypatch.setattr(selfcheck, "model_checks", lambda: [])
    with pytest.raises(selfcheck.SelfCheckError) as info:
        selfcheck.ensure("emu", say=print, folder=tmp_path)
    message = str(info.value)
    print(message)  # the report a user sees (docs/selfcheck.md quotes it)
    lines = message.splitlines()
    assert lines[0].startswith("cabattn's compiled kernels FAILED the self-check on the CUDA "
                               "kernels emulated on the CPU")
    assert ("  block_sparse_attention q 2x4x200x64 k/v 2x4x200x64 block 16 one-block layout "
            "float32: out: largest error 1.000e-03 >") in message
    assert (sum(line.startswith("  block_sparse_attention") for line in lines)
            == len(attention_checks) == 3)  # every float32 call, each named
    assert "--kernels reference" in message and 'kernels="reference"' in message
    # The failed verdict is cached too: asked again, it fails at once without running.
    monkeypatch.setattr(selfcheck, "run_checks", None)
    with pytest.raises(selfcheck.SelfCheckError, match="1.000e-03"):
        selfcheck.ensure("emu", say=print, folder=tmp_path)


def test_an_operator_that_raises_fails_with_its_error(monkeypatch):
    def broken(*args):
        raise RuntimeError("CUDA error: no kernel image is available for execution")
    monkeypatch.setattr(emu, "OPS", types.SimpleNamespace(block_sparse_attention=broken))
    verdict = selfcheck.run_checks("emu", _attention_checks()[:1])
    assert verdict.failures == [
        "block_sparse_attention q 2x4x200x64 k/v 2x4x200x64 block 16 one-block layout float32: "
        "error: RuntimeError: CUDA error: no kernel image is available for execution"]


def test_the_verdict_is_cached_per_device_and_build(monkeypatch, tmp_path, capsys):
    runs = []
    real = selfcheck.run_checks

    coarsen = [c for c in selfcheck.operator_checks() if c.operator == "coarsen"]

    def counted(device, checks=None):
        runs.append(device)
        return real(device, coarsen)
    monkeypatch.setattr(selfcheck, "run_checks", counted)
    first = selfcheck.check("cpu", folder=tmp_path)
    again = selfcheck.check("cpu", folder=tmp_path)
    assert runs == ["cpu"] and first.passed and again.passed
    assert (not first.cached) and again.cached and again.checked == first.checked
    out = capsys.readouterr().out
    assert "cabattn self-check on the CPU kernels" in out and "PASSED, 4 checks" in out
    assert "cached from" in out and "python -m cabattn.selfcheck --force checks again" in out
    stored = json.loads(selfcheck.cache_path("cpu", tmp_path).read_text())
    assert stored["key"]["torch"] == torch.__version__ and stored["verdict"]["passed"]
    selfcheck.check("cpu", force=True, folder=tmp_path)
    assert runs == ["cpu", "cpu"]
    monkeypatch.setattr(selfcheck, "_build_hash", lambda: "another build")
    selfcheck.check("cpu", folder=tmp_path)  # a rebuilt extension is checked again
    assert runs == ["cpu", "cpu", "cpu"]


def test_the_command_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(selfcheck, "operator_checks", lambda half_reference: [])
    monkeypatch.setattr(selfcheck, "model_checks", lambda: [])
    assert selfcheck.main(["--device", "cpu", "--cache-dir", str(tmp_path)]) == 0
    assert "PASSED, 0 checks" in capsys.readouterr().out
    assert selfcheck.main(["--device", "tpu", "--cache-dir", str(tmp_path)]) == 2
    assert "device 'tpu' is not valid; valid: cuda, cuda:N, cpu, emu" in capsys.readouterr().err
