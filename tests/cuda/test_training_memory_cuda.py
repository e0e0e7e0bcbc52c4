"""The memory-saving paths of a training step on a GPU, in bf16: the chunked head + loss (loss.py), checkpointing
with the layer inputs offloaded to pinned host memory and the selective mode (checkpointing.py), and flash attention
being the kernel SDPA runs for unpadded rows. Values against the readable paths; memory from torch's allocator."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from minqlora import fused
from minqlora.checkpointing import HostOffloader
from minqlora.lora import add_lora, lora_modules
from minqlora.loss import linear_cross_entropy
from minqlora.shapes import random_model, shape_config

DEV = torch.device("cuda")


def test_chunked_loss_bf16_matches_full_logits_and_saves_memory():
    torch.manual_seed(0)
    n, h, v = 4096, 1024, 32000
    head = nn.Linear(h, v, bias=False, device=DEV, dtype=torch.bfloat16)
    hidden = torch.randn(n, h, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, v, (n,), device=DEV)
    targets[::7] = -100

    def run(fn):
        hidden.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = fn()
        (loss / n).backward()
        torch.cuda.synchronize()
        return loss.detach(), hidden.grad.clone(), torch.cuda.max_memory_allocated() - base

    ref, ref_grad, ref_mem = run(lambda: F.cross_entropy(head(hidden).float(), targets, reduction="sum"))
    ours, grad, mem = run(lambda: linear_cross_entropy(hidden, head, targets, chunk=512))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-2)
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=2e-2, atol=2e-5)
    # Full logits: n * v * (2 + 4 + 4 + 2) bytes ≈ 1.5 GB; chunks of 512 rows: about an eighth of that.
    assert mem < ref_mem / 4, (mem, ref_mem)


def _lora_model(layers=4):
    torch.manual_seed(0)
    config = shape_config("tiny", hidden_size=512, intermediate_size=1536, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)
    model = random_model(config, device=DEV)
    add_lora(model, r=8, alpha=16, dropout=0.05)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.02)
    return model.train()


def _step(model, ids, mode, offload):
    model.gradient_checkpointing, model.model.offload_checkpoints = mode, offload
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        hidden = model.model(ids)
    loss = linear_cross_entropy(hidden[:, :-1], model.lm_head, ids[:, 1:], chunk=256) / ids.numel()
    loss.backward()
    torch.cuda.synchronize()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads, torch.cuda.max_memory_allocated()


@pytest.mark.parametrize("mode,offload", [("full", True), ("selective", False), ("selective", True)])
def test_offload_and_selective_match_full_checkpointing(mode, offload):
    model = _lora_model()
    ids = torch.randint(0, 1000, (2, 1024), device=DEV)
    # Selective checkpointing runs the eager elementwise ops (fused.py steps aside under its dispatch mode), so it
    # is compared with an eager full-checkpointing step: the same ops, the same values.
    fused.set_fused(mode != "selective", min_elements=0)
    try:
        ref_loss, ref, _ = _step(model, ids, "full", False)
        loss, grads, _ = _step(model, ids, mode, offload)
    finally:
        fused.set_fused(True)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for name in ref:
        assert ref[name].abs().sum() > 0, name
        torch.testing.assert_close(grads[name], ref[name], rtol=1e-2, atol=1e-5, msg=name)


def test_offload_keeps_layer_inputs_off_the_gpu():
    model = _lora_model(layers=8)
    ids = torch.randint(0, 1000, (1, 8192), device=DEV)
    _, _, on_gpu = _step(model, ids, "full", False)
    _, _, offloaded = _step(model, ids, "full", True)
    layer_input = ids.numel() * 512 * 2  # (1, T, H) bf16 per layer
    assert offloaded < on_gpu - 4 * layer_input, (offloaded, on_gpu)


def test_host_offloader_round_trip_on_a_side_stream():
    off = HostOffloader(DEV)
    xs = [torch.randn(256, 1024, device=DEV, dtype=torch.bfloat16) for _ in range(4)]
    slots = [off.save(x) for x in xs]
    assert all(off.host[s].is_pinned() for s in slots)
    back = [off.load(s) for s in reversed(slots)]  # backward order; each load prefetches the one before
    for x, y in zip(reversed(xs), back):
        assert torch.equal(x, y) and y.device.type == "cuda"


def test_unpadded_rows_run_flash_attention():
    # With flash as the only allowed backend, SDPA raises if it cannot take the model's call (GQA, causal, bf16).
    torch.manual_seed(0)
    config = shape_config("tiny", hidden_size=1024, intermediate_size=2048, num_hidden_layers=2,
                          num_attention_heads=8, num_key_value_heads=2, vocab_size=1000)  # head_dim 128, as Llama
    model = random_model(config, device=DEV)
    add_lora(model, r=4, alpha=8)
    model.train()
    ids = torch.randint(0, 1000, (2, 512), device=DEV)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), torch.autocast("cuda", dtype=torch.bfloat16):
        model(ids).float().mean().backward()
