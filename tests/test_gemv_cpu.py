"""The CPU few-row gemm_4bit (csrc/cpu/gemv.cpp: up to 8 rows of x, the weight decoded a block at a time, never
written out) against the reference F.linear(x, quant.dequantize_ref(...).to(x.dtype)): every dtype, NF4 / FP4,
plain and double-quantized absmax, every blocksize, odd N, tiles, strided x, zero rows, and the switch to
dequantize + matmul past 8 rows. scripts/test.sh runs this file again with MINQLORA_DISABLE_AVX2=1 (the portable
loop)."""

import pytest
import torch
import torch.nn.functional as F

import minqlora as mq
from minqlora import layout, ops

OPS = torch.ops.minqlora
ULP = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}  # half an ulp, relative


def make(n, k, blocksize, quant_type="nf4", double_quant=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * (0.5 + torch.rand(n, 1, generator=g))
    w[:, ::17] *= 4  # outliers: absmax varies across blocks
    return mq.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)


def check(got, x, packed, state):
    """got within float32 summation error plus one rounding to x's dtype of the exact product of x and the reference
    weight in x's dtype (what F.linear on the dequantized weight multiplies)."""
    w = mq.dequantize_4bit(packed, state, x.dtype).double()
    x64 = x.double().reshape(-1, x.shape[-1])
    exact = (x64 @ w.t()).reshape(*x.shape[:-1], w.shape[0])
    mag = (x64.abs() @ w.abs().t()).reshape(exact.shape)
    bound = mag * (x.shape[-1] * 2.0 ** -23) + exact.abs() * 2 * ULP[x.dtype] + 1e-30
    assert got.shape == exact.shape and got.dtype == x.dtype
    err = (got.double() - exact).abs()
    assert bool((err <= bound).all()), f"max err / bound {(err / bound).max().item():.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_few_rows_match_the_reference(dtype, quant_type, double_quant):
    packed, state = make(37, 192, 64, quant_type, double_quant, seed=1)  # odd N, K = 3 blocks
    for m in range(0, 10):  # 9: past the fused loop, dequantize + matmul
        x = torch.randn(m, 192, generator=torch.Generator().manual_seed(m)).to(dtype)
        y = mq.gemm_4bit(x, packed, state)
        check(y, x, packed, state)
        assert torch.equal(mq.gemm_4bit(x, packed, state), y)  # deterministic


@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 1024, 4096])
def test_blocksizes(blocksize):
    k = 2 * blocksize if blocksize < 4096 else 4096
    packed, state = make(33, k, blocksize, seed=blocksize)
    for m in (1, 3, 8):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        check(mq.gemm_4bit(x, packed, state), x, packed, state)


def test_agrees_with_dequantize_and_matmul():
    """Against the composite path it replaces at few rows (F.linear on the dequantized weight): float32 rounding of
    sums of 576 terms of magnitude ~1 (2^-24 · 576 · ~1 ≈ 3e-5 where the result cancels to near zero)."""
    packed, state = make(300, 576, 64, seed=3)
    for m in (1, 2, 8):
        x = torch.randn(m, 576, generator=torch.Generator().manual_seed(m))
        torch.testing.assert_close(mq.gemm_4bit(x, packed, state), F.linear(x, mq.dequantize_4bit(packed, state)),
                                   rtol=1e-5, atol=1e-4)


def test_shapes_layouts_and_groups():
    packed, state = make(48, 256, 64, seed=4)
    x = torch.randn(2, 1, 256)  # (batch, 1, K): decode's shape
    y = mq.gemm_4bit(x, packed, state)
    assert y.shape == (2, 1, 48)
    check(y, x, packed, state)
    strided = torch.randn(3, 512)[:, ::2]  # not contiguous
    check(mq.gemm_4bit(strided, packed, state), strided, packed, state)
    tiles = layout.to_tiles(packed, state.shape)  # the decode layout reads as rows here too
    assert torch.equal(mq.gemm_4bit(x, tiles, state), y)
    other, other_state = make(16, 256, 64, seed=5)
    for a, b in zip(ops.gemm_4bit_group(x, [(packed, state), (other, other_state)]),
                    (y, mq.gemm_4bit(x, other, other_state))):
        assert torch.equal(a, b)
    empty = mq.gemm_4bit(torch.randn(0, 256), packed, state)
    assert empty.shape == (0, 48)


def test_opcheck_and_gradient_at_one_row():
    packed, state = make(48, 64, 64, seed=6)
    x = torch.randn(1, 64, requires_grad=True)
    torch.library.opcheck(OPS.gemm_4bit, (x, packed, *ops._state_args(state)))
    y = mq.gemm_4bit(x, packed, state)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ mq.dequantize_4bit(packed, state))
