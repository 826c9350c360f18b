"""The self-check: cabattn's compiled operators against the plain-PyTorch reference on this
device, before any number is computed with them (docs/selfcheck.md).

    python -m cabattn.selfcheck [--device cuda:N | cpu | emu] [--force] [--cache-dir DIR]

Every operator runs on fresh random inputs (outputs poisoned first, so an unwritten element
shows) over a few shapes per dtype: float32/float16/bfloat16, head dims 64, 128 and 256,
partial last blocks, GQA ratios 1, 3 and 4, block sizes 16/32/64/128, one-block and all-block
layouts, split-K decoding, soft-capped logits and sliding windows (docs/operators.md, Model
features). Each float output meets the correctness bar (docs/operators.md, in
cabattn.correctness) against float64; selection outputs equal the reference's. Then a
two-layer random Llama's per-token losses under each protocol on the kernels meet the same bar
against the reference path (cabattn.reference_path), its float64 run being the exact value.
`emu` runs the same checks on the CUDA kernels emulated on the CPU (cabattn.emu), `cpu` on the
CPU kernels.

The verdict is cached per (device name, compute capability, driver, torch version, build) in
the cache folder's selfcheck/ (cabattn.cache), so the harness (which runs it before the first
cell on a CUDA device, and in every Ray actor) pays for it once per machine and build.
"""
import argparse
import contextlib
import copy
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import torch

from . import ops, reference
from .cache import cache_dir
from .correctness import bar_problem

FLOATS = (torch.float32, torch.float16, torch.bfloat16)


class SelfCheckError(RuntimeError):
    """The kernels disagree with the reference on this device (the message says where)."""


@dataclass
class Check:
    """One call of one operator (or one model run): what the report names and how to run it.
    run(device) returns {output name: problem or None}."""
    operator: str
    shape: str
    dtype: torch.dtype
    run: Callable[[str], dict]
    poison: bool = True  # fresh tensors filled with NaN while it runs (operator calls)

    @property
    def label(self) -> str:
        return f"{self.operator} {self.shape} {str(self.dtype).removeprefix('torch.')}"


# -- inputs and the bar ----------------------------------------------------------------------

