"""lora_fused.py on the GPU: 20 training steps of a tiny NF4 Llama in bf16, fused path against the reference path
(same seed, dropout 0: the losses agree within bf16 rounding), every LoRA gradient of one step, both dropout modes
training.

Runs where a GPU is present (tests/cuda/conftest.py). The CPU twins are in tests/test_lora_fused.py.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from minqlora.linear4bit import Linear4bit
from minqlora.lora import add_lora, lora_modules
from minqlora.lora_fused import set_lora_path
from minqlora.model import Llama, LlamaConfig
from minqlora.optim import PagedAdamW

CUDA = torch.device("cuda")


def tiny_qlora(dropout=0.0, seed=0) -> Llama:
    """4 layers, hidden 256, NF4 + double quant projections, bf16 everywhere but the fp32 adapters."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128, rms_norm_eps=1e-5)
    model = Llama(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 1 / p.shape[-1] ** 0.5 if p.dim() > 1 else 1)
    model = model.to(CUDA, torch.bfloat16)
    for name, m in list(model.named_modules()):
        if name.endswith("_proj"):
            model.set_submodule(name, Linear4bit.from_linear(m, compute_dtype=torch.bfloat16))
    add_lora(model, r=16, alpha=32, dropout=dropout)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.02)
    return model


def train_losses(model, steps=20, checkpointing=True) -> list[float]:
    model.gradient_checkpointing = checkpointing
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = PagedAdamW(params, lr=1e-3)
    # One fixed batch, memorised: random tokens drawn anew each step would leave nothing to learn.
    ids = torch.randint(0, model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(7)).to(CUDA)
    losses = []
    torch.manual_seed(3)
    for _ in range(steps):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids)
        loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("checkpointing", [False, True])
def test_twenty_steps_fused_equal_reference_bf16(checkpointing):
    ref = tiny_qlora()
    fused = set_lora_path(copy.deepcopy(ref), "fused")
    want, got = train_losses(ref, checkpointing=checkpointing), train_losses(fused, checkpointing=checkpointing)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=2e-2, atol=2e-2)
    assert got[-1] < got[0] - 0.1  # it learns the batch


def test_lora_gradients_match_reference_bf16():
    ref = tiny_qlora()
    fused = set_lora_path(copy.deepcopy(ref), "fused")
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(1)).to(CUDA)
    grads = []
    for model in (ref, fused):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(ids)[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert len(grads[0]) == 2 * 7 * 4
    for name, g in grads[0].items():
        assert grads[1][name].dtype == torch.float32
        err = ((grads[1][name] - g).norm() / g.norm()).item()
        assert err < 5e-2, (name, err)


@pytest.mark.parametrize("path", ["fused", "shared-dropout"])
def test_dropout_paths_train(path):
    model = set_lora_path(tiny_qlora(dropout=0.1), path)
    losses = train_losses(model, steps=10)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
