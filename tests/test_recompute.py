"""recompute.py: LoRA branches that redo RMSNorm and SwiGLU in the backward instead of keeping their outputs.

One decoder layer without checkpointing saves exactly the norm outputs and the SwiGLU output less (counted by
storage: saved_tensors.py) and computes the same output, loss and gradients, bit for bit, as the path that keeps them
(set_lora_path(..., recompute_inputs=False)), with dropout 0 and 0.05, through the eager spec functions and through
fused.py's Functions (compiled on the CPU here; the extension's kernels in tests/cuda/test_recompute_cuda.py); whole
models agree under every checkpointing mode; recipes replay bit for bit, go stale when an input changes in place and
are never made without gradients.

Covers CPU. Leaves out speed (benchmarks/bench_step.py).
"""

import pytest
import torch

from minqlora import fused, recompute
from minqlora.fused import rms_norm, swiglu
from minqlora.lora import add_lora, lora_modules
from minqlora.lora_fused import set_lora_path
from minqlora.shapes import random_model, shape_config
from saved_tensors import module_tensors, saved_bytes


def lora_model(dtype, p: float, device="cpu", layers=1):
    """The tiny shape in NF4 with r=16 adapters on all seven projections and nonzero B (B = 0 hides B's path)."""
    model = random_model(shape_config("tiny", num_hidden_layers=layers), device=device, dtype=dtype)
    add_lora(model, r=16, alpha=32, dropout=p)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.1)
    return model.train()


def layer_step(model, x, recompute_inputs: bool, autocast: bool):
    """One DecoderLayer forward ("none" mode) and backward of a fixed random projection of its output: (output,
    loss, saved bytes, gradients of the layer input and of every LoRA parameter)."""
    set_lora_path(model, "fused", recompute_inputs=recompute_inputs)
    layer, device = model.model.layers[0], x.device
    b, t, _ = x.shape
    x = x.detach().requires_grad_()
    cos, sin = model.model.rotary_emb(torch.arange(t, device=device).expand(b, t), x.dtype)
    torch.manual_seed(3)  # the same dropout seeds on both paths
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        out, saved = saved_bytes(layer, x, cos, sin, None, exclude=[*module_tensors(model), cos, sin])
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device)
    loss = (out.float() * weight).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out.detach(), loss.detach(), saved.bytes, {"input": x.grad, **grads}


