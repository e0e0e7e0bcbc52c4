"""The CUDA kernels of dropout_copies / dropout_sum against the CPU kernels and the spec (minqlora/dropout.py): the
same masks bit for bit, in vector and scalar kernels, past 2³² indices; the LoRA branch's dropout Function in bf16
against autograd of the masked product.

Runs where a GPU is present (tests/cuda/conftest.py). The CPU twins are in tests/test_dropout.py.
"""

import pytest
import torch

from minqlora import dropout
from minqlora.lora_fused import _DroppedDown

ops = torch.ops.minqlora


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(64, 4096), (5, 37)])  # 16-byte vectors; one element at a time
@pytest.mark.parametrize("copies, ps", [(1, [0.05]), (3, [0.3]), (2, [0.0, 0.7])])
def test_cuda_kernels_equal_the_cpu_ones(dtype, shape, copies, ps):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = ops.dropout_copies(x.cuda(), 77, ps, copies)
    assert torch.equal(got.cpu(), ops.dropout_copies(x, 77, ps, copies))
    g = torch.randn((copies, *shape), generator=torch.Generator().manual_seed(2)).to(dtype)
    assert torch.equal(ops.dropout_sum(g.cuda(), 77, ps).cpu(), ops.dropout_sum(g, 77, ps))


def test_indices_past_two_to_the_32():
    """Copy 1 of an input of 2³¹ + 16 elements reaches index 2³² + 31: the hash's high word is used."""
    n = 2**31 + 16
    x = torch.ones(n, device="cuda", dtype=torch.bfloat16)
    out = ops.dropout_copies(x, 5, [0.5], 2)
    want = (dropout.hash_bits(5, 2 * n - 64, 64) >= dropout.threshold(0.5)).to(torch.bfloat16)
    assert torch.equal(out[1, -64:].cpu(), want)
    del out, x


def test_dropped_down_bf16_against_autograd():
    rs, copies, ps = [16, 16, 16], 3, [0.05]
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(512, 1024, device="cuda", generator=gen).bfloat16().requires_grad_()
    a = (torch.randn(48, 1024, device="cuda", generator=gen) / 32).bfloat16().requires_grad_()
    h = _DroppedDown.apply(x, a, 99, ps, rs, copies)
    keep = dropout.keep_mask(99, (copies, 512, 1024), ps, device="cuda").bfloat16()
    xr, ar = x.detach().clone().requires_grad_(), a.detach().clone().requires_grad_()
    want = torch.cat([(xr * keep[c]) @ ac.t() for c, ac in enumerate(ar.split(rs))], 1)
    assert torch.equal(h, want)
    g = torch.randn(h.shape, device="cuda", generator=gen).bfloat16()
    h.backward(g)
    want.backward(g)
    torch.testing.assert_close(a.grad, ar.grad)
    torch.testing.assert_close(x.grad, xr.grad, rtol=2e-2, atol=2e-2)  # float32 sum of three against bf16 adds
