"""Byte compatibility with bitsandbytes 0.50.2 (its CPU backend), installed by the test command as an oracle.

Known differences, from bnb-format.md and asserted as such: all-zero blocks (we write 0x77, bnb's CPU backend
also 0x77, its CUDA build 0x00); bnb's CPU double quantization uses a 65,536-bin lookup table and lands one step
off the exact nearest 8-bit code on rare values; bnb's CPU FP4 differs from its CUDA rules (which define FP4);
bnb's CPU dequantize is wrong when the last dimension is not a multiple of the blocksize on AVX512 machines, so
values are compared on shapes where it is right.
"""

import json

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import minqlora as mq
from minqlora import quant
from minqlora.quant import QuantState

from quant_strategies import float_tensors


def normal_block_mask(x, blocksize):
    """Blocks bitsandbytes' CPU path quantizes like its CUDA build: it stores the absmax of a partial last block
    clamped at 1e-38, so an all-zero or denormal tail block differs there (in the absmax only; it decodes the same)."""
    return quant._absmax(quant._blocks(x, blocksize)) >= 1e-38


@given(float_tensors(max_numel=30000))
def test_nf4_bytes_and_absmax_equal_bitsandbytes(case):
    x, bs = case
    if x.numel() < 2:
        return  # bnb reshapes 1-element tensors oddly; covered by our own tests
    packed, state = mq.quantize_4bit(x, bs, "nf4", double_quant=False)
    theirs, their_state = bnbF.quantize_4bit(x, blocksize=bs, quant_type="nf4", compress_statistics=False)
    normal = normal_block_mask(x, bs)
    assert torch.equal(state.absmax[normal], their_state.absmax[normal])
    keep = normal.repeat_interleave(bs)[: x.numel()]
    ours_c = quant.unpack_nibbles(packed, x.numel())
    their_c = quant.unpack_nibbles(theirs, x.numel())
    assert torch.equal(ours_c[keep], their_c[keep])
    zero = (state.absmax == 0).repeat_interleave(bs)[: x.numel()]
    assert torch.all(their_c[zero] == 7)  # all-zero blocks: the code of zero, like ours (bnb's CUDA build: 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("blocksize", [64, 128, 4096])
def test_dequantized_values_equal_bitsandbytes(dtype, blocksize):
    x = torch.randn(256, 4096, generator=torch.Generator().manual_seed(blocksize)).to(dtype)
    packed, state = mq.quantize_4bit(x, blocksize, "nf4", double_quant=False)
    theirs, their_state = bnbF.quantize_4bit(x, blocksize=blocksize, quant_type="nf4", compress_statistics=False)
    assert torch.equal(packed, theirs)
    assert torch.equal(mq.dequantize_4bit(packed, state), bnbF.dequantize_4bit(theirs, their_state))


def assert_lookup_table_differences(ours, theirs, absmax, max_fraction):
    """bnb's CPU double quantization looks codes up in 65,536 bins over [-1, 1], so a value within a bin of the
    midpoint between two map entries can land one step off the exact nearest code. Bound how many differ, check
    each is one step, and that each differing value sits within a bin (2/65536) of that midpoint.
    `absmax` is the plain float32 absmax vector that was double-quantized."""
    diff = ours != theirs
    assert int(diff.sum()) <= max(1, int(ours.numel() * max_fraction))
    assert torch.all((ours.int() - theirs.int())[diff].abs() == 1)
    y = quant._blocks(absmax - quant.absmax_offset(absmax), 256)
    s = quant._scale(y, quant._absmax(y)).reshape(-1)
    m = quant.DYNAMIC_SIGNED
    mid = (m[ours[diff].long()] + m[theirs[diff].long()]) / 2
    assert torch.all((s[: ours.numel()][diff] - mid).abs() <= 2 / 65536)
    return diff


def _exact_nested_codes(absmax, offset):
    codes, _ = quant.quantize_blockwise_8bit_ref(absmax - offset, quant.DYNAMIC_SIGNED, 256)
    return codes