def check_layer(device: str, dtype: torch.dtype, p: float, fused_ops: bool, autocast: bool = False) -> None:
    """With recipes the layer saves both norm outputs and the SwiGLU output less, (2·hidden + intermediate) values
    a token in the branch's dtype, and computes bit-identical results. On the eager bf16 path only SwiGLU's output
    goes: there the norm's autograd keeps a float32 copy of its input rather than the input, so a norm's recipe
    keeps its input in place of its output (equal bytes)."""
    model = lora_model(dtype, p, device)
    cfg = model.config
    x = torch.randn(2, 24, cfg.hidden_size, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    out0, loss0, kept, grads0 = layer_step(model, x, recompute_inputs=False, autocast=autocast)
    out1, loss1, lean, grads1 = layer_step(model, x, recompute_inputs=True, autocast=autocast)
    values = (2 * cfg.hidden_size if fused_ops or dtype == torch.float32 else 0) + cfg.intermediate_size
    branch_bytes = 2 if autocast else x.element_size()  # under autocast the branch keeps a bf16 cast of x
    assert kept - lean == x.shape[0] * x.shape[1] * values * branch_bytes
    assert torch.equal(out1, out0) and torch.equal(loss1, loss0)
    assert len(grads0) == 1 + 2 * 7
    for name, g in grads0.items():
        assert g.abs().sum() > 0, name
        assert torch.equal(grads1[name], g), name


@pytest.mark.parametrize("p", [0.0, 0.05])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_layer_saves_less_and_computes_the_same_eager(dtype, p):
    check_layer("cpu", dtype, p, fused_ops=False)


@pytest.mark.parametrize("p", [0.0, 0.05])
def test_layer_saves_less_and_computes_the_same_through_fused_functions(cpu_fusion, p):
    # bf16, the GPU's QLoRA dtype; the Functions save what they save on every backend (fused.py).
    check_layer("cpu", torch.bfloat16, p, fused_ops=True)


def test_layer_under_autocast():
    # An fp32 model under bf16 autocast: the branch's x is a bf16 cast of the norm output, recomputed and cast again.
    check_layer("cpu", torch.float32, 0.05, fused_ops=False, autocast=True)


def model_loss_and_grads(model, ids, mode, offload, keep_last, recompute_inputs):
    set_lora_path(model, "fused", recompute_inputs=recompute_inputs)
    model.gradient_checkpointing = mode
    model.model.offload_checkpoints = offload
    model.model.keep_last_layers = keep_last
    torch.manual_seed(7)
    logits = model(ids)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("mode,offload,keep_last", [("none", False, 0), ("full", False, 0), ("selective", False, 0),
                                                    ("full", True, 0), ("selective", True, 0), ("full", False, 1)])
def test_every_checkpointing_mode_computes_the_same(mode, offload, keep_last):
    """Recipes inside recomputed layers (torch's checkpoint, the offloaded halves, selective's dispatch mode) give the
    same loss and gradients as keeping the inputs, bit for bit."""
    model = lora_model(torch.float32, 0.05, layers=2)
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    loss0, grads0 = model_loss_and_grads(model, ids, mode, offload, keep_last, recompute_inputs=False)
    loss1, grads1 = model_loss_and_grads(model, ids, mode, offload, keep_last, recompute_inputs=True)
    assert torch.equal(loss1, loss0)
    assert len(grads0) == 2 * 2 * 7
    for name, g in grads0.items():
        assert torch.equal(grads1[name], g), name


# -- recipes ---------------------------------------------------------------------------------------------------------

def test_replay_gives_the_same_bits_under_the_forward_autocast_state():
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(6, 32, generator=gen), 1 + 0.1 * torch.randn(32, generator=gen)
    g, u = torch.randn(6, 48, generator=gen), torch.randn(6, 48, generator=gen)
    for fn, args in ((rms_norm, (x, w, 1e-5)), (swiglu, (g, u))):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fused.call(fn, *args)
        replay, tensors = recompute.recipe_of(out)
        assert replay.autocast == ("cpu", True, torch.bfloat16)
        assert all(a is b for a, b in zip(tensors, (a for a in args if isinstance(a, torch.Tensor))))
        again = replay(tensors)
        assert torch.equal(again, out) and not again.requires_grad


def test_stale_recipes_are_not_used():
    gen = torch.Generator().manual_seed(0)
    g, u = torch.randn(6, 48, generator=gen), torch.randn(6, 48, generator=gen)
    out = fused.call(swiglu, g, u)
    assert recompute.recipe_of(out) is not None
    assert recompute.recipe_of(out[:3]) is None  # a view is not the tagged tensor
    u.mul_(2)  # an input changed in place: replaying would not give out
    assert recompute.recipe_of(out) is None
    out2 = fused.call(swiglu, g, u)
    out2.add_(1)  # the output changed in place
    assert recompute.recipe_of(out2) is None


def test_stale_input_in_a_layer_falls_back_to_keeping_x():
    """A norm output changed in place between the norm and the projections is kept as it is (no recipe), so
    gradients follow the changed values."""
    model = lora_model(torch.float32, 0.0)
    set_lora_path(model, "fused")
    layer = model.model.layers[0]
    x = torch.randn(1, 5, model.config.hidden_size, requires_grad=True)
    h = layer.post_attention_layernorm(x)
    h.mul_(3)
    want = layer.mlp(h.detach().clone().requires_grad_())
    got = layer.mlp(h)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    got.sum().backward()
    a = layer.mlp.gate_proj.lora_A.weight
    ga = a.grad.clone()
    a.grad = None
    want.sum().backward()
    torch.testing.assert_close(ga, a.grad, rtol=0, atol=0)


def test_nothing_is_tagged_without_gradients():
    g, u = torch.randn(4, 8), torch.randn(4, 8)
    with torch.no_grad():
        assert recompute.recipe_of(fused.call(swiglu, g, u)) is None
    with torch.inference_mode():
        assert recompute.recipe_of(fused.call(swiglu, g, u)) is None
