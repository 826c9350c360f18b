"""The harness's gate before a model loads on a CUDA device (docs/selfcheck.md): an extension
without CUDA kernels is named at validation, a failed self-check stops the run before any cell
with the operator, shape and dtype and the reference path, and the CPU and the reference path
run no self-check. No GPU needed: CUDA's presence and the check's verdict are stood in for."""
import pytest
import torch

from cabattn import ops, selfcheck
from eval import cli, models, stream


def _args(model, text, output_dir, *extra):
    return ["--model", str(model), "--data-file", str(text), "--methods", "h2o",
            "--context-lengths", "128", "--no-sparsity-sweep", "--max-windows", "1",
            "--output-dir", str(output_dir), "--no-report", "--yes", "--threads", "1", *extra]


@pytest.fixture
def cuda_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_an_extension_without_cuda_kernels_is_named_before_the_model_loads(
        tiny_model, tiny_text, tmp_path, cuda_present, no_model_loading, monkeypatch, capsys):
    monkeypatch.setattr(ops, "has_kernels_for", lambda device_type: device_type != "cuda")
    assert cli.main(_args(tiny_model, tiny_text, tmp_path, "--device", "cuda")) == \
        cli.EXIT_CONFIG
    err = capsys.readouterr().err
    assert "built without CUDA kernels" in err and "--kernels reference" in err, err
    assert "Traceback" not in err


FAILURE = ("block_sparse_attention q 2x4x200x64 k/v 2x4x200x64 block 16 one-block layout "
           "float32: out: largest error 1.0e-02 > 1.2e-07")


@pytest.fixture
def failing_check(cuda_present, monkeypatch):
    """The self-check fails (the devices it was asked for are listed); no model may load."""
    seen = []

    def failed(device, say, folder=None, force=False):
        seen.append(device)
        return selfcheck.Verdict(False, 31, 1.0, [FAILURE], "a stand-in GPU (sm_90)",
                                 "2026-12-06T19:00:00+00:00")
    monkeypatch.setattr(ops, "has_kernels_for", lambda device_type: True)
    monkeypatch.setattr(selfcheck, "check", failed)

    def refuse(*args, **kwargs):
        raise AssertionError("the model loaded although the self-check failed")
    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(stream, "load_model", refuse)
    return seen


def test_a_failed_self_check_stops_the_run_before_any_cell(tiny_model, tiny_text, tmp_path,
                                                          failing_check, capsys):
    out = tmp_path / "out"
    assert cli.main(_args(tiny_model, tiny_text, out, "--device", "cuda")) == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert failing_check == ["cuda"]
    assert FAILURE in err and "--kernels reference" in err and "No cell was computed" in err
    assert not list((out / "perplexity.cells").glob("*.json"))


def test_a_failed_self_check_stops_a_stream_before_the_model_loads(tiny_model, tiny_text,
                                                                   tmp_path, failing_check,
                                                                   capsys):
    assert stream.main(["--model", str(tiny_model), "--data-file", str(tiny_text), "--dataset",
                        "tiny", "--output-dir", str(tmp_path), "--tokens", "1536", "--cache",
                        "64", "--device", "cuda"]) == 1
    assert failing_check == ["cuda"] and FAILURE in capsys.readouterr().err


@pytest.mark.parametrize("device,kernels", [("cpu", "extension"), ("cpu", "reference")])
def test_the_cpu_and_the_reference_path_run_no_self_check(tiny_model, tiny_text, tmp_path,
                                                          monkeypatch, device, kernels):
    def refuse(*args, **kwargs):
        raise AssertionError("a self-check ran")
    monkeypatch.setattr(selfcheck, "check", refuse)
    assert cli.main(_args(tiny_model, tiny_text, tmp_path, "--device", device,
                          "--kernels", kernels)) == cli.EXIT_OK
