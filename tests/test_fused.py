"""fused.py: each fused Function (compiled forward, hand-derived compiled backward) equals its spec function run
eagerly, values and gradients, and a model run through them trains like the eager one. Compiled on the CPU here
(Inductor's C++ kernels); the same functions compile to Triton on the GPU in tests/cuda/test_fused_cuda.py."""

import pytest
import torch

from minqlora import fused
from minqlora.fused import rms_norm, rope_qk, swiglu
from minqlora.model import Llama, LlamaConfig


def _grads(fn, args, wants_grad):
    """fn's outputs and the gradients of the arguments flagged in wants_grad under a fixed random cotangent."""
    args = [a.detach().clone().requires_grad_(w) if isinstance(a, torch.Tensor) else a
            for a, w in zip(args, wants_grad)]
    out = fn(*args)
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(1)
    sum((o.float() * torch.randn(o.shape, generator=gen).to(o.device)).sum() for o in outs).backward()
    return outs, [a.grad for a, w in zip(args, wants_grad) if w]


def _close(a, b, dtype):
    tol = {torch.bfloat16: 2e-2, torch.float16: 4e-3}.get(dtype, 1e-5)
    torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


def check_against_eager(device: str, dtype: torch.dtype, expect_compiled: bool = True) -> None:
    """Each fused function through fused.call against itself run eagerly: values and input gradients (through the
    compiled functions, or with expect_compiled=False the extension's kernels)."""
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(device, dtype)  # noqa: E731
    x, w = rand(2, 5, 64), 1 + 0.1 * rand(64)
    q, k = rand(2, 5, 4, 16).transpose(1, 2), rand(2, 5, 2, 16).transpose(1, 2)  # (B, heads, T, hd) views
    ang = torch.randn(2, 5, 16, generator=gen)
    cos, sin = ang.cos().to(device, dtype), ang.sin().to(device, dtype)
    g, u = rand(2, 5, 96), rand(2, 5, 96)
    cases = [(rms_norm, (x, w, 1e-6), (True, False, False)), (rope_qk, (q, k, cos, sin), (True, True, False, False)),
             (swiglu, (g, u), (True, True))]
    for fn, args, wants_grad in cases:
        fused._compiled.clear()
        want, want_grads = _grads(fn, args, wants_grad)
        got, got_grads = _grads(lambda *a: fused.call(fn, *a), args, wants_grad)
        if expect_compiled:
            assert fn in fused._compiled and len(fused._compiled) == 2, f"{fn.__name__}: not compiled fwd + bwd"
        else:
            assert not fused._compiled, f"{fn.__name__}: compiled instead of the extension's kernels"
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and a.shape == b.shape
            _close(a, b, dtype)
        for a, b in zip(got_grads, want_grads):
            assert a.dtype == b.dtype
            _close(a, b, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_functions_equal_the_eager_ones(cpu_fusion, dtype):
    check_against_eager("cpu", dtype)


def test_off_small_or_weight_gradients_mean_eager(cpu_fusion):
    x, w = torch.randn(3, 8), torch.ones(8)
    fused._compiled.clear()
    fused.call(rms_norm, x, w.requires_grad_(), 1e-6)  # the fused Function gives no weight gradient: eager
    fused.set_fused(True, cpu=True, min_elements=25)
    fused.call(rms_norm, x, w.detach(), 1e-6)  # 24 elements: below the threshold
    fused.set_fused(False)
    fused.call(rms_norm, x, w.detach(), 1e-6)
    assert fused._compiled == {} and fused.fused_devices() == ()


def test_a_model_trains_the_same_through_the_fused_ops(cpu_fusion):
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = Llama(config)
    for name, p in model.named_parameters():
        p.requires_grad_("norm" not in name)  # frozen norms, as in QLoRA: the fused RMSNorm gives no weight grad
    ids = torch.randint(0, 64, (2, 9))
    runs = []
    for on in (False, True):
        fused.set_fused(on, cpu=True, min_elements=0)
        fused._compiled.clear()
        model.zero_grad()
        logits = model(ids)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
        assert len(fused._compiled) == (6 if on else 0)
        runs.append((logits.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(runs[1][0], runs[0][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(runs[1][1], runs[0][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_default_backend_is_the_extension_where_it_is_built():
    expected = "extension" if fused.has_extension_kernels() else "compile"
    assert fused.default_backend() == expected
    before = fused.fused_devices()
    try:
        fused.set_fused(True)
        assert fused.current_backend() == expected
        fused.set_fused(True, cpu=True)  # CPU tensors take the compiled path: the extension's kernels are CUDA's
        assert fused.current_backend() == "compile"
    finally:
        fused.set_fused(bool(before), cpu="cpu" in before)


def test_extension_backend_needs_cuda_kernels_and_has_fake_kernels():
    if not fused.has_extension_kernels():  # a CPU build (CI): refused with the reason
        with pytest.raises(ValueError, match="CUDA build"):
            fused.set_fused(True, backend="extension")
    with pytest.raises(ValueError, match="backend must be one of"):
        fused.set_fused(True, backend="triton")
    # The fake kernels torch.compile traces with: shapes, dtypes and layouts of the outputs.
    x = torch.empty(2, 3, 4, 8, device="meta", dtype=torch.bfloat16).transpose(1, 2)
    cs = torch.empty(2, 4, 8, device="meta", dtype=torch.bfloat16)
    ops = torch.ops.minqlora
    assert ops.rope(x, cs, cs).stride() == x.stride()
    assert ops.rms_norm(x, torch.empty(8, device="meta", dtype=torch.bfloat16), 1e-6).is_contiguous()
    dg, du = ops.swiglu_backward(cs, cs, cs)
    assert dg.shape == du.shape == ops.swiglu(cs, cs).shape == (2, 4, 8)
