"""Tiny stand-ins for the harness tests: a random 2-layer Llama with a byte-level BPE tokenizer
trained on a small local text, saved as an ordinary model folder (`--model FOLDER`), and the
text itself (`--data-file`). Building both takes about a second."""
from pathlib import Path

import pytest
import torch
from helpers import tiny_llama

WORDS = ("the of and to in is was for on that with as by at from his her it an are were "
         "which this be or had not but have they one all their been has who more when will "
         "river city music station king army church school war year team album film").split()


def write_text(path: Path, num_paragraphs: int = 60, seed: int = 0) -> Path:
    """Pseudo-English paragraphs (deterministic), separated by blank lines."""
    g = torch.Generator().manual_seed(seed)
    paragraphs = []
    for _ in range(num_paragraphs):
        idx = torch.randint(len(WORDS), (80,), generator=g).tolist()
        paragraphs.append(" ".join(WORDS[i] for i in idx).capitalize() + ".")
    path.write_text("\n\n".join(paragraphs) + "\n")
    return path


def make_tiny_model(folder: Path, text_file: Path, seed: int = 0, hidden_size: int = 64,
                    heads: int = 4, kv_heads: int = 2) -> Path:
    """A random LlamaForCausalLM (2 layers, GQA 4/2 heads of dim 16 unless told, 512
    positions) and its tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(text_file)], trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    model = tiny_llama(vocab_size=len(tokenizer), hidden_size=hidden_size, heads=heads,
                       kv_heads=kv_heads, positions=512, seed=seed, bos_token_id=0,
                       eos_token_id=1, tie_word_embeddings=True)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory) -> Path:
    return write_text(tmp_path_factory.mktemp("text") / "tiny.txt")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tiny_text) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny-llama", tiny_text)


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if anything tries to load model weights."""
    from eval import models
    from eval.executors.serial import SerialExecutor

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before validation finished")
    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(SerialExecutor, "load", refuse)


def tiny_run_args(model: Path, text: Path, output_dir: Path, *extra) -> list:
    """Command-line arguments of a small run on the tiny model and text."""
    return ["--model", str(model), "--data-file", str(text), "--output-dir", str(output_dir),
            "--name", "tiny", "--yes", *extra]
