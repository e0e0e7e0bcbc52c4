"""Properties of the specification (quant.py) and of the C++ CPU kernels, which must give identical bytes.

What is stated and tested: nearest codes under the strict-midpoint rule (ties to the lower code), the error bound
absmax · (half the widest table gap), the absmax reproduced exactly, the double-quantization bound, idempotence,
and byte equality of kernels and reference on adversarial inputs.
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import minqlora as mq
from minqlora import ops, quant

from quant_strategies import float_tensors


def blocks_of(x, blocksize):
    return quant._blocks(x, blocksize)


def scaled(x, blocksize):
    b = blocks_of(x, blocksize)
    return quant._scale(b, quant._absmax(b)).reshape(-1)[: x.numel()]


def codes_of(packed, n):
    return quant.unpack_nibbles(packed, n).long()


# -- the tables -------------------------------------------------------------------------------------------------

def test_nf4_table_matches_the_normal_quantile_construction():
    derived = quant.nf4_from_normal_quantiles()
    assert (derived - quant.NF4_TABLE).abs().max() < 2e-7
    assert quant.NF4_TABLE[7] == 0 and quant.NF4_TABLE[0] == -1 and quant.NF4_TABLE[15] == 1


def test_thresholds_are_the_documented_float32_midpoints():
    documented = [-0.84809637, -0.61063290, -0.45999527, -0.33967942, -0.23460740, -0.13791174, -0.045525018,
                  0.039790150, 0.12025525, 0.20352125, 0.29201376, 0.38931254, 0.50166345, 0.64278692, 0.86147845]
    assert torch.allclose(quant.NF4_THRESHOLDS, torch.tensor(documented), atol=1e-8, rtol=0)


def test_dynamic_maps_shape_and_known_entries():
    s, u = quant.DYNAMIC_SIGNED, quant.DYNAMIC_UNSIGNED
    assert s.numel() == u.numel() == 256
    assert torch.all(s[1:] > s[:-1]) and torch.all(u[1:] > u[:-1])
    assert s[127] == 0 and s[255] == 1 and abs(float(s[0]) + 0.99296874) < 1e-7
    assert u[0] == 0 and u[255] == 1


def test_dynamic_signed_map_follows_its_recipe():
    """The recipe of bnb-format.md §3, regenerated in float32, lands within 1e-6 of the stored constants."""
    values = [0.0, 1.0]
    for i in range(7):
        b = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        mids = ((b[:-1] + b[1:]) / 2 * 10.0 ** (i - 6)).tolist()
        values += mids + [-m for m in mids]
    regen = torch.tensor(sorted(values), dtype=torch.float32)
    assert regen.numel() == 256
    assert (regen - quant.DYNAMIC_SIGNED).abs().max() < 1e-6


# -- codes: nearest value, ties to the lower code ----------------------------------------------------------------

@given(float_tensors())
def test_nf4_codes_are_nearest_with_ties_to_lower(case):
    x, bs = case
    packed, absmax = quant.quantize_4bit_ref(x, bs, "nf4")
    s = scaled(x, bs)
    c = codes_of(packed, x.numel())
    t = quant.NF4_THRESHOLDS
    # the strict-greater rule, checked directly: t[c-1] < s <= t[c]
    assert torch.all((c == 0) | (s > t[(c - 1).clamp(min=0)]))
    assert torch.all((c == 15) | (s <= t[c.clamp(max=14)]))
    # and it is the nearest table value (float64 distances; a tie within float32 rounding may go either way)
    d = (s.double()[:, None] - quant.NF4_TABLE.double()[None, :]).abs()
    assert torch.all(d.gather(1, c[:, None]).squeeze(1) <= d.min(1).values + 1e-7)


@given(float_tensors())
def test_fp4_codes_follow_the_cuda_thresholds(case):
    x, bs = case
    packed, _ = quant.quantize_4bit_ref(x, bs, "fp4")
    s = scaled(x, bs)
    c = codes_of(packed, x.numel())
    assert torch.equal((c >> 3).bool(), s < 0)
    rank = (s.abs()[:, None] > quant.FP4_THRESHOLDS[None, :]).sum(1)
    assert torch.equal(c & 7, quant.FP4_RANK_TO_BITS[rank].long())


@pytest.mark.parametrize("quant_type,thresholds", [("nf4", quant.NF4_THRESHOLDS), ("fp4", quant.FP4_THRESHOLDS)])
def test_exact_midpoints_take_the_lower_code(quant_type, thresholds):
    # A block with max 1.0 scales by exactly 1, so each element sits exactly on a threshold.
    x = torch.cat([torch.tensor([1.0]), thresholds, torch.zeros(64 - 1 - thresholds.numel())])
    packed, _ = mq.quantize_4bit(x, 64, quant_type, double_quant=False)
    c = codes_of(packed, 64)[1: 1 + thresholds.numel()]
    if quant_type == "nf4":
        assert c.tolist() == list(range(15))
    else:
        assert (c & 7).tolist() == quant.FP4_RANK_TO_BITS[:7].tolist()
    ref, _ = quant.quantize_4bit_ref(x, 64, quant_type)
    assert torch.equal(packed, ref)


# -- error bounds, absmax, double quantization, idempotence -------------------------------------------------------

@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@given(case=float_tensors())
def test_error_bound_and_exact_absmax(quant_type, case):
    x, bs = case
    packed, absmax = quant.quantize_4bit_ref(x, bs, quant_type)
    blocks = blocks_of(x, bs)
    assert torch.equal(absmax, blocks.abs().amax(1))  # reproduced exactly, unrounded float32
    y = quant.dequantize_4bit_ref(packed, absmax, bs, quant_type, x.shape, torch.float32)
    a = absmax.repeat_interleave(bs)[: x.numel()].double()
    err = (x.double().reshape(-1) - y.double().reshape(-1)).abs()
    # table gap bound, plus float32 rounding of s and of the product (relative 2^-23 each, on absmax)
    bound = a * (quant.max_error_bound(quant_type) + 2**-21)
    assert torch.all(err <= bound)


@given(float_tensors(max_numel=20000))
def test_double_quant_error_on_absmax_is_bounded(case):
    x, bs = case
    _, plain = quant.quantize_4bit_ref(x, bs, "nf4")
    _, state = quant.quantize_ref(x, bs, "nf4", double_quant=True)
    decoded = quant.decode_absmax_ref(state).double()
    # per 256-block: |error| <= absmax2 * (half the widest gap of the signed map) + float32 rounding
    gap = float((quant.DYNAMIC_SIGNED[1:] - quant.DYNAMIC_SIGNED[:-1]).max()) / 2
    a2 = state.nested_absmax.double().repeat_interleave(256)[: plain.numel()]
    scale = plain.double().abs().max()
    assert torch.all((decoded - plain.double()).abs() <= a2 * gap + scale * 2**-22)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@given(case=float_tensors())
def test_quantize_is_idempotent(quant_type, out_dtype, case):
    x, bs = case
    finfo = torch.finfo(x.dtype)
    x = x.clamp(-finfo.max / 2, finfo.max / 2)  # keep decoded values inside the re-quantized dtype
    packed, absmax = quant.quantize_4bit_ref(x, bs, quant_type)
    y = quant.dequantize_4bit_ref(packed, absmax, bs, quant_type, x.shape, out_dtype)
    packed2, _ = quant.quantize_4bit_ref(y, bs, quant_type)
    # non-degenerate blocks only: a block whose absmax is tiny enough to flush in `out_dtype` decodes to zeros
    ok = (absmax > torch.finfo(out_dtype).tiny * 64).repeat_interleave(bs)[: x.numel()]
    c1, c2 = codes_of(packed, x.numel()), codes_of(packed2, x.numel())
    if quant_type == "fp4":  # FP4 has two zeros: code 8 (-0) decodes to -0.0, which re-encodes as +0 (code 0)
        c1, c2 = c1.masked_fill(c1 == 8, 0), c2.masked_fill(c2 == 8, 0)
    assert torch.equal(c1[ok], c2[ok])


def test_all_zero_blocks_and_odd_length():
    x = torch.zeros(65, dtype=torch.bfloat16)
    x[64] = 3.0
    packed, state = mq.quantize_4bit(x, 64, "nf4", double_quant=False)
    assert packed.shape == (33, 1) and state.absmax.tolist() == [0.0, 3.0]
    assert torch.all(packed[:32] == 0x77)           # zero block: the code of 0 everywhere
    assert int(packed[32]) == 0xF7                  # 3.0 -> code 15, pad nibble = code of zero
    assert torch.equal(mq.dequantize_4bit(packed, state), x)
    packed, _ = mq.quantize_4bit(torch.zeros(3), 64, "fp4", double_quant=False)
    assert packed.flatten().tolist() == [0, 0]


def test_storage_cost_matches_the_paper():
    """QLoRA §3: 4 + 32/64 = 4.5 bits/param plain, 4 + 8/64 + 32/(64·256) ≈ 4.127 with double quantization."""
    x = torch.randn(4096, 4096)
    packed, plain = mq.quantize_4bit(x, 64, double_quant=False)
    _, dq = mq.quantize_4bit(x, 64, double_quant=True)
    n = x.numel()
    bits_plain = 8 * (packed.numel() + 4 * plain.absmax.numel()) / n
    bits_dq = 8 * (packed.numel() + dq.absmax.numel() + 4 * dq.nested_absmax.numel()) / n
    assert bits_plain == 4.5
    assert math.isclose(bits_dq, 4.127, abs_tol=5e-4)


# -- C++ CPU kernels: bytes identical to the reference -----------------------------------------------------------

@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@given(case=float_tensors(max_numel=20000))
def test_cpu_kernels_equal_reference(quant_type, case):
    x, bs = case
    packed, absmax = ops.quantize_4bit_raw(x, bs, quant_type)
    ref_packed, ref_absmax = quant.quantize_4bit_ref(x, bs, quant_type)
    assert torch.equal(packed, ref_packed)
    assert torch.equal(absmax, ref_absmax)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        state = quant.QuantState(absmax, x.shape, dtype, bs, quant_type)
        got = mq.dequantize_4bit(packed, state)
        want = quant.dequantize_4bit_ref(packed, absmax, bs, quant_type, x.shape, dtype)
        assert torch.equal(got, want)


@given(float_tensors(max_numel=60000))
def test_cpu_double_quant_equals_reference(case):
    x, bs = case
    packed, state = mq.quantize_4bit(x, bs, "nf4", double_quant=True)
    ref_packed, ref_state = quant.quantize_ref(x, bs, "nf4", double_quant=True)
    assert torch.equal(packed, ref_packed)
    assert torch.equal(state.absmax, ref_state.absmax)
    assert torch.equal(state.nested_absmax, ref_state.nested_absmax)
    assert state.nested_offset == ref_state.nested_offset
    assert torch.equal(mq.dequantize_4bit(packed, state), quant.dequantize_ref(ref_packed, ref_state))


@pytest.mark.parametrize("code_map", [quant.DYNAMIC_SIGNED, quant.DYNAMIC_UNSIGNED], ids=["signed", "unsigned"])
@given(case=float_tensors(max_numel=20000))
def test_cpu_8bit_equals_reference(code_map, case):
    x, bs = case
    if code_map is quant.DYNAMIC_UNSIGNED:
        x = x.abs()
    codes, absmax = mq.quantize_blockwise_8bit(x, code_map, bs)
    ref_codes, ref_absmax = quant.quantize_blockwise_8bit_ref(x, code_map, bs)
    assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref_absmax)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(mq.dequantize_blockwise_8bit(codes, absmax, code_map, bs, dtype),
                           quant.dequantize_blockwise_8bit_ref(codes, absmax, code_map, bs, dtype))


@given(st.integers(1, 3000), st.integers(0, 2**31 - 1))
def test_8bit_codes_are_nearest(n, seed):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    codes, absmax = mq.quantize_blockwise_8bit(x, quant.DYNAMIC_SIGNED, 256)
    s = scaled(x, 256).double()
    d = (s[:, None] - quant.DYNAMIC_SIGNED.double()[None, :]).abs()
    assert torch.all(d.gather(1, codes.long()[:, None]).squeeze(1) <= d.min(1).values + 1e-7)
