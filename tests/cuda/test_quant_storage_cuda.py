"""quant_storage on the GPU: the packed bytes viewed as float16/bfloat16/float32 are the uint8 bytes of the same
quantization (and bitsandbytes' CUDA bytes in its storage, up to the all-zero-block and fp32-reciprocal differences
test_quant_bnb_cuda.py allows, which these inputs avoid), and a Linear4bit holding a float view computes exactly what
the uint8 one does, forward and backward, through the fused kernels."""

import bitsandbytes.functional as bnbf
import pytest
import torch

import minqlora as mq
from minqlora.linear4bit import Linear4bit
from quant_helpers import DEV

STORAGES = [torch.float16, torch.bfloat16, torch.float32]


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


@pytest.mark.parametrize("storage", STORAGES, ids=str)
@pytest.mark.parametrize("double_quant", [False, True])
def test_cuda_bytes_in_float_storage(storage, double_quant):
    x = torch.randn(512, 1024, device=DEV, generator=torch.Generator(DEV).manual_seed(3)).to(torch.bfloat16)
    packed, state = mq.quantize_4bit(x, 64, "nf4", double_quant, quant_storage=storage)
    plain, _ = mq.quantize_4bit(x, 64, "nf4", double_quant)
    assert packed.dtype == storage and packed.shape == (x.numel() // (2 * storage.itemsize), 1)
    assert torch.equal(as_bytes(packed), plain.view(-1))
    theirs, _ = bnbf.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=double_quant,
                                   quant_storage=storage)
    assert theirs.dtype == storage and torch.equal(as_bytes(packed), as_bytes(theirs))
    assert torch.equal(mq.dequantize_4bit(packed, state), mq.dequantize_4bit(plain, state))


@pytest.mark.parametrize("storage", STORAGES, ids=str)
@pytest.mark.parametrize("rows", [1, 7, 512])  # the fused few-row kernel and the many-row path
def test_cuda_linear4bit_float_storage_matches_uint8(storage, rows):
    torch.manual_seed(0)
    base = torch.nn.Linear(1024, 768, bias=False, device=DEV, dtype=torch.bfloat16)
    plain = Linear4bit.from_linear(base, compute_dtype=torch.bfloat16)
    held = Linear4bit.from_linear(base, compute_dtype=torch.bfloat16, quant_storage=storage)
    assert held.weight.dtype == storage and held.weight.is_cuda
    x = torch.randn(rows, 1024, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    y = held(x)
    assert torch.equal(y, plain(x))
    (g,) = torch.autograd.grad(y.float().square().sum(), x)
    x2 = x.detach().requires_grad_()
    (g2,) = torch.autograd.grad(plain(x2).float().square().sum(), x2)
    assert torch.equal(g, g2)
