"""Tiny random models of the transformers families a protocol may meet, built from configs
written here (no download), and a probe that records what transformers passes to the attention
function of each layer.

Each family is 2 layers, hidden size 64, a 256-token vocabulary and 512 positions, float32, in
eval mode, its weights drawn after torch.manual_seed(seed). `FAMILIES[name].features` declares
the attention features it has (docs/protocols.md: a protocol reproduces them at s = 0 or
refuses the model, naming the feature): per-layer sliding windows, logit soft-capping,
attention sinks, partial or no rotary embedding, QK-norm, and a scaling other than
1/sqrt(head_dim). `attention_calls(model, ids)` runs one forward through a registered probe
attention function and returns, per layer, the keyword arguments it received.

    family = FAMILIES["gemma2"]
    model = family.build()
    calls = attention_calls(model, torch.randint(0, VOCAB, (1, 256)))
    calls[0]["sliding_window"], calls[0]["softcap"]     # 64, 50.0
"""
import math
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import transformers
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import eager_mask

VOCAB = 256
HIDDEN = 64
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16
POSITIONS = 512
WINDOW = 64  # the sliding window of the families that have one
PROBE = "cabattn_family_probe"


@dataclass(frozen=True)
class AttentionFeatures:
    """What changes a layer's attention beyond causal softmax(q k^T / sqrt(d)) v with full RoPE."""
    sliding_window: tuple  # per layer: W (the layer attends to the last W keys) or None
    softcap: Optional[float] = None  # scores -> c * tanh(scores / c) before the softmax
    sinks: bool = False  # a learned per-head logit in the softmax's denominator (s_aux)
    rotary_fraction: float = 1.0  # share of each head's dims RoPE rotates; 0: no RoPE at all
    no_rope_layers: tuple = ()  # layers that use no RoPE (SmolLM3's NoPE layers)
    qk_norm: bool = False  # queries and keys are normalised before RoPE
    scaling: Optional[float] = None  # the score scale when it is not 1/sqrt(head_dim)

    @property
    def score_scale(self) -> float:
        """What q k^T is multiplied by."""
        return self.scaling if self.scaling is not None else 1 / math.sqrt(HEAD_DIM)


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable  # (seed=0) -> a model in eval mode, float32
    features: AttentionFeatures


# Special tokens inside the small vocabulary (the families' defaults lie beyond it).
TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def _common(**config) -> dict:
    """The sizes every family shares (its own config names win)."""
    return {"vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": 2 * HIDDEN,
            "num_hidden_layers": 2, "num_attention_heads": HEADS,
            "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
            "max_position_embeddings": POSITIONS, **TOKEN_IDS, **config}


def _builder(config_class: str, model_class: str, prepare: Callable = None, **config):
    def build(seed: int = 0):
        torch.manual_seed(seed)
        model_type = getattr(transformers, model_class)
        model = model_type(getattr(transformers, config_class)(**config)).float().eval()
        if prepare is not None:
            with torch.no_grad():
                prepare(model)
        return model
    return build


def _scale_queries_and_keys(factor: float) -> Callable:
    """Scores grow by factor^2: at 8, enough that a soft-cap of 5 changes the attention
    (the last hidden state moves by about half its norm without the cap)."""
    def prepare(model):
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(factor)
            layer.self_attn.k_proj.weight.mul_(factor)
    return prepare


FULL = (None, None)
SLIDING = (WINDOW, WINDOW)
GEMMA_LAYERS = ["sliding_attention", "full_attention"]  # the Gemma 2/3 mix of local and global
# Gemma 2's 27B scales scores by query_pre_attn_scalar^-0.5 with a scalar other than head_dim.
GEMMA2_SCALAR = 24

# GPT-OSS's YaRN (factor 32), its original context scaled down to these models' positions.
GPT_OSS_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                "truncate": False, "rope_theta": 150000.0,
                "original_max_position_embeddings": POSITIONS // 32}

