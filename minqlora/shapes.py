"""Named Llama shapes and a random-weight builder that makes them directly in 4 bits, layer by layer.

Benchmarks and tests need models of real shapes (a Llama-3-70B has 80 layers of 8192 × 28672 projections) without
downloading them and without ever holding the 16-bit model: 70B parameters in bf16 are 140 GB, in NF4 + double
quantization about 35 GB. `random_model` builds the Llama on the meta device, then fills one decoder layer at a
time: each projection is drawn in bf16 on the target device, quantized to NF4 (ops.quantize_4bit) and the bf16
draw freed before the next. Peak memory on the device is the 4-bit model plus one bf16 projection (28672 × 8192 ×
2 B = 470 MB for the 70B shapes); host memory stays at the Python process.

Values: weights N(0, 1/fan_in) (activations of order 1 through the layers, like hf_helpers.unit_scale_), norms 1,
embeddings N(0, 1). Drawn from a seeded generator on the device, so a shape and seed give the same model on one
device type every time. These are for speed and memory measurements; their outputs mean nothing.

Leaves out: loading real checkpoints (checkpoint.py), LoRA (lora.py), non-Llama architectures.
"""

from __future__ import annotations

import torch
from torch import nn

from . import ops
from .linear4bit import Linear4bit
from .model import Llama, LlamaConfig

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
# The configs of the published checkpoints (their config.json), as LlamaConfig keyword arguments.
SHAPES: dict[str, dict] = {
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, rms_norm_eps=1e-5,
                       max_position_embeddings=131072, rope_scaling=LLAMA3_ROPE, bos_token_id=128000,
                       eos_token_id=128001),
    "llama-3-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, rope_theta=500000.0, rms_norm_eps=1e-5,
                        max_position_embeddings=131072, rope_scaling=LLAMA3_ROPE, bos_token_id=128000,
                        eos_token_id=128001),
    "llama-2-70b": dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, rope_theta=10000.0, rms_norm_eps=1e-5,
                        max_position_embeddings=4096),
    # Small enough for a CPU test (about 0.2 M parameters), with GQA and every projection of a real Llama.
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=2048),
}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def shape_config(name: str, **overrides) -> LlamaConfig:
    """The LlamaConfig of a named shape (SHAPES), with fields overridden (e.g. num_hidden_layers=2)."""
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; known: {sorted(SHAPES)}")
    unknown = set(overrides) - set(LlamaConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"shape_config({name!r}): unknown LlamaConfig fields {sorted(unknown)}")
    return LlamaConfig(**{**SHAPES[name], **overrides})


@torch.no_grad()
def random_model(config: LlamaConfig | str, device="cpu", *, quantize: str | None = "nf4", double_quant: bool = True,
                 blocksize: int = 64, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Llama:
    """A Llama of `config` (or a SHAPES name) with random weights on `device`, its projections in 4 bits.

    quantize: "nf4" or "fp4" makes the seven projections of every decoder layer Linear4bit (compute in `dtype`);
    None keeps them as `dtype` nn.Linear (a 16-bit model for comparisons). Embedding, norms and lm_head are `dtype`.
    The 16-bit model never exists: each projection is quantized as soon as it is drawn.
    """
    config = shape_config(config) if isinstance(config, str) else config
    device = torch.device(device)
    gen = torch.Generator(device).manual_seed(seed)
    with torch.device("meta"):
        model = Llama(config)

    def draw(shape, std: float) -> torch.Tensor:
        # randn in fp32 then cast: bf16 randn is not supported on every backend. One weight at a time.
        return (torch.randn(shape, generator=gen, device=device) * std).to(dtype)

    def dense(linear: nn.Linear) -> nn.Linear:
        new = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight = nn.Parameter(draw(linear.weight.shape, linear.in_features ** -0.5))
        if linear.bias is not None:
            new.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=dtype, device=device))
        return new

    def quantized(linear: nn.Linear) -> Linear4bit:
        w = draw(linear.weight.shape, linear.in_features ** -0.5)  # (out, in) bf16, freed on return
        packed, state = ops.quantize_4bit(w, blocksize, quantize, double_quant)
        new = Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None, quant_type=quantize,
                         blocksize=blocksize, double_quant=double_quant, compute_dtype=dtype, weight_dtype=dtype,
                         device="meta")
        new.set_quantized(packed, state)
        if linear.bias is not None:
            new.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=dtype, device=device), requires_grad=False)
        return new

    inner = model.model
    inner.embed_tokens.weight = nn.Parameter(draw(inner.embed_tokens.weight.shape, 1.0))
    for layer in inner.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight = nn.Parameter(torch.ones(config.hidden_size, dtype=dtype, device=device))
        for parent in (layer.self_attn, layer.mlp):
            for name in PROJECTIONS:
                if hasattr(parent, name):
                    linear = getattr(parent, name)
                    setattr(parent, name, quantized(linear) if quantize else dense(linear))
    inner.norm.weight = nn.Parameter(torch.ones(config.hidden_size, dtype=dtype, device=device))
    if config.tie_word_embeddings:
        model.tie_weights()
    else:
        model.lm_head = dense(model.lm_head)
    model.init_rope(device)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"random_model left tensors on the meta device: {left[:5]}")
    return model


def parameter_count(config: LlamaConfig) -> int:
    """Parameters of a Llama of `config` (embedding + layers + norm + untied head), without building it."""
    h, i, hd = config.hidden_size, config.intermediate_size, config.head_dim
    attn = h * hd * (config.num_attention_heads * 2 + config.num_key_value_heads * 2)
    layer = attn + 3 * h * i + 2 * h
    head = 0 if config.tie_word_embeddings else config.vocab_size * h
    return config.vocab_size * h + config.num_hidden_layers * layer + h + head


def flops_per_token(config: LlamaConfig, seq_len: int) -> float:
    """Forward FLOPs per token: 2 per multiply-add of every projection and the output layer, plus causal attention
    at seq_len (QKᵀ and PV over T/2 keys on average). A training step with a frozen base and full recomputation
    costs about 3× this (forward, recompute, grad-input; DESIGN.md §9's '6·N per token')."""
    h, hd, layers = config.hidden_size, config.head_dim, config.num_hidden_layers
    heads = config.num_attention_heads * 2 + config.num_key_value_heads * 2  # q and o; k and v
    per_layer = h * hd * heads + 3 * h * config.intermediate_size
    attention = 2 * 2 * (seq_len / 2) * config.num_attention_heads * hd
    return 2 * (layers * per_layer + config.vocab_size * h) + layers * attention
