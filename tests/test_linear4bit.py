"""Linear4bit: forward and backward against F.linear on the dequantized weight, bitsandbytes' state dict key for
key and byte for byte (both ways), dtype handling and load errors.

Covers small CPU shapes (even and odd out·in), NF4/FP4, with and without double quantization, fp32/fp16/bf16
weights and compute dtypes. Leaves out kernel accuracy (test_ops.py, test_quant.py) and CUDA (tests/cuda).
"""

import bitsandbytes as bnb
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import minqlora as mq
from minqlora import quant
from minqlora.linear4bit import Linear4bit

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (out, in): 5·27 = 135 values is odd (a padded last nibble) with a partial last block; 7·9 = 63 is one block.
SHAPES = [(48, 64), (5, 27), (7, 9)]


def make_linear(out_f, in_f, dtype=torch.float32, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias).to(dtype)


def bnb_linear(lin, quant_type, double_quant):
    """bitsandbytes' Linear4bit holding lin's weight: built in the weight's dtype so its JSON records that dtype;
    Params4bit quantizes on .to(device)."""
    m = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                          compute_dtype=lin.weight.dtype, quant_type=quant_type,
                          compress_statistics=double_quant).to(lin.weight.dtype)
    m.load_state_dict(lin.state_dict())
    return m.to("cpu")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_equals_linear_on_dequantized_weight(dtype, shape, bias):
    lin = make_linear(*shape, dtype=dtype, bias=bias)
    q = Linear4bit.from_linear(lin, compute_dtype=dtype)
    w = q.dequantize()
    assert w.dtype == dtype and w.shape == lin.weight.shape
    packed, state = mq.quantize_4bit(lin.weight.detach())
    assert torch.equal(w, mq.dequantize_4bit(packed, state))
    x = torch.randn(3, 5, shape[1]).to(dtype)
    want = F.linear(x.float(), w.float(), None if lin.bias is None else lin.bias.float())
    got = q(x)
    assert got.dtype == dtype and got.shape == (3, 5, shape[0])
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("compute_dtype", DTYPES)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_compute_dtypes(compute_dtype, x_dtype):
    lin = make_linear(48, 64, dtype=torch.bfloat16)
    q = Linear4bit.from_linear(lin, compute_dtype=compute_dtype)
    x = torch.randn(4, 64).to(x_dtype)
    y = q(x)
    assert y.dtype == x_dtype  # the output comes back in the input's dtype
    # The matmul runs in compute_dtype on the weight decoded to compute_dtype.
    want = F.linear(x.to(compute_dtype), q.dequantize(compute_dtype), lin.bias.to(compute_dtype)).float()
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[compute_dtype]
    torch.testing.assert_close(y.float(), want, rtol=tol, atol=max(tol, 8e-3 if x_dtype == torch.bfloat16 else 0))


def test_bad_compute_dtype():
    with pytest.raises(ValueError, match="compute_dtype"):
        Linear4bit(8, 8, compute_dtype=torch.int8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_grad_input_only(dtype):
    lin = make_linear(48, 64, dtype=dtype)
    q = Linear4bit.from_linear(lin, compute_dtype=dtype)
    x = torch.randn(2, 3, 64, dtype=dtype, requires_grad=True)
    y = q(x)
    g = torch.randn_like(y)
    y.backward(g)
    want = (g.float() @ q.dequantize(torch.float32)).to(dtype)  # grad_x = grad_y · W_dq, (2, 3, 64)
    tol = 1e-5 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(x.grad.float(), want.float(), rtol=tol, atol=tol)
    assert not any(p.requires_grad for p in q.parameters())
    assert all(b.grad is None and not b.requires_grad for b in q.buffers())
    assert q.bias.grad is None


def test_from_linear_leaves_original_untouched():
    lin = make_linear(48, 64)
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    Linear4bit.from_linear(lin)
    assert all(torch.equal(before[k], v) for k, v in lin.state_dict().items())
    assert lin.weight.requires_grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_state_dict_equals_bitsandbytes_nf4(dtype, shape, double_quant, bias):
    lin = make_linear(*shape, dtype=dtype, bias=bias)
    theirs = bnb_linear(lin, "nf4", double_quant).state_dict()
    ours = Linear4bit.from_linear(lin, quant_type="nf4", double_quant=double_quant, compute_dtype=dtype).state_dict()
    assert list(ours) == list(theirs)  # same keys in the same order
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype, k
        assert ours[k].shape == theirs[k].shape, k
        if k == "weight.absmax" and double_quant and ours[k].numel() == 1:
            # One block: absmax - offset = 0 is an all-zero 8-bit block. minqlora codes it as the map's exact 0
            # (code 127), bnb's CPU backend as code 0 (0/0 scaling); both decode to the offset exactly.
            continue
        assert torch.equal(ours[k], theirs[k]), k  # NF4 on the CPU: bnb's bytes are the exact-arithmetic bytes
    theirs_w = bnb.functional.dequantize_4bit(theirs["weight"], bnb.functional.QuantState.from_dict(
        {k.removeprefix("weight."): v for k, v in theirs.items() if k.startswith("weight.")}, device="cpu"))
    assert torch.equal(Linear4bit.from_linear(lin, double_quant=double_quant).dequantize(), theirs_w.view(shape))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [True, False])