FAMILIES = {family.name: family for family in (
    Family("llama", _builder("LlamaConfig", "LlamaForCausalLM", **_common()),
           AttentionFeatures(FULL)),
    Family("qwen2", _builder("Qwen2Config", "Qwen2ForCausalLM", **_common()),
           AttentionFeatures(FULL)),
    Family("qwen3", _builder("Qwen3Config", "Qwen3ForCausalLM", **_common()),
           AttentionFeatures(FULL, qk_norm=True)),
    Family("gemma", _builder("GemmaConfig", "GemmaForCausalLM", **_common()),
           AttentionFeatures(FULL)),
    Family("olmo2", _builder("Olmo2Config", "Olmo2ForCausalLM", **_common()),
           AttentionFeatures(FULL, qk_norm=True)),
    Family("granite", _builder("GraniteConfig", "GraniteForCausalLM",
                               **_common(attention_multiplier=0.0078125)),
           AttentionFeatures(FULL, scaling=0.0078125)),
    Family("cohere", _builder("CohereConfig", "CohereForCausalLM",
                              **_common(use_qk_norm=True)),
           AttentionFeatures(FULL, qk_norm=True)),
    Family("smollm3", _builder("SmolLM3Config", "SmolLM3ForCausalLM",
                               **_common(no_rope_layer_interval=2)),
           AttentionFeatures(FULL, no_rope_layers=(1,))),
    Family("phi", _builder("PhiConfig", "PhiForCausalLM",
                           **_common(partial_rotary_factor=0.5)),
           AttentionFeatures(FULL, rotary_fraction=0.5)),
    Family("phi3", _builder("Phi3Config", "Phi3ForCausalLM", **_common()),
           AttentionFeatures(FULL)),
    Family("gpt_neox", _builder("GPTNeoXConfig", "GPTNeoXForCausalLM",
                                **_common(rotary_pct=0.25)),
           AttentionFeatures(FULL, rotary_fraction=0.25)),
    Family("gpt2", _builder("GPT2Config", "GPT2LMHeadModel", vocab_size=VOCAB, n_embd=HIDDEN,
                            n_layer=2, n_head=HEADS, n_positions=POSITIONS, **TOKEN_IDS),
           AttentionFeatures(FULL, rotary_fraction=0.0)),
    Family("mistral", _builder("MistralConfig", "MistralForCausalLM",
                               **_common(sliding_window=WINDOW)),
           AttentionFeatures(SLIDING)),
    Family("gemma2", _builder("Gemma2Config", "Gemma2ForCausalLM",
                              **_common(sliding_window=WINDOW, layer_types=GEMMA_LAYERS,
                                        query_pre_attn_scalar=GEMMA2_SCALAR)),
           AttentionFeatures((WINDOW, None), softcap=50.0, scaling=GEMMA2_SCALAR ** -0.5)),
    Family("gemma2_softcap5", _builder(
        "Gemma2Config", "Gemma2ForCausalLM", _scale_queries_and_keys(8.0),
        **_common(layer_types=["full_attention"] * 2, attn_logit_softcapping=5.0,
                  query_pre_attn_scalar=HEAD_DIM)),
        AttentionFeatures(FULL, softcap=5.0)),
    Family("gemma3", _builder("Gemma3TextConfig", "Gemma3ForCausalLM",
                              **_common(sliding_window=WINDOW, layer_types=GEMMA_LAYERS,
                                        query_pre_attn_scalar=HEAD_DIM)),
           AttentionFeatures((WINDOW, None), qk_norm=True)),
    Family("gpt_oss", _builder("GptOssConfig", "GptOssForCausalLM",
                               **_common(layer_types=["full_attention"] * 2,
                                         num_local_experts=4, num_experts_per_tok=2,
                                         rope_parameters=GPT_OSS_ROPE)),
           AttentionFeatures(FULL, sinks=True)),
)}


# -- the probe -------------------------------------------------------------------------------

_recorded = None  # the list a running attention_calls fills


def _probe(module, query, key, value, attention_mask, **kwargs):
    """Records the call, then computes what the model's own eager attention computes (the
    function of the module's modeling file, which honours its soft-cap and sinks)."""
    if _recorded is not None:
        _recorded.append({"layer": module.layer_idx, "query": tuple(query.shape),
                          "key": tuple(key.shape),
                          "attention_mask": (None if attention_mask is None
                                             else tuple(attention_mask.shape)),
                          **kwargs})
    eager = sys.modules[type(module).__module__].eager_attention_forward
    return eager(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(PROBE, _probe)
# The eager mask always holds the causal (and sliding) structure: the eager function, unlike
# sdpa, has no is_causal to fall back on when the mask is left out.
AttentionMaskInterface.register(PROBE, eager_mask)


def attention_calls(model, input_ids: torch.Tensor) -> list:
    """Per layer (in layer order), the keyword arguments transformers passed to the attention
    function in one forward of input_ids, plus the query/key shapes and the mask's shape (or
    None): scaling, dropout, sliding_window, softcap, s_aux, ... as that family passes them.
    The model's attention implementation is restored afterwards."""
    global _recorded
    before = model.config._attn_implementation
    _recorded = []
    try:
        model.set_attn_implementation(PROBE)
        with torch.no_grad():
            model(input_ids)
        calls = _recorded
    finally:
        _recorded = None
        model.set_attn_implementation(before)
    return sorted(calls, key=lambda call: call["layer"])

