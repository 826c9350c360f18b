"""A first run converts the offline default model once and shows one weight-loading bar."""
from pathlib import Path

import pytest

from eval import models


class _FromTinyInsteadOfGGUF:
    """Stands in for an Auto class: a GGUF load reads the tiny model folder instead."""

    def __init__(self, auto, tiny: Path):
        self.auto, self.tiny = auto, tiny

    def from_pretrained(self, folder, gguf_file=None, **kwargs):
        if gguf_file is None:
            return self.auto.from_pretrained(folder, **kwargs)
        loaded = self.auto.from_pretrained(self.tiny, **kwargs)
        if hasattr(loaded, "config"):
            loaded.config.quantization_config = None  # as a GGUF load sets it
        return loaded


@pytest.mark.usefixtures("single_thread")
def test_a_first_run_shows_one_loading_bar(tiny_model, tmp_path, monkeypatch, capsys):
    fake_gguf = tmp_path / "wheel" / "model.gguf"
    fake_gguf.parent.mkdir()
    fake_gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(models, "offline_gguf", lambda name, cache_dir=None: fake_gguf)
    for name in ("AutoModelForCausalLM", "AutoTokenizer"):
        monkeypatch.setattr(models, name, _FromTinyInsteadOfGGUF(getattr(models, name),
                                                                 tiny_model))
    loaded = models.load_model(models.DEFAULT_MODEL, cache_dir=tmp_path / "cache")
    assert (models.converted_folder(models.DEFAULT_MODEL, tmp_path / "cache")
            / "model.safetensors").is_file()
    assert loaded.num_parameters > 0
    err = capsys.readouterr().err
    assert err.count("Loading weights: 100%") == 1, err