@pytest.mark.parametrize("blocksize", [64, 128])
def test_double_quant_equals_bitsandbytes_up_to_its_lookup_table(blocksize):
    x = torch.randn(2048, 4096, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    packed, state = mq.quantize_4bit(x, blocksize, "nf4", double_quant=True)
    theirs, their_state = bnbF.quantize_4bit(x, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
    assert torch.equal(packed, theirs)
    assert state.nested_offset == float(their_state.offset)
    assert torch.equal(state.nested_absmax, their_state.state2.absmax)
    assert torch.equal(state.nested_map, their_state.state2.code)
    # bnb-format.md §3 saw 68 of 1,048,576 codes differ on one 8192x8192 weight; here about 0.16 % do
    # (209 of 131,072 at blocksize 64). Bound the rate at 0.5 %.
    plain = quant.quantize_4bit_ref(x, blocksize, "nf4")[1]
    diff = assert_lookup_table_differences(state.absmax, their_state.absmax, plain, 0.005)
    # where they differ, ours is the exact nearest code: the reference agrees with us
    assert torch.equal(state.absmax, _exact_nested_codes(plain, torch.tensor(state.nested_offset)))
    # decoded weights: equal wherever the nested code agrees
    ours_w = mq.dequantize_4bit(packed, state).reshape(-1, blocksize)
    their_w = bnbF.dequantize_4bit(theirs, their_state).reshape(-1, blocksize)
    assert torch.equal(ours_w[~diff], their_w[~diff])


@given(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), st.sampled_from([64, 128, 256]),
       st.booleans(), st.integers(1, 6), st.integers(1, 4))
def test_state_dict_equals_bitsandbytes_linear4bit(dtype, blocksize, nested, rows64, cols64):
    """to_bnb_dict equals the quantization-state part of bnb's Linear4bit.state_dict(): key for key (in order),
    dtype for dtype, byte for byte, JSON blob included; and from_bnb_dict reads theirs."""
    out_f, in_f = 64 * rows64, 64 * cols64
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(out_f * in_f)).to(dtype)
    lin = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=dtype, compress_statistics=nested,
                            quant_type="nf4", quant_storage=torch.uint8)
    lin.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", blocksize=blocksize,
                                   compress_statistics=nested)
    lin = lin.to("cpu")  # Params4bit quantizes on its first move
    theirs = lin.state_dict()

    packed, state = mq.quantize_4bit(w, blocksize, "nf4", double_quant=nested)
    ours = {"weight": packed, **state.to_bnb_dict("weight")}
    assert list(ours) == list(theirs)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype, k
        assert ours[k].shape == theirs[k].shape, k
        if k == "weight.absmax" and nested:  # bnb's CPU lookup-table double quantization, see above;
            plain = quant.quantize_4bit_ref(w, blocksize, "nf4")[1]
            assert_lookup_table_differences(ours[k], theirs[k], plain, 0.05)  # small tensors put more values near 0
        else:
            assert torch.equal(ours[k], theirs[k]), k
    blob = json.loads(bytes(theirs["weight.quant_state.bitsandbytes__nf4"].tolist()))
    assert blob["dtype"] == str(dtype).removeprefix("torch.")

    loaded = QuantState.from_bnb_dict(theirs, "weight")
    assert loaded.shape == w.shape and loaded.dtype == dtype and loaded.blocksize == blocksize
    # their bytes decode, through our kernel, to what the reference makes of them (bnb's own CPU dequantize is
    # not golden on these shapes, bnb-format.md §5)
    assert torch.equal(mq.dequantize_4bit(theirs["weight"], loaded), quant.dequantize_ref(theirs["weight"], loaded))
    if not nested:
        assert torch.equal(mq.dequantize_4bit(theirs["weight"], loaded), mq.dequantize_4bit(packed, state))


