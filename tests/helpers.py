"""What the tests share: the repository root and a child Python's environment, the one tiny
random Llama factory; for the operator tests random inputs, a random block layout, the error bar
against the float64 reference (docs/operators.md, Correctness bar) and output poisoning."""
import os
from pathlib import Path

import pytest
import torch
from emulation import runs_cuda_kernels
from transformers import LlamaConfig, LlamaForCausalLM

from cabattn.correctness import bar_problem

REPO = Path(__file__).resolve().parent.parent  # the repository root (this file is in tests/)


def subprocess_env(threads: int = 1, **extra) -> dict:
    """The environment of a test's child Python: this checkout first on PYTHONPATH, `threads`
    OpenMP threads (the machine is shared with other work), and `extra`."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": str(threads), **extra}


def tiny_llama(vocab_size: int = 128, hidden_size: int = 64, layers: int = 2, heads: int = 4,
               kv_heads: int = 2, positions: int = 256, intermediate_size: int = None,
               seed: int = 0, **config) -> LlamaForCausalLM:
    """A random LlamaForCausalLM in eval mode, its weights drawn after torch.manual_seed(seed)
    (intermediate size 2 x hidden unless given; `config`: further LlamaConfig fields)."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=positions, **config)).eval()

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
HALF_TYPES = [torch.float16, torch.bfloat16]


def dtypes_for(device):
    """The input dtypes a device's kernels take: float64 (for references) on the CPU kernels
    only, not on the CUDA ones (on a GPU or emulated)."""
    return [d for d in DTYPES if not (d == torch.float64 and runs_cuda_kernels(device))]


def qkv(batch, q_heads, kv_heads, length, dim, *, dtype=torch.float32, device="cpu",
        k_length=None, scale=1.0, generator=None):
    """Fresh random q [B, Hq, L, d] and k, v [B, Hkv, Lk, d] (Lk = L unless given), drawn in
    float64 and then cast: a float64 reference of the cast inputs sees exactly the values the
    kernel sees."""
    k_length = length if k_length is None else k_length
    shapes = [(batch, q_heads, length, dim), (batch, kv_heads, k_length, dim),
              (batch, kv_heads, k_length, dim)]
    return [(torch.randn(shape, dtype=torch.float64, generator=generator) * scale)
            .to(device=device, dtype=dtype) for shape in shapes]


def random_layout(batch, heads, blocks, budget, device="cpu", seed=0):
    """A valid CSR block layout (block_count [B, H, M], block_index [B, H, M, budget] int32):
    row I keeps its diagonal plus min(I + 1, budget) - 1 random earlier blocks, ascending,
    padded with -1. Built with plain torch (no cabattn code)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(batch, heads, blocks, blocks, generator=g)
    causal = torch.ones(blocks, blocks, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, -1.0)
    scores.diagonal(dim1=-2, dim2=-1).fill_(2.0)
    top = scores.topk(min(budget, blocks), dim=-1).indices
    count = torch.clamp(torch.arange(blocks) + 1, max=budget).int().expand(batch, heads, blocks)
    slots = torch.arange(top.shape[-1])
    index = torch.where(slots < count[..., None], top, blocks).sort(-1).values
    index = torch.where(index == blocks, -1, index)
    return count.contiguous().to(device), index.int().contiguous().to(device)


def reference_dtype(input_dtype, output_dtype, device):
    """The precision of the plain-PyTorch reference a kernel output is held to (2x its error).

    float64 inputs: float64. Outputs the kernels return in float32 (lse, block sums and maxima,
    mass, curvature) are accumulated in float32 from any input dtype, so they meet a float32
    reference of the same (exactly upcast) inputs, not a half-precision one. Half-precision
    outputs: the CPU kernels compute in float32 and round once (the float32 reference, rounded);
    the CUDA kernels round the probabilities to half for the tensor-core P @ V product, as
    FlashAttention-2 does, so they meet the half-precision reference (docs/operators.md's bar)."""
    if input_dtype == torch.float64:
        return torch.float64
    if output_dtype == torch.float32 or not runs_cuda_kernels(device):
        return torch.float32
    return input_dtype


def assert_within_reference_error(got, exact, reference, name="output", ulps=None):
    """docs/operators.md's bar (cabattn.correctness): the kernel's error against the float64
    `exact` is at most twice the error of `reference` (see reference_dtype), element-wise and
    in norm, plus a few units of the accumulation precision. The output must be fully written
    (outputs are poisoned before every call, see poison_uninitialized)."""
    problem = bar_problem(got, exact, reference, ulps)
    assert problem is None, f"{name}: {problem}"


def assert_outputs_match_reference(got, call, inputs, device, names, ulps=None):
    """Each output of a kernel (the tuple `got`, named by `names`) against call(*inputs) in
    float64 and at the kernel's precision (reference_dtype; one reference run per precision);
    ulps: {name: units of slack} for outputs that sum many terms."""
    runs = {}

    def run(precision):
        if precision not in runs:
            runs[precision] = call(*(t.to(precision) if t.is_floating_point() else t
                                     for t in inputs))
        return runs[precision]

    for i, (out, want, name) in enumerate(zip(got, run(torch.float64), names)):
        same = run(reference_dtype(inputs[0].dtype, out.dtype, device))[i].to(out.dtype)
        assert_within_reference_error(out, want, same, name, (ulps or {}).get(name))


@pytest.fixture
def poison_uninitialized():
    """Fresh tensors from torch.empty (also those the C++ and CUDA kernels allocate through
    ATen) come filled with NaN (float) or the largest integer while the test runs, so an output
    element a kernel never writes shows."""
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(False)
    torch.utils.deterministic.fill_uninitialized_memory = fill


def kv_methods(kv_mode: str) -> list:
    """The registered methods with a kv-protocol rule (methods.available("kv")) whose kv_mode
    is `kv_mode` ("evict" or "select")."""
    from cabattn import methods
    return [name for name in methods.available("kv") if methods.METHODS[name].kv_mode == kv_mode]


def attention_inputs(model, ids: torch.Tensor, layers) -> dict:
    """{layer: (q, k, scale)}: the post-RoPE q [B, Hq, L, d] and k [B, Hkv, L, d] that the
    given layers attend with in one dense (SDPA) pass of `model` over ids, and the layer's
    softmax scale; the model's attention implementation is restored afterwards."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    captured = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        if module.layer_idx in layers:
            captured[module.layer_idx] = (query.detach().contiguous(),
                                          key.detach().contiguous(), kwargs["scaling"])
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("tests_capture", capture)
    own = model.config._attn_implementation
    model.set_attn_implementation("tests_capture")
    try:
        with torch.no_grad():
            model.model(ids)
    finally:
        model.set_attn_implementation(own)
    return captured


def smollm2_attention_inputs(length: int, window: int, layers, rope_scale: float = 1.0):
    """(input ids [1, L], {layer: (q, k, scale)}): attention_inputs of the offline default
    model (SmolLM2-135M, from the cache, float32) on pd-books window `window` of L tokens (4
    evenly spaced windows, as the quick test's cells), its RoPE inverse frequencies multiplied
    by rope_scale (1 + 3e-7 is a rounding-level change)."""
    from eval.data import load_windows
    from eval.models import load_model
    loaded = load_model("smollm2-135m")
    model = loaded.model
    rotary = model.model.rotary_emb
    rotary.inv_freq.mul_(rope_scale)
    rotary.original_inv_freq = rotary.inv_freq.clone()
    ids = load_windows("pd-books", loaded.tokenizer, length, max_windows=4).input_ids
    ids = ids[window:window + 1]
    return ids, attention_inputs(model, ids, layers)
