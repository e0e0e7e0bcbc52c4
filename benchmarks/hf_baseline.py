"""The transformers + peft + bitsandbytes QLoRA stack on a random-weight Llama, built the usual way but in 4 bits
layer by layer: the competitor of bench_step.py and bench_context.py.

"The usual way" is from_pretrained(quantization_config=BitsAndBytesConfig(nf4, double quant, bf16 compute)), then
peft.prepare_model_for_kbit_training (freezes the base, casts the 16-bit rest to fp32, enables gradient
checkpointing and input gradients), peft.get_peft_model (LoRA on all seven projections) and bitsandbytes'
PagedAdamW32bit. from_pretrained needs a checkpoint on disk, 140 GB for a 70B shape, so the model is built the way
from_pretrained builds it instead: on the meta device, every decoder projection replaced by a bitsandbytes
Linear4bit whose random bf16 weight is quantized on the device as it is created (one weight at a time), the
embedding, norms and head materialised in bf16, and the attributes from_pretrained sets for a 4-bit model
(is_loaded_in_4bit, quantization_config) set the same way, so peft takes the same paths.

Leaves out: Unsloth (not in this environment), timing (the callers').
"""

from __future__ import annotations

import bitsandbytes as bnb
import peft
import torch
import transformers
from torch import nn

from minqlora.model import LlamaConfig

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def hf_config(config: LlamaConfig) -> transformers.LlamaConfig:
    d = config.to_hf()
    d.pop("architectures"), d.pop("model_type")
    return transformers.LlamaConfig(**d, attn_implementation="sdpa")


@torch.no_grad()
def random_hf_qlora(config: LlamaConfig, device: torch.device, r=16, alpha=32, dropout=0.05, seed=0,
                    gradient_checkpointing=True):
    """A peft-wrapped 4-bit transformers Llama of `config` with random weights on `device`, ready to train."""
    gen = torch.Generator(device).manual_seed(seed)

    def draw(shape, std):
        return (torch.randn(shape, generator=gen, device=device) * std).to(torch.bfloat16)

    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(hf_config(config))
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in TARGETS:
                if not hasattr(parent, name):
                    continue
                old = getattr(parent, name)
                new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None,
                                        compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                        device="meta")
                weight = draw((old.out_features, old.in_features), old.in_features ** -0.5)
                new.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True,
                                               quant_type="nf4", blocksize=64, module=new).to(device)  # quantizes
                setattr(parent, name, new)
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight = nn.Parameter(torch.ones(config.hidden_size, dtype=torch.bfloat16, device=device))
    model.model.embed_tokens.weight = nn.Parameter(draw(model.model.embed_tokens.weight.shape, 1.0))
    model.model.norm.weight = nn.Parameter(torch.ones(config.hidden_size, dtype=torch.bfloat16, device=device))
    model.lm_head.weight = nn.Parameter(draw(model.lm_head.weight.shape, config.hidden_size ** -0.5))
    model.model.rotary_emb = type(model.model.rotary_emb)(model.config).to(device)  # its buffer was on meta
    # What from_pretrained(quantization_config=...) leaves on a 4-bit model, which peft reads.
    model.is_loaded_in_4bit = True
    model.is_quantized = True
    model.config.quantization_config = quant
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"random_hf_qlora left tensors on the meta device: {left[:5]}")
    with torch.enable_grad():
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
        model = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                                           target_modules=list(TARGETS), task_type="CAUSAL_LM"))
    model.train()
    return model


def hf_optimizer(params, device: torch.device, lr: float):
    """bitsandbytes' PagedAdamW32bit on CUDA (the QLoRA paper's optimizer); torch's AdamW on a CPU, where
    bitsandbytes has no paged optimizer."""
    if device.type == "cuda":
        return bnb.optim.PagedAdamW32bit(params, lr=lr)
    return torch.optim.AdamW(params, lr=lr)
