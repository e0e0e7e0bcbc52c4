"""Hypothesis strategies for quantization tests (imported by tests/test_quant*.py and tests/cuda)."""

import torch
from hypothesis import strategies as st

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


@st.composite
def float_tensors(draw, max_numel: int = 5000):
    """Random tensors that stress the quantizer: any shape (1-3 dims, odd sizes), a random scale from denormal to
    near the dtype's max, and sprinkled adversarial values (zeros, all-zero runs, denormals, exact copies of the
    block max, huge values). Returns (x, blocksize)."""
    dtype = draw(st.sampled_from(DTYPES))
    blocksize = draw(st.sampled_from(BLOCKSIZES))
    ndim = draw(st.integers(1, 3))
    shape = [draw(st.integers(1, 40)) for _ in range(ndim)]
    while torch.Size(shape).numel() > max_numel:
        shape[draw(st.integers(0, ndim - 1))] //= 2
        shape = [max(s, 1) for s in shape]
    n = torch.Size(shape).numel()
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    finfo = torch.finfo(dtype)
    log_scale = draw(st.sampled_from([0.0, -3.0, 3.0, -20.0, 20.0, "tiny", "huge"]))
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    if log_scale == "tiny":
        x = x * finfo.tiny * 4  # around the smallest normals: denormals appear after the cast
    elif log_scale == "huge":
        x = x / x.abs().max() * finfo.max * 0.999
    else:
        x = x * 10.0 ** min(log_scale, 4 if dtype == torch.float16 else log_scale)
    kind = draw(st.sampled_from(["plain", "zeros", "zero_block", "denormal", "ties", "heavy"]))
    if kind == "zeros":
        x[torch.rand(n, generator=gen) < 0.3] = 0
    elif kind == "zero_block":
        start = draw(st.integers(0, max(n - 1, 0)))
        x[start:start + blocksize] = 0
    elif kind == "denormal":
        x[torch.rand(n, generator=gen) < 0.2] = finfo.tiny / 8
    elif kind == "ties":
        x[torch.rand(n, generator=gen) < 0.3] = x.abs().max()
    elif kind == "heavy":
        x = x ** 3
    x = x.clamp(-finfo.max, finfo.max).to(dtype)
    return x.reshape(shape), blocksize
