"""Shared by the CUDA quantization tests (test_quant_cuda.py, test_quant_bnb_cuda.py): the device, dtypes, shapes at
every kernel boundary, a bitwise comparison that names the first difference, and adversarial random inputs."""

import math

import torch

from minqlora import ops, quant  # noqa: F401  (ops registers torch.ops.minqlora)
from minqlora.quant import QuantState

OPS = torch.ops.minqlora
DEV = torch.device("cuda")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCKSIZES = quant.BLOCKSIZES
# numels at every boundary the kernels have: a 16-byte chunk (4 or 8 elements), a block (32..4096), a CTA tile
# (4096 or 8192 elements) and odd n (the pad nibble)
SHAPES = [(1,), (2,), (3,), (7,), (9,), (31,), (33,), (63,), (65,), (127,), (4095,), (4097,), (8191,), (8193,),
          (3, 5, 7), (37, 129), (1000, 33), (2, 8199), (257, 1031)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


def assert_bitwise(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    a, b = a.cpu(), b.cpu()
    assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
    diff = _bits(a) != _bits(b)
    if diff.any():
        i = int(diff.reshape(-1).nonzero()[0])
        raise AssertionError(f"{what}: {int(diff.sum())} of {a.numel()} differ; first at {i}: "
                             f"{a.reshape(-1)[i].item()} vs {b.reshape(-1)[i].item()}")


def sample(shape, dtype, seed, zero_blocks=True):
    """Normal values with a random scale per run of 64 (1e-30 to 1e30; fp16 1e-6 to 1e3, so nothing overflows) and
    adversarial sprinkles: zeros, negative zeros, large negative values, an all-zero stretch and, for float32/bf16,
    a stretch whose absmax is denormal (1/absmax overflows, the division path)."""
    n = math.prod(shape)
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(n, generator=g, device=DEV)
    lo, hi = (-6, 3) if dtype == torch.float16 else (-30, 30)
    runs = -(-n // 64)
    scale = 10.0 ** (torch.rand(runs, generator=g, device=DEV) * (hi - lo) + lo)
    x = x * scale.repeat_interleave(64)[:n]
    x[::97] = 0.0
    x[5::101] = -0.0
    x[3::89] = -x[3::89].abs() * 4 if n > 3 else x[3::89]
    if zero_blocks and n > 300:
        x[130:300] = 0.0
    if dtype != torch.float16 and n > 700:
        x[512:576] = torch.randn(64, generator=g, device=DEV) * 5e-40
    return x.to(dtype).reshape(shape)


def dequant_args(state: QuantState):
    return (state.absmax, state.nested_absmax, state.nested_map, float(state.nested_offset), state.blocksize,
            state.nested_blocksize, state.quant_type, list(state.shape))