def test_fp4_codes_match_bitsandbytes_where_its_cpu_rules_agree():
    """bnb's CPU FP4 is not its CUDA FP4 (bnb-format.md §2): they agree on most values and the absmax always."""
    x = torch.randn(512, 1024, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    packed, state = mq.quantize_4bit(x, 64, "fp4", double_quant=False)
    theirs, their_state = bnbF.quantize_4bit(x, blocksize=64, quant_type="fp4", compress_statistics=False)
    assert torch.equal(state.absmax, their_state.absmax)
    agree = (quant.unpack_nibbles(packed, x.numel()) == quant.unpack_nibbles(theirs, x.numel())).float().mean()
    assert agree > 0.9


# -- malformed bitsandbytes dicts --------------------------------------------------------------------------------

def _good_dict():
    packed, state = mq.quantize_4bit(torch.randn(128, 256), 64, "nf4", double_quant=True)
    return {"w": packed, **state.to_bnb_dict("w")}


def test_from_bnb_dict_roundtrip():
    sd = _good_dict()
    state = QuantState.from_bnb_dict(sd, "w")
    assert state.shape == (128, 256) and state.nested
    assert state.to_bnb_dict("w").keys() == {k for k in sd if k != "w"}


@pytest.mark.parametrize("mutate,error,match", [
    (lambda sd: sd.pop("w.absmax"), KeyError, "missing key 'w.absmax'"),
    (lambda sd: sd.pop("w.nested_absmax"), KeyError, "missing key 'w.nested_absmax'"),
    (lambda sd: sd.pop("w.quant_state.bitsandbytes__nf4"), KeyError, "bitsandbytes__nf4"),
    (lambda sd: sd.__setitem__("w.quant_state.bitsandbytes__nf4", torch.tensor(list(b"{not json"), dtype=torch.uint8)),
     ValueError, "valid UTF-8 JSON"),
    (lambda sd: sd.__setitem__("w.quant_state.bitsandbytes__nf4", torch.tensor(list(b'{"quant_type": "nf4"}'),
                                                                              dtype=torch.uint8)),
     ValueError, "lacks the field 'blocksize'"),
    (lambda sd: sd.__setitem__("w.absmax", sd["w.absmax"][:-1]), ValueError, "w.absmax must be 512 values"),
    (lambda sd: sd.__setitem__("w.nested_absmax", torch.zeros(5)), ValueError, "nested_absmax must be 2"),
    (lambda sd: sd.__setitem__("w.quant_map", quant.FP4_TABLE.clone()), ValueError, "not the standard nf4 table"),
])
def test_from_bnb_dict_rejects_malformed(mutate, error, match):
    sd = _good_dict()
    mutate(sd)
    with pytest.raises(error, match=match):
        QuantState.from_bnb_dict(sd, "w")


def test_from_bnb_dict_rejects_bad_json_fields():
    sd = _good_dict()
    blob = json.loads(bytes(sd["w.quant_state.bitsandbytes__nf4"].tolist()))
    for field, value, match in [("shape", [128, -1], "invalid shape"), ("dtype", "int8", "unsupported dtype"),
                                ("blocksize", 48, "blocksize must be one of"),
                                ("quant_type", "fp4", "contradicts its key name")]:
        bad = dict(blob, **{field: value})
        sd["w.quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(bad).encode()), dtype=torch.uint8)
        with pytest.raises(ValueError, match=match):
            QuantState.from_bnb_dict(sd, "w")


# -- 8-bit blockwise: every blocksize bitsandbytes' CPU path takes ---------------------------------------------------

@pytest.mark.parametrize("blocksize", [16384, 8192, 4096, 256, 100, 48, 7, 1])
def test_8bit_blockwise_takes_every_blocksize_bitsandbytes_takes(blocksize):
    """bitsandbytes' quantize_blockwise / dequantize_blockwise take any positive blocksize on the CPU (its CUDA
    quantize takes 64..4096): so do ours. Codes: the exact nearest (the reference); bitsandbytes' CPU path looks
    them up in 65,536 bins over [-1, 1], so on rare values its code is up to one bin (2/65536) farther from the value
    than the nearest, several steps off near 0 where the map is denser than the bins. Absmax: identical."""
    x = torch.randn(40000, generator=torch.Generator().manual_seed(blocksize))
    codes, absmax = mq.quantize_blockwise_8bit(x, quant.DYNAMIC_SIGNED, blocksize)
    ref_codes, ref_absmax = quant.quantize_blockwise_8bit_ref(x, quant.DYNAMIC_SIGNED, blocksize)
    assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref_absmax)
    theirs, their_state = bnbF.quantize_blockwise(x, code=quant.DYNAMIC_SIGNED, blocksize=blocksize)
    assert torch.equal(absmax, their_state.absmax)
    theirs = theirs.view(-1)
    assert int((codes != theirs).sum()) <= x.numel() // 400  # 0.25 %; 71 of 40,000 seen at 16384
    blocks = quant._blocks(x, blocksize)
    s = quant._scale(blocks, quant._absmax(blocks)).reshape(-1)[: x.numel()]
    m = quant.DYNAMIC_SIGNED
    assert torch.all((m[theirs.long()] - s).abs() <= (m[codes.long()] - s).abs() + 2 / 65536)
    for dtype in (torch.float32, torch.bfloat16):
        ours = mq.dequantize_blockwise_8bit(codes, absmax, quant.DYNAMIC_SIGNED, blocksize, dtype)
        assert torch.equal(ours, quant.dequantize_blockwise_8bit_ref(codes, absmax, quant.DYNAMIC_SIGNED,
                                                                     blocksize, dtype))
        their_state.dtype = dtype
        assert torch.equal(ours, bnbF.dequantize_blockwise(codes, their_state))


@pytest.mark.parametrize("blocksize", [0, -64, 2.5, True])
def test_8bit_blockwise_refuses_non_positive_or_non_int_blocksizes(blocksize):
    with pytest.raises(ValueError, match="blocksize must be a positive int"):
        mq.quantize_blockwise_8bit(torch.randn(64), quant.DYNAMIC_SIGNED, blocksize)
    with pytest.raises(ValueError, match="blocksize must be a positive int"):
        mq.dequantize_blockwise_8bit(torch.zeros(64, dtype=torch.uint8), torch.ones(1), quant.DYNAMIC_SIGNED,
                                     blocksize)