def test_state_dict_equals_bitsandbytes_fp4(dtype, double_quant):
    """FP4: keys, dtypes, shapes, absmax and JSON equal. The codes follow bitsandbytes' CUDA rules (bnb-format.md §2,
    the reference quantize_4bit_ref); bnb's CPU backend rounds a few values (here <5 %) to a neighbouring code."""
    lin = make_linear(48, 64, dtype=dtype)
    theirs = bnb_linear(lin, "fp4", double_quant).state_dict()
    ours = Linear4bit.from_linear(lin, quant_type="fp4", double_quant=double_quant, compute_dtype=dtype).state_dict()
    assert list(ours) == list(theirs)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape, k
        if k != "weight":
            assert torch.equal(ours[k], theirs[k]), k
    assert torch.equal(ours["weight"], quant.quantize_4bit_ref(lin.weight.detach(), 64, "fp4")[0])
    n = lin.weight.numel()
    a, b = quant.unpack_nibbles(ours["weight"], n).long(), quant.unpack_nibbles(theirs["weight"], n).long()
    assert (a != b).float().mean() < 0.05
    gap = (quant.FP4_TABLE[a] - quant.FP4_TABLE[b]).abs()  # in units of absmax
    assert gap.max() <= 2 * quant.max_error_bound("fp4") + 1e-6


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_load_bitsandbytes_state_dict(quant_type, double_quant, dtype):
    lin = make_linear(7, 9, dtype=dtype)
    ref = bnb_linear(lin, quant_type, double_quant)
    sd = ref.state_dict()
    ours = Linear4bit(9, 7, quant_type=quant_type, double_quant=double_quant, compute_dtype=dtype, weight_dtype=dtype)
    ours.load_state_dict(sd, strict=True)
    back = ours.state_dict()
    assert list(back) == list(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype and torch.equal(back[k], sd[k]), k
    assert ours.weight_dtype == dtype and ours.quant_type == quant_type
    # And it computes what bitsandbytes computes with those bytes.
    x = torch.randn(5, 9, dtype=dtype)
    with torch.no_grad():
        tol = 1e-5 if dtype == torch.float32 else 1.6e-2
        torch.testing.assert_close(ours(x).float(), ref(x).float(), rtol=tol, atol=tol)


def test_state_dict_through_safetensors(tmp_path):
    q = Linear4bit.from_linear(make_linear(48, 64, dtype=torch.bfloat16))
    save_file(q.state_dict(), tmp_path / "w.safetensors")
    q2 = Linear4bit(64, 48)
    q2.load_state_dict(load_file(tmp_path / "w.safetensors"))
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert torch.equal(q(x), q2(x))


def test_cast_does_not_touch_quant_buffers():
    q = Linear4bit.from_linear(make_linear(48, 64, dtype=torch.bfloat16))
    before = {k: v.clone() for k, v in q.named_buffers()}
    w = q.dequantize()
    for cast in (lambda m: m.to(torch.float16), lambda m: m.half(), lambda m: m.float(), lambda m: m.to("cpu"),
                 lambda m: m.double()):
        cast(q)
        for k, v in q.named_buffers():
            assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
        assert q.weight_dtype == torch.bfloat16 and torch.equal(q.dequantize(), w)


def test_meta_then_to_empty_keeps_dtypes():
    q = Linear4bit(64, 48, device="meta")
    q.to_empty(device="cpu")
    assert q.weight.dtype == torch.uint8 and q.weight_absmax.dtype == torch.uint8
    assert q.weight_nested_absmax.dtype == torch.float32


def _sd():
    return Linear4bit.from_linear(make_linear(48, 64, dtype=torch.bfloat16)).state_dict()


@pytest.mark.parametrize("key", ["weight.absmax", "weight.quant_map", "weight.nested_absmax",
                                 "weight.nested_quant_map"])
def test_load_missing_state_key(key):
    sd = _sd()
    del sd[key]
    with pytest.raises(RuntimeError, match=key.replace(".", r"\.")):
        Linear4bit(64, 48).load_state_dict(sd)


def test_load_missing_weight_and_bias():
    sd = _sd()
    del sd["weight"]
    with pytest.raises(RuntimeError, match="Missing key.*weight"):
        Linear4bit(64, 48).load_state_dict(sd)
    sd = _sd()
    del sd["bias"]
    with pytest.raises(RuntimeError, match="Missing key.*bias"):
        Linear4bit(64, 48).load_state_dict(sd)


def _with_blob(blob: bytes):
    sd = _sd()
    sd["weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(blob), dtype=torch.uint8)
    return sd


@pytest.mark.parametrize("blob, message", [
    (b"{not json", "valid UTF-8 JSON"),
    (b"[1, 2]", "JSON object"),
    (b'{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16"}', "shape"),
    (b'{"quant_type": "fp4", "blocksize": 64, "dtype": "bfloat16", "shape": [48, 64]}', "contradicts"),
    (b'{"quant_type": "nf4", "blocksize": 64, "dtype": "int8", "shape": [48, 64]}', "dtype"),
    (b'{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [64, 48]}', "shape"),
])
def test_load_malformed_quant_state(blob, message):
    with pytest.raises(RuntimeError, match=message) as e:
        Linear4bit(64, 48).load_state_dict(_with_blob(blob))
    assert "weight" in str(e.value)


def test_load_wrong_sizes():
    sd = _sd()
    sd["weight.absmax"] = sd["weight.absmax"][:-1]
    with pytest.raises(RuntimeError, match="absmax"):
        Linear4bit(64, 48).load_state_dict(sd)
    sd = _sd()
    sd["bias"] = torch.zeros(47, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="bias"):
        Linear4bit(64, 48).load_state_dict(sd)
    sd = _sd()
    sd["weight.extra"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="Unexpected key.*weight.extra"):
        Linear4bit(64, 48).load_state_dict(sd)


def test_set_quantized_rejects_wrong_shape():
    packed, state = mq.quantize_4bit(torch.randn(64, 48))
    with pytest.raises(ValueError, match=r"\[64, 48\].*\[48, 64\]"):
        Linear4bit(64, 48).set_quantized(packed, state)
