"""fused.py on the GPU (Triton kernels from torch.compile): each function against its eager self, and 20 QLoRA
training steps with fusion on against fusion off (same seed, dropout 0) under every checkpointing mode.

The CPU twins are in tests/test_fused.py.
"""

import pytest
import torch

from minqlora import fused
from minqlora.lora_fused import set_lora_path
from test_fused import check_against_eager
from test_lora_cuda import tiny_qlora, train_losses


BACKENDS = pytest.mark.parametrize("backend", fused.BACKENDS)


@BACKENDS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_functions_equal_the_eager_ones_on_cuda(backend, dtype):
    assert "cuda" in fused.fused_devices(), "fusion is on for CUDA tensors by default"
    assert fused.current_backend() == "extension", "a CUDA build defaults to its own kernels"
    fused.set_fused(True, min_elements=0, backend=backend)  # these tensors are far below the size where fusion pays
    try:
        check_against_eager("cuda", dtype, expect_compiled=backend == "compile")
    finally:
        fused.set_fused(True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_extension_forwards_round_like_the_eager_ops(dtype):
    """The kernels round every intermediate where eager PyTorch stores one: RoPE and SwiGLU give the same bits,
    RMSNorm the same up to its float32 sum's order (an ulp of the 16-bit result, rarely)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen, device="cuda").to(dtype)  # noqa: E731
    ops = torch.ops.minqlora
    q = rand(2, 300, 8, 128).transpose(1, 2)  # odd sizes, strided as Attention's views
    pos = torch.arange(300, device="cuda")[None, :, None] * 0.01
    ang = torch.cat([pos * torch.arange(1, 65, device="cuda")] * 2, dim=-1).expand(2, 300, 128)
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    assert torch.equal(ops.rope(q, cos, sin), fused.apply_rope(q, cos, sin))  # dense head dim: the vector kernel
    # The same values one element off 16-byte alignment take the strided kernel: the two agree both ways.
    q_odd = torch.empty(2, 300, 8, 129, device="cuda", dtype=dtype)[..., 1:].transpose(1, 2).copy_(q)
    for transpose in (False, True):
        assert torch.equal(ops.rope(q_odd, cos, sin, transpose), ops.rope(q, cos, sin, transpose))
    g, u = rand(7, 14336), rand(7, 14336)
    assert torch.equal(ops.swiglu(g, u), fused.swiglu(g, u))
    assert torch.equal(ops.swiglu(g[:, 1:], u[:, 1:]), fused.swiglu(g[:, 1:], u[:, 1:]))  # unaligned: one by one
    x, w = rand(64, 4096) * 3, 1 + 0.1 * rand(4096)
    got, want = ops.rms_norm(x, w, 1e-5), fused.rms_norm(x, w, 1e-5)
    assert (got != want).float().mean() < 1e-3
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)


def test_extension_ops_check_their_arguments():
    x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="weight must be \\(64,\\)"):
        torch.ops.minqlora.rms_norm(x, torch.ones(32, device="cuda", dtype=torch.bfloat16), 1e-6)
    with pytest.raises(RuntimeError, match="weight must have x's dtype"):
        torch.ops.minqlora.rms_norm(x, torch.ones(64, device="cuda"), 1e-6)
    with pytest.raises(RuntimeError, match="D even"):
        torch.ops.minqlora.rope(x.view(1, 1, 4, 64)[..., :63], x[None, :, :63], x[None, :, :63])
    with pytest.raises(RuntimeError, match="up must be"):
        torch.ops.minqlora.swiglu(x, x[:2])
    assert torch.ops.minqlora.swiglu(x[:0], x[:0]).shape == (0, 64)


@BACKENDS
@pytest.mark.parametrize("mode", ["none", "full", "offload"])
def test_training_with_fusion_equals_training_without(backend, mode):
    runs = []
    for on in (False, True):
        fused.set_fused(on, min_elements=0, backend=backend)
        try:
            model = set_lora_path(tiny_qlora(dropout=0.0, seed=0), "fused")
            model.model.offload_checkpoints = mode == "offload"
            runs.append(train_losses(model, checkpointing="none" if mode == "none" else "full"))
        finally:
            fused.set_fused(True)
    eager, fast = runs
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(eager), rtol=2e-2, atol=2e-2)
    assert fast[-1] < fast[0] - 0.1  # it learns the batch
