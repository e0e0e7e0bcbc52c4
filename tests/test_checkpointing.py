"""Checkpointing modes (none / full / selective, with and without offload) compute the same loss and the same LoRA
gradients, dropout included (the recomputation redraws the same masks); bad modes are refused."""

import pytest
import torch

from minqlora import checkpointing
from minqlora.checkpointing import ATTENTION_OPS, HostOffloader, checkpoint_mode
from minqlora.lora import add_lora, lora_modules
from minqlora.shapes import random_model


def _loss_and_grads(model, ids, mode, offload, keep_last=0):
    model.gradient_checkpointing = mode
    model.model.offload_checkpoints = offload
    model.model.keep_last_layers = keep_last
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the same dropout masks for every configuration
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=model.lm_head.weight.dtype == torch.bfloat16):
        logits = model(ids)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                             ids[:, 1:].reshape(-1))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def lora_model(request):
    torch.manual_seed(0)
    model = random_model("tiny", quantize="nf4", dtype=request.param)
    add_lora(model, r=4, alpha=8, dropout=0.1)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.1)
    model.train()
    return model


@pytest.mark.parametrize("mode,offload,keep_last", [("full", False, 0), ("selective", False, 0), ("full", True, 0),
                                                    ("selective", True, 0), ("full", False, 1), ("full", True, 1)])
def test_modes_give_the_same_loss_and_gradients(lora_model, mode, offload, keep_last):
    ids = torch.randint(0, lora_model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    ref_loss, ref = _loss_and_grads(lora_model, ids, "none", False)
    loss, grads = _loss_and_grads(lora_model, ids, mode, offload, keep_last)
    assert len(ref) == 2 * 7 * 2
    # On a CPU the recomputation repeats the same kernels on the same inputs with the same RNG: bit-identical.
    assert torch.equal(loss, ref_loss)
    for name in ref:
        assert ref[name].abs().sum() > 0, name
        assert torch.equal(grads[name], ref[name]), name


def test_offloaded_recomputation_skips_the_halves_last_projections(lora_model, monkeypatch):
    # o_proj's and down_proj's outputs only enter the residual sums, so backward's recomputation runs 5 of a layer's 7
    # 4-bit GEMMs (q, k, v, gate, up) and still gives all 7 their input gradients, the same bits as running all 7.
    ops = torch.ops.minqlora
    calls = []

    class Count(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (ops.gemm_4bit.default, ops.gemm_4bit_grad_input.default):
                calls.append(func)
            return func(*args, **(kwargs or {}))

    ids = torch.randint(0, lora_model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))

    def backward_calls():
        lora_model.gradient_checkpointing, lora_model.model.offload_checkpoints = "full", True
        lora_model.model.keep_last_layers = 0
        lora_model.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=lora_model.lm_head.weight.dtype == torch.bfloat16):
            loss = lora_model(ids).float().square().mean()
        calls.clear()
        with Count():
            loss.backward()
        grads = {n: p.grad.clone() for n, p in lora_model.named_parameters() if p.requires_grad}
        return calls.count(ops.gemm_4bit.default), calls.count(ops.gemm_4bit_grad_input.default), grads

    layers = len(lora_model.model.layers)
    forward, grad_input, grads = backward_calls()
    # every input gradient but the first layer's q, k, v (the frozen embedding's output needs none)
    assert (forward, grad_input) == (5 * layers, 7 * layers - 3)
    monkeypatch.setattr(checkpointing, "SKIP_UNUSED_OUTPUTS", False)  # recompute every projection
    forward_all, grad_input_all, grads_all = backward_calls()
    assert (forward_all, grad_input_all) == (7 * layers, 7 * layers - 3)
    for name in grads_all:
        assert torch.equal(grads[name], grads_all[name]), name
    assert not any(m.output_unused for m in lora_model.modules() if hasattr(m, "output_unused"))


def test_offload_tiles_the_mlp_half(monkeypatch):
    # Pieces of 16 tokens instead of 235M elements' worth: same loss and gradients as keeping everything (dropout 0: pieces draw
    # their masks in another order than one whole-tensor draw).
    torch.manual_seed(0)
    model = random_model("tiny", quantize="nf4", dtype=torch.float32)
    assert (checkpointing.mlp_tile(14336), checkpointing.mlp_tile(28672)) == (16384, 8192)  # 8B, 70B: 470 MB pieces
    monkeypatch.setattr(checkpointing, "MLP_TILE_ELEMENTS", 16 * model.config.intermediate_size)
    assert checkpointing.mlp_tile(model.config.intermediate_size) == 16
    add_lora(model, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.1)
    model.train()
    ids = torch.randint(0, 512, (2, 41), generator=torch.Generator().manual_seed(2))  # 82 tokens: 6 pieces
    ref_loss, ref = _loss_and_grads(model, ids, "none", False)
    for mode in ("full", "selective"):
        loss, grads = _loss_and_grads(model, ids, mode, True)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
        for name in ref:
            torch.testing.assert_close(grads[name], ref[name], rtol=1e-5, atol=1e-7, msg=name)


def test_offloaded_first_layer_input_gets_a_gradient_when_it_needs_one():
    # The embedding is frozen, so the first layer's input needs no gradient; a trainable embedding does.
    torch.manual_seed(0)
    model = random_model("tiny", quantize=None, dtype=torch.float32)
    model.train()
    ids = torch.randint(0, 512, (1, 12))
    grads = []
    for offload in (False, True):
        model.zero_grad(set_to_none=True)
        model.gradient_checkpointing, model.model.offload_checkpoints = "full", offload
        model(ids).square().mean().backward()
        grads.append(model.model.embed_tokens.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-7)


def test_selective_mode_keeps_the_attention_kernel_output():
    # What "selective" saves must be the op SDPA actually runs here, or it silently equals "full".
    seen = []

    class Spy(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    q = torch.randn(1, 2, 8, 16, requires_grad=True)
    with Spy():
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert ATTENTION_OPS & set(seen), seen


def test_cpu_offloader_keeps_the_tensor():
    off = HostOffloader(torch.device("cpu"))
    x, y = torch.randn(3), torch.randn(3)
    assert (off.save(x), off.save(y)) == (0, 1)
    assert off.load(1) is not None and torch.equal(off.load(0), x)


def test_bad_mode_is_refused():
    assert checkpoint_mode(True) == "full" and checkpoint_mode(False) == "none"
    model = random_model("tiny")
    with pytest.raises(ValueError, match="selective"):
        model.gradient_checkpointing = "partial"