def _random(shape, dtype, device, seed: int) -> torch.Tensor:
    """Fresh normal values drawn in float64 on the CPU (the same on every device), then cast:
    a float64 reference of the cast values sees exactly what the kernel sees."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, dtype=torch.float64, generator=g).to(device=device, dtype=dtype)


def _same_precision(input_dtype, output_dtype, half_reference: bool):
    """The precision of the PyTorch reference a kernel output is held to (docs/operators.md,
    Correctness bar): float32 for float32 outputs (the kernels accumulate in float32 from any
    input); for half outputs the half reference when half_reference (the CUDA kernels round P
    to half for the tensor-core P @ V, as FlashAttention-2 does; so does FlexAttention on the
    reference path), else the float32 one, rounded (the CPU kernels round once)."""
    if input_dtype == torch.float64:
        return torch.float64
    if output_dtype == torch.float32 or not half_reference:
        return torch.float32
    return input_dtype


def _against_reference(got: tuple, definition, inputs: tuple, half_reference: bool,
                       names: tuple, ulps=None) -> dict:
    """Each float output of a kernel against `definition` in float64 and at its precision."""
    exact = definition(*(t.double() if t.is_floating_point() else t for t in inputs))
    problems = {}
    for i, name in enumerate(names):
        precision = _same_precision(inputs[0].dtype, got[i].dtype, half_reference)
        same = definition(*(t.to(precision) if t.is_floating_point() else t for t in inputs))
        problems[name] = bar_problem(got[i], exact[i], same[i].to(got[i].dtype),
                                     (ulps or {}).get(name))
    return problems


def _equal(got, want, name: str) -> dict:
    return {name: None if torch.equal(got.cpu(), want.cpu()) else "differs from the reference"}


@contextlib.contextmanager
def _poisoned():
    """Fresh tensors (the kernels' outputs too) come filled with NaN / the largest integer."""
    fill = torch.utils.deterministic.fill_uninitialized_memory
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def _layout(batch, heads, blocks, budget, device, seed):
    """A valid CSR layout: row I keeps its diagonal and min(I + 1, budget) - 1 random earlier
    blocks (budget 1: the diagonal alone; budget >= blocks: every causal block)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(batch, heads, blocks, blocks, generator=g)
    scores = scores.masked_fill(~torch.ones(blocks, blocks, dtype=torch.bool).tril(), -1.0)
    scores.diagonal(dim1=-2, dim2=-1).fill_(2.0)
    top = scores.topk(min(budget, blocks), dim=-1).indices
    count = torch.clamp(torch.arange(blocks) + 1, max=budget).int().expand(batch, heads, blocks)
    slots = torch.arange(top.shape[-1])
    index = torch.where(slots < count[..., None], top, blocks).sort(-1).values
    index = torch.where(index == blocks, -1, index).int()
    return count.contiguous().to(device), index.contiguous().to(device)


def _shape(*tensors) -> str:
    return " ".join("x".join(map(str, t)) for t in tensors)


# -- the operator checks ---------------------------------------------------------------------

def _coarsen(dtype, block, mode, half_reference):
    def run(device):
        x = _random((2, 3, 333, 64 if mode == ops.MEAN else 128), dtype, device, 1)
        got = ops.coarsen(x, block, mode)
        if mode == ops.MAX_L2:  # a selection: the very token the reference picks
            return _equal(got, reference.coarsen(x, block, mode), "representatives")
        return _against_reference((got,), lambda t: (reference.coarsen(t, block, mode),), (x,),
                                  half_reference, ("mean",))
    name = "max_l2" if mode == ops.MAX_L2 else "mean"
    return Check("coarsen", f"x 2x3x333x{64 if mode == ops.MEAN else 128} block {block} "
                 f"{name}", dtype, run)


def _features(softcap: float = 0.0, window: int = 0) -> str:
    """The model features of a call, as its label names them ("" when none)."""
    return (f" softcap {softcap:g}" if softcap else "") + (f" window {window}" if window else "")


def _block_scores(dtype, dim, block, heads, length, batch, half_reference, softcap=0.0):
    def run(device):
        q = _random((batch, heads[0], length, dim), dtype, device, 2)
        k = _random((batch, heads[1], length, dim), dtype, device, 3)
        scale = reference.default_scale(dim)
        return _against_reference(ops.block_scores(q, k, block, scale, softcap),
                                  lambda *t: reference.block_scores(*t, block, scale, softcap),
                                  (q, k), half_reference, ("Sblk", "Gblk"))
    return Check("block_scores", f"q {_shape((batch, heads[0], length, dim))} k "
                 f"{_shape((batch, heads[1], length, dim))} block {block}{_features(softcap)}",
                 dtype, run)


def _frc_scores(dtype, formula, normalization, half_reference):
    def run(device):
        qc = _random((2, 4, 37, 128), dtype, device, 4)
        kc = _random((2, 1, 37, 128), dtype, device, 5)
        got = ops.frc_scores(qc, kc, 0.088, 0.3, formula, normalization)
        return _against_reference(
            (got,), lambda *t: (reference.frc_scores(*t, 0.088, 0.3, formula, normalization),),
            (qc, kc), half_reference, ("curvature",))
    return Check("frc_scores", f"qc 2x4x37x128 kc 2x1x37x128 formula {formula} "
                 f"normalization {normalization}", dtype, run)


def _select_blocks(blocks, shift, budget):
    def run(device):
        score1 = _random((2, 3, blocks, blocks), torch.float32, device, 6)
        score2 = _random((2, 3, blocks, blocks), torch.float32, device, 7)
        rows = torch.arange(blocks, dtype=torch.int32)
        rule = torch.clamp(torch.clamp(rows + 1, max=budget) - shift, min=0)
        n_recent = torch.clamp(rule, max=2)
        n_sink = torch.clamp(rule - n_recent, max=1)
        n_score1 = (rule - n_recent - n_sink) // 2
        n_score2 = rule - n_recent - n_sink - n_score1
        counts = [c.to(device) for c in (n_recent, n_sink, n_score1, n_score2)]
        got = ops.select_blocks(score1, score2, *counts, shift, budget + 1)
        want = reference.select_blocks(score1, score2, *counts, shift, budget + 1)
        return {**_equal(got[0], want[0], "block_count"),
                **_equal(got[1], want[1], "block_index")}
    return Check("select_blocks", f"scores 2x3x{blocks}x{blocks} shift {shift} budget {budget}",
                 torch.float32, run)


def _block_sparse_attention(dtype, dim, block, heads, length, budget, batch, half_reference,
                            softcap=0.0):
    blocks = reference.num_blocks(length, block)
    kind = ("one-block" if budget == 1 else "all-block" if budget >= blocks
            else f"{budget}-block")

    def run(device):
        q = _random((batch, heads[0], length, dim), dtype, device, 8)
        k = _random((batch, heads[1], length, dim), dtype, device, 9)
        v = _random((batch, heads[1], length, dim), dtype, device, 10)
        count, index = _layout(batch, heads[0], blocks, budget, device, 11)
        scale = reference.default_scale(dim)
        got = ops.block_sparse_attention(q, k, v, count, index, block, scale, softcap)
        return _against_reference(
            got, lambda *t: reference.block_sparse_attention(*t, block, scale, softcap),
            (q, k, v, count, index), half_reference, ("out", "lse"))
    return Check("block_sparse_attention", f"q {_shape((batch, heads[0], length, dim))} k/v "
                 f"{_shape((batch, heads[1], length, dim))} block {block} {kind} layout"
                 f"{_features(softcap)}", dtype, run)


def _attention_with_scores(dtype, dim, heads, q_len, k_len, half_reference, softcap=0.0,
                           window=0):
    def run(device):
        q = _random((2, heads[0], q_len, dim), dtype, device, 12)
        k = _random((2, heads[1], k_len, dim), dtype, device, 13)
        v = _random((2, heads[1], k_len, dim), dtype, device, 14)
        scale = reference.default_scale(dim)
        # mass adds up Lq x group probabilities per key: a few more float32 units; split-K
        # rescales each split's probabilities by exp(lse_split - lse), whose float32 argument
        # carries |lse| (about log Lk) units: the CUDA kernel's largest mass error at
        # (8, 2), 1, 1000, bfloat16 reaches 20 units (found here, emulated), so 32
        return _against_reference(
            ops.attention_with_scores(q, k, v, scale, softcap, window),
            lambda *t: reference.attention_with_scores(*t, scale, softcap, window), (q, k, v),
            half_reference, ("out", "lse", "mass"),
            ulps={"mass": 32 if k_len >= 8 * q_len else 8})
    return Check("attention_with_scores", f"q {_shape((2, heads[0], q_len, dim))} k/v "
                 f"{_shape((2, heads[1], k_len, dim))}{_features(softcap, window)}", dtype, run)


def _kv_compact(shape, dtype):
    def run(device):
        x = _random(shape, dtype, device, 15)
        g = torch.Generator().manual_seed(16)
        keep = torch.rand(*shape[:3], generator=g).argsort(-1)[..., :shape[2] // 3]
        keep = keep.sort(-1).values.to(device)
        got, want = x.clone(), x.clone()
        ops.kv_compact_(got, keep)
        reference.kv_compact_(want, keep)
        return _equal(got, want, "compacted")
    return Check("kv_compact_", f"x {_shape(shape)} keep {shape[2] // 3}", dtype, run)


def operator_checks(half_reference: bool = True) -> list:
    """The operator calls of the self-check (the work it does: docs/selfcheck.md);
    half_reference: see _same_precision (True for the CUDA kernels)."""
    f32, f16, bf16 = FLOATS
    checks = [_coarsen(f32, 16, ops.MAX_L2, half_reference),
              _coarsen(f16, 64, ops.MEAN, half_reference),
              _coarsen(bf16, 128, ops.MAX_L2, half_reference),
              _coarsen(bf16, 16, ops.MEAN, half_reference)]
    # (dtype, head dim, block, (Hq, Hkv), L, batch): every dtype at both head dims, every
    # block size twice, GQA 1 and 4, L never a multiple of the block; the half-precision
    # (tensor-core) cases are the small ones, the emulation runs them slowest
    for dtype, dim, block, heads, length, batch in [(f32, 64, 16, (4, 4), 200, 2),
                                                    (f32, 128, 128, (4, 1), 300, 2),
                                                    (f16, 64, 16, (4, 1), 200, 1),
                                                    (f16, 128, 64, (4, 1), 260, 1),
                                                    (bf16, 64, 128, (4, 1), 300, 1),
                                                    (bf16, 128, 64, (4, 4), 200, 1)]:
        checks.append(_block_scores(dtype, dim, block, heads, length, batch, half_reference))
    # soft-capped logits (Gemma 2) and Gemma 3's head dim: 4 query heads on 1 KV head of 256
    checks += [_block_scores(f32, 64, 32, (4, 1), 200, 1, half_reference, softcap=1.5),
               _block_scores(bf16, 256, 16, (4, 1), 150, 1, half_reference, softcap=1.0)]
    checks += [_frc_scores(f32, ops.ADDITIVE, ops.ROW_MINMAX, half_reference),
               _frc_scores(bf16, ops.MULTIPLICATIVE, ops.GLOBAL_MINMAX, half_reference),
               _select_blocks(64, 1, 6), _select_blocks(7, 0, 3)]
    # (dtype, head dim, block, (Hq, Hkv), L, budget in blocks, batch): one-block, all-block and
    # partial layouts over every dtype and head dim
    for dtype, dim, block, heads, length, budget, batch in [
            (f32, 64, 16, (4, 4), 200, 1, 2), (f32, 128, 64, (8, 2), 333, 3, 2),
            (f16, 64, 128, (4, 1), 300, 2, 1), (f16, 128, 16, (4, 4), 200, 13, 1),
            (bf16, 64, 64, (4, 1), 333, 1, 1), (bf16, 128, 128, (4, 1), 200, 2, 1)]:
        checks.append(_block_sparse_attention(dtype, dim, block, heads, length, budget, batch,
                                              half_reference))
    checks += [_block_sparse_attention(f32, 256, 64, (4, 1), 200, 2, 1, half_reference,
                                       softcap=1.0),
               _block_sparse_attention(f16, 256, 32, (4, 1), 150, 100, 1, half_reference),
               _block_sparse_attention(bf16, 64, 16, (4, 1), 200, 3, 1, half_reference,
                                       softcap=2.0)]
    # (dtype, head dim, (Hq, Hkv), Lq, Lk): one query or a short chunk against a long cache
    # split its keys across thread blocks (8, 4 and 2 splits), a prefill does not
    for dtype, dim, heads, q_len, k_len in [(f32, 64, (8, 2), 1, 1000),
                                            (f32, 128, (4, 4), 128, 300),
                                            (f16, 64, (4, 4), 70, 70),
                                            (f16, 128, (4, 1), 16, 700),
                                            (bf16, 64, (6, 2), 37, 200),
                                            (bf16, 128, (8, 2), 1, 1000)]:
        checks.append(_attention_with_scores(dtype, dim, heads, q_len, k_len, half_reference))
    # sliding windows (a decode step whose window of 300 splits in 3, a chunk, a whole window
    # scored at once) and soft-caps, at head dims 64 and 256
    checks += [_attention_with_scores(f32, 256, (4, 1), 1, 700, half_reference, softcap=1.0,
                                      window=300),
               _attention_with_scores(bf16, 64, (4, 1), 100, 100, half_reference, softcap=1.5,
                                      window=33),
               _attention_with_scores(f16, 256, (4, 1), 16, 200, half_reference, window=64)]
    checks += [_kv_compact((2, 3, 500, 128), bf16), _kv_compact((2, 3, 500), f32),
               _kv_compact((1, 2, 99, 64), f16)]
    return checks


# -- the model check: a tiny model's loss on the kernels against the reference path ----------

def random_llama(layers: int = 2, heads: int = 4, kv_heads: int = 1, head_dim: int = 64,
                 vocab: int = 512, positions: int = 1024, seed: int = 0):
    """A randomly initialised LlamaForCausalLM (float32, CPU, eval mode): the self-check's tiny
    model, and the realistic shapes of scripts/compare_paths.py."""
    from transformers import LlamaConfig, LlamaForCausalLM
    hidden = heads * head_dim
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, head_dim=head_dim,
                         max_position_embeddings=positions, tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):  # the caller's random state stays as it was
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


@dataclass
class PathComparison:
    """One cell on both paths: the mean loss on the kernels, on the reference path at the same
    precision and at the exact precision, and whether the kernels' per-token losses meet the
    bar against the exact ones (2x the reference path's error + units), None when they do."""
    method: str
    protocol: str
    sparsity: float
    extension: float
    reference: float
    exact: float
    problem: Optional[str]

    def line(self) -> str:
        verdict = "ok" if self.problem is None else f"FAIL: {self.problem}"
        return (f"{self.protocol:<4} {self.method:<14} s={self.sparsity:<4g} loss extension "
                f"{self.extension:.6f} reference {self.reference:.6f} exact {self.exact:.6f} "
                f"|diff| {abs(self.extension - self.reference):.2e}  {verdict}")


def token_losses(model, input_ids, kernels: str, method, protocol, sparsity,
                 options) -> torch.Tensor:
    """The NLL [L - 1] float64 of each prediction of one window, in the logits' precision."""
    from .protocols import apply
    with torch.inference_mode(), apply(model, method, sparsity, protocol=protocol,
                                       kernels=kernels, **options):
        logits = model(input_ids).logits[0, :-1]
    working = torch.float64 if logits.dtype == torch.float64 else torch.float32
    nll = -torch.log_softmax(logits.to(working), -1).gather(-1, input_ids[0, 1:, None])
    return nll[:, 0].double().cpu()


def compare_paths(model, exact_model, input_ids, method: str, protocol: str, sparsity: float,
                  **options) -> PathComparison:
    """One window [1, L] under the method on both paths: `model` on the kernels and on the
    reference path, `exact_model` (the same weights in float64, or float32 where float64 is
    too slow) on the reference path. The bar holds the per-token losses (L - 1 of them: a
    statistic a scalar loss is too few elements for) to that bar's rule, in float32 units."""
    got = token_losses(model, input_ids, "extension", method, protocol, sparsity, options)
    same = token_losses(model, input_ids, "reference", method, protocol, sparsity, options)
    exact = token_losses(exact_model, input_ids, "reference", method, protocol, sparsity,
                         options)
    problem = bar_problem(got.float(), exact, same, ulps=16)
    return PathComparison(method, protocol, sparsity, float(got.mean()), float(same.mean()),
                          float(exact.mean()), problem)


def model_checks() -> list:
    """A two-layer random Llama (4/1 heads of 64, bfloat16) on 256 tokens, cab_v4 at s = 0.75
    under each protocol (the mask protocol calls every selection operator and
    block_sparse_attention, the kv protocol attention_with_scores and kv_compact_)."""
    built = {}

    def models(device):
        if device not in built:
            base = random_llama()
            built[device] = (copy.deepcopy(base).to(device, torch.bfloat16),
                             base.to(device, torch.float64))
        return built[device]

    def check(protocol, options):
        def run(device):
            model, exact = models(device)
            ids = torch.randint(model.config.vocab_size, (1, 256),
                                generator=torch.Generator().manual_seed(17)).to(device)
            comparison = compare_paths(model, exact, ids, "cab_v4", protocol, 0.75, **options)
            return {"loss": comparison.problem}
        return Check("model", f"2-layer Llama 4/1 heads of 64, L 256, cab_v4 s=0.75, "
                     f"{protocol} protocol", torch.bfloat16, run, poison=False)
    return [check("mask", {}), check("kv", {"kv_chunk": 16})]


# -- running, caching, reporting ------------------------------------------------------------

@dataclass
class Verdict:
    passed: bool
    checks: int
    seconds: float
    failures: list  # report lines naming operator, shape, dtype and error
    device: str
    checked: str  # when (UTC)
    cached: bool = False


def _target(device: str):
    """(the tensors' device, the kernel path's context, whether half outputs meet the half
    reference: the CUDA kernels' bar, see _same_precision)."""
    if device == "emu":
        from . import emu
        return "cpu", ops.running(emu.OPS), True
    if device == "cpu":
        return "cpu", contextlib.nullcontext(), False
    if not device.startswith("cuda"):
        raise ValueError(f"device {device!r} is not valid; valid: cuda, cuda:N, cpu, emu")
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA device is present")
    if not ops.has_kernels_for("cuda"):
        raise SelfCheckError(
            "cabattn's extension was built without CUDA kernels (CPU only): rebuild it on this "
            "machine with nvcc present (python setup.py build_ext --inplace), or run on the "
            "reference path (--kernels reference; cabattn.apply(..., kernels=\"reference\"))")
    return device, contextlib.nullcontext(), True


def run_checks(device: str = "cuda", checks: Optional[list] = None) -> Verdict:
    """Every check on `device` ("cuda[:N]", "cpu" or "emu"), uncached; a check that raises
    fails with its error (a CUDA error included) and the others still run."""
    where, kernels, half_reference = _target(device)
    checks = checks if checks is not None else operator_checks(half_reference) + model_checks()
    failures = []
    start = time.perf_counter()
    with kernels, warnings.catch_warnings():
        # determinism and eager-FlexAttention notices: nothing a user acts on
        warnings.simplefilter("ignore")
        for check in checks:
            try:
                with _poisoned() if check.poison else contextlib.nullcontext():
                    problems = check.run(where)
                if where.startswith("cuda"):
                    torch.cuda.synchronize(where)
            except Exception as err:  # noqa: BLE001  (every failure is reported, none hidden)
                problems = {"error": f"{type(err).__name__}: {str(err).splitlines()[0]}"}
            for output, problem in problems.items():
                if problem is not None:
                    failures.append(f"{check.label}: {output}: {problem}")
    return Verdict(not failures, len(checks), time.perf_counter() - start, failures,
                   describe_device(device), datetime.now(timezone.utc).isoformat(
                       timespec="seconds"))


def describe_device(device: str) -> str:
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        major, minor = torch.cuda.get_device_capability(index)
        return f"{torch.cuda.get_device_name(index)} (sm_{major}{minor})"
    if device == "emu":
        return f"the CUDA kernels emulated on the CPU ({platform.machine()})"
    return f"the CPU kernels ({platform.machine()})"


def _build_hash() -> str:
    """sha256 of the compiled libraries and of the checks themselves (a changed check reruns)."""
    from . import _C
    digest = hashlib.sha256()
    for path in sorted(Path(_C.__file__).parent.glob("_*.so")) + [Path(__file__)]:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def cache_key(device: str) -> dict:
    """What the verdict depends on: device name, compute capability, driver, torch, build."""
    key = {"device": describe_device(device), "torch": torch.__version__,
           "build": _build_hash()}
    if device.startswith("cuda"):
        driver = getattr(torch._C, "_cuda_getDriverVersion", lambda: None)()
        key.update(capability=list(torch.cuda.get_device_capability(torch.device(device))),
                   driver=driver, cuda=torch.version.cuda)
    return key


def cache_path(device: str, folder=None) -> Path:
    key = json.dumps(cache_key(device), sort_keys=True)
    name = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir(folder) / "selfcheck" / f"{name}.json"


def check(device: str = "cuda", force: bool = False, folder=None, say=print) -> Verdict:
    """The verdict for `device`: the cached one unless force, else the checks run now (and
    their verdict cached). Says one line; never raises on a failed check (see ensure)."""
    _target(device)  # a bad device or a build without its kernels: said before anything else
    path = cache_path(device, folder)
    if path.exists() and not force:
        stored = json.loads(path.read_text())
        verdict = Verdict(**stored["verdict"], cached=True)
    else:
        say(f"cabattn self-check on {describe_device(device)}: every operator against the "
            "reference, then a tiny model on both paths ...")
        verdict = run_checks(device)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written beside and renamed: Ray actors on identical GPUs may write the same verdict
        # at once, and a reader sees a whole file or none.
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp",
                                         delete=False) as tmp:
            json.dump({"key": cache_key(device), "verdict": {
                k: v for k, v in verdict.__dict__.items() if k != "cached"}}, tmp, indent=1)
        os.chmod(tmp.name, 0o644)  # a shared cache folder: readable by its other users
        os.replace(tmp.name, path)
    say(summary(verdict, path))
    return verdict


def summary(verdict: Verdict, path: Path) -> str:
    state = "PASSED" if verdict.passed else f"FAILED ({len(verdict.failures)} problems)"
    when = (f"cached from {verdict.checked}, python -m cabattn.selfcheck --force checks again"
            if verdict.cached else f"{verdict.seconds:.1f} s, cached")
    return (f"cabattn self-check on {verdict.device}: {state}, {verdict.checks} checks "
            f"({when}; {path})")


def failure_message(verdict: Verdict) -> str:
    return "\n".join([
        f"cabattn's compiled kernels FAILED the self-check on {verdict.device}:",
        *[f"  {line}" for line in verdict.failures],
        "No cell was computed. The same run on the reference path (plain PyTorch and "
        "FlexAttention, slower, never different beyond the correctness bar) is "
        "`python -m eval.run ... --kernels reference` (cabattn.apply(..., "
        "kernels=\"reference\")). Please report the lines above with "
        "`python -m cabattn.selfcheck --force` output."])


def ensure(device: str = "cuda", say=print, folder=None) -> Verdict:
    """check(device), raising SelfCheckError (naming operator, shape, dtype and error, and the
    reference path) when it failed: the harness's gate before a cell on a CUDA device."""
    verdict = check(device, folder=folder, say=say)
    if not verdict.passed:
        raise SelfCheckError(failure_message(verdict))
    return verdict


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cabattn.selfcheck",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda, cuda:N, cpu (the CPU kernels) or emu (the CUDA kernels "
                             "emulated on the CPU; slow); default: cuda when present")
    parser.add_argument("--force", action="store_true",
                        help="check again even when a verdict is cached")
    parser.add_argument("--cache-dir", help="the cache folder (default $CABATTN_CACHE, else "
                                            "~/.cache/cabattn)")
    args = parser.parse_args(argv)
    try:
        verdict = check(args.device, force=args.force, folder=args.cache_dir)
    except (ValueError, SelfCheckError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not verdict.passed:
        print(failure_message(verdict), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
