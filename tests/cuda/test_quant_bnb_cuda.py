"""minqlora's CUDA quantization kernels against bitsandbytes 0.50.2's CUDA build (the oracle of the format):
4-bit bytes, absmax and decoded values for every blocksize, dtype and quant type, all-zero blocks, double
quantization.

Differences from bitsandbytes' CUDA build that are known and allowed, and nothing else. All come from its
approximate reciprocal (it builds with fast math; minqlora computes 1/absmax in IEEE arithmetic, as the reference):
- all-zero blocks: bitsandbytes writes 0x00 (code 0 times absmax 0 = -0.0), minqlora 0x77 (the reference's choice);
- NF4 from float32 input: about 1 value in 5 million one code away (bnb-format.md §2);
- FP4, any input: its thresholds are simple fractions (5/24, 7/24, 5/12, 5/6) that ratios of 16-bit values hit
  exactly, so the last-ulp error of that reciprocal shows up far more often: measured on H200, 2026-11-29, 0.002% to
  0.03% of values one code away (more for bf16 than fp16). FP4 therefore follows bitsandbytes' CUDA thresholds
  (bnb-format.md §2) but is not byte-identical to its CUDA build;
- double quantization: its 8-bit step (same reciprocal, ties to the upper code) put 1 of 262,144 absmax codes one
  step away (fp16, blocksize 64, 4096x4096).
Every allowed difference is one code step, at a value within a few float32 ulps of the threshold between the two
codes; the tests check that, so any other disagreement fails.
"""

import bitsandbytes.functional as bnbf
import pytest
import torch

import minqlora as mq
from minqlora import quant
from minqlora.quant import QuantState
from quant_helpers import BLOCKSIZES, DEV, DTYPES, OPS, assert_bitwise


def _one_step_apart(ours: torch.Tensor, theirs: torch.Tensor, table: torch.Tensor) -> bool:
    """Each differing code decodes to a value adjacent to the other's in the sorted table."""
    values = torch.unique(table)  # sorted; 0 and -0 are one value
    rank_o = torch.searchsorted(values, table[ours.long()])
    rank_t = torch.searchsorted(values, table[theirs.long()])
    return bool(((rank_o - rank_t).abs() <= 1).all())


def _within_ulps(s: torch.Tensor, points: torch.Tensor, ulps: int = 4) -> bool:
    """Every s lies within `ulps` float32 ulps (relative) of one of the points."""
    d = (s[:, None] - points.to(s.device)[None, :]).abs().min(dim=1).values
    return bool((d <= ulps * 2.0**-23 * s.abs().clamp_min(2.0**-10)).all())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_4bit_bytes_equal_bitsandbytes_cuda(blocksize, dtype, quant_type):
    n = 4096 * 4096 if blocksize in (64, 4096) else 1 << 22
    x = torch.randn(n, generator=torch.Generator(device=DEV).manual_seed(blocksize), device=DEV).to(dtype)
    p, a = OPS.quantize_4bit(x, blocksize, quant_type)
    p_b, qs = bnbf.quantize_4bit(x, blocksize=blocksize, compress_statistics=False, quant_type=quant_type)
    assert_bitwise(a, qs.absmax, "absmax vs bitsandbytes")
    ours, theirs = quant.unpack_nibbles(p, n), quant.unpack_nibbles(p_b, n)
    diff = (ours != theirs).nonzero().view(-1)
    allowed = 0 if (quant_type == "nf4" and dtype != torch.float32) else (
        n // 1_000_000 + 4 if quant_type == "nf4" else n // 1000)
    what = f"{dtype} bs={blocksize} {quant_type}"
    assert diff.numel() <= allowed, f"{diff.numel()} codes differ from bitsandbytes ({what}); allowed {allowed}"
    if diff.numel():
        assert _one_step_apart(ours[diff], theirs[diff], quant.code_table(quant_type).to(DEV)), what
        s = x.float()[diff] * torch.reciprocal(a[diff // blocksize])  # the reference's scaled values
        if quant_type == "nf4":
            assert _within_ulps(s, quant.NF4_THRESHOLDS), f"a difference away from any threshold ({what})"
        else:
            assert _within_ulps(s.abs(), quant.FP4_THRESHOLDS), f"a difference away from any threshold ({what})"
    # decoding the same bytes gives the same values
    y = OPS.dequantize_4bit(p_b, qs.absmax, None, None, 0.0, blocksize, 256, quant_type, [n], dtype)
    assert_bitwise(y, bnbf.dequantize_4bit(p_b, qs), f"dequantized vs bitsandbytes, {what}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_zero_blocks_are_the_one_difference_from_bitsandbytes(dtype):
    x = torch.randn(64 * 100, device=DEV).to(dtype)
    zero = [3, 4, 50, 99]
    x.view(100, 64)[zero] = 0
    p, a = OPS.quantize_4bit(x, 64, "nf4")
    p_b, qs = bnbf.quantize_4bit(x, blocksize=64, compress_statistics=False, quant_type="nf4")
    assert_bitwise(a, qs.absmax, "absmax")
    rows, rows_b = p.view(100, 32), p_b.view(100, 32)
    assert bool((rows[zero] == 0x77).all()) and bool((rows_b[zero] == 0x00).all())
    keep = [i for i in range(100) if i not in zero]
    if dtype != torch.float32:
        assert_bitwise(rows[keep], rows_b[keep], "non-zero blocks")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [64, 128, 4096])
def test_double_quant_equals_bitsandbytes_cuda(dtype, blocksize):
    x = torch.randn(4096, 4096, generator=torch.Generator(device=DEV).manual_seed(5), device=DEV).to(dtype)
    p, state = mq.quantize_4bit(x, blocksize, "nf4", double_quant=True)
    p_b, qs = bnbf.quantize_4bit(x, blocksize=blocksize, compress_statistics=True, quant_type="nf4")
    assert state.nested_offset == float(qs.offset)
    assert_bitwise(state.nested_absmax, qs.state2.absmax, "nested absmax")
    assert_bitwise(state.nested_map, qs.state2.code, "nested map")
    # the 8-bit codes: rare one-step differences, only where the value sits on a midpoint of the map
    diff = (state.absmax != qs.absmax).nonzero().view(-1)
    assert diff.numel() <= state.absmax.numel() // 100_000 + 2, f"{diff.numel()} nested codes differ"
    if diff.numel():
        _, a = OPS.quantize_4bit(x, blocksize, "nf4")
        y = a - torch.tensor(state.nested_offset, device=DEV)
        s2 = y[diff] * torch.reciprocal(state.nested_absmax[diff // 256])
        m = state.nested_map
        c_o, c_b = state.absmax[diff].long(), qs.absmax[diff].long()
        assert bool(((c_o - c_b).abs() == 1).all()), "nested codes more than one step apart"
        mids = (m[c_o] + m[c_b]) * 0.5
        assert bool(((s2 - mids).abs() <= 4 * 2.0**-23 * mids.abs()).all()), "a nested difference off a midpoint"
    if dtype != torch.float32:
        assert_bitwise(p, p_b, "packed")
    # the double-quantized scales decoded inside our kernel equal bitsandbytes' three-step decode, bit for bit
    theirs = QuantState(absmax=qs.absmax, shape=x.shape, dtype=dtype, blocksize=blocksize, quant_type="nf4",
                        nested_absmax=qs.state2.absmax, nested_map=qs.state2.code, nested_offset=float(qs.offset))
    assert_bitwise(mq.dequantize_4bit(p_b, theirs), bnbf.dequantize_4bit(p_b, qs), "dequantized")
