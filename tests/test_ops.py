"""The op layer (ops.py): torch.library.opcheck for every op, torch.compile(fullgraph=True) against eager,
gemm_4bit and its gradient, and clear Python errors for bad input (no crash inside C++)."""

import pytest
import torch

import minqlora as mq
from minqlora import ops, quant
from minqlora.quant import QuantState

OPS = torch.ops.minqlora


def _weight(shape=(48, 64), dtype=torch.bfloat16, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_opcheck_4bit(quant_type, dtype):
    x = _weight((33, 70), dtype)
    torch.library.opcheck(OPS.quantize_4bit, (x, 64, quant_type))
    packed, state = mq.quantize_4bit(x, 64, quant_type, double_quant=True)
    args = (packed, *ops._state_args(state), dtype)
    torch.library.opcheck(OPS.dequantize_4bit, args)
    _, plain = mq.quantize_4bit(x, 64, quant_type, double_quant=False)
    torch.library.opcheck(OPS.dequantize_4bit, (packed, *ops._state_args(plain), dtype))


def test_opcheck_8bit():
    x = _weight((1000,), torch.float32)
    torch.library.opcheck(OPS.quantize_blockwise_8bit, (x, quant.DYNAMIC_SIGNED, 256))
    codes, absmax = mq.quantize_blockwise_8bit(x, quant.DYNAMIC_SIGNED, 256)
    torch.library.opcheck(OPS.dequantize_blockwise_8bit, (codes, absmax, quant.DYNAMIC_SIGNED, 256, torch.bfloat16))


@pytest.mark.parametrize("double_quant", [False, True])
def test_opcheck_gemm(double_quant):
    w = _weight((48, 64), torch.float32)
    packed, state = mq.quantize_4bit(w, 64, "nf4", double_quant=double_quant)
    x = torch.randn(3, 5, 64, requires_grad=True)
    torch.library.opcheck(OPS.gemm_4bit, (x, packed, *ops._state_args(state)))
    g = torch.randn(3, 5, 48)
    torch.library.opcheck(OPS.gemm_4bit_grad_input, (g, packed, *ops._state_args(state)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemm_forward_and_grad_input(dtype):
    w = _weight((48, 64), dtype)
    packed, state = mq.quantize_4bit(w, 64, "nf4")
    w_dq = mq.dequantize_4bit(packed, state, dtype)
    x = torch.randn(2, 7, 64, dtype=dtype, requires_grad=True)
    y = mq.gemm_4bit(x, packed, state)
    assert y.shape == (2, 7, 48) and y.dtype == dtype
    torch.testing.assert_close(y, x.detach() @ w_dq.t())
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ w_dq)


def test_gemm_without_a_wanted_gradient_builds_no_graph():
    """Where no gradient is wanted the autograd kernel (csrc/gemm_autograd.cpp) calls the op below autograd
    directly: under no_grad and for an input that needs none, y has no grad_fn and equals the graph-building
    call's y bit for bit; with x needing one, the gradient still flows."""
    w = _weight((48, 64), torch.float32)
    packed, state = mq.quantize_4bit(w, 64, "nf4", double_quant=True)
    x = torch.randn(2, 64)
    with_graph = mq.gemm_4bit(x.requires_grad_(), packed, state)
    assert with_graph.grad_fn is not None
    with torch.no_grad():
        y = mq.gemm_4bit(x, packed, state)
    assert y.grad_fn is None and not y.requires_grad and torch.equal(y, with_graph.detach())
    y = mq.gemm_4bit(x.detach(), packed, state)
    assert y.grad_fn is None and torch.equal(y, with_graph.detach())
    with_graph.sum().backward()
    torch.testing.assert_close(x.grad, mq.dequantize_4bit(packed, state, torch.float32).sum(0).expand(2, 64))


def test_compile_fullgraph_matches_eager():
    w = _weight((64, 128), torch.bfloat16)

    def roundtrip(t):
        packed, absmax = OPS.quantize_4bit(t, 64, "nf4")
        return OPS.dequantize_4bit(packed, absmax, None, None, 0.0, 64, 256, "nf4", list(t.shape), t.dtype)

    compiled = torch.compile(roundtrip, fullgraph=True, backend="inductor")
    assert torch.equal(compiled(w), roundtrip(w))

    packed, state = mq.quantize_4bit(w, 64, "nf4", double_quant=True)

    def dq_decode(p):
        return OPS.dequantize_4bit(p, *ops._state_args(state), torch.float32)

    assert torch.equal(torch.compile(dq_decode, fullgraph=True)(packed), dq_decode(packed))

    def linear(x):
        return OPS.gemm_4bit(x, packed, *ops._state_args(state))

    x = torch.randn(4, 128, dtype=torch.bfloat16)
    torch.testing.assert_close(torch.compile(linear, fullgraph=True)(x), linear(x))


# -- bad input: clear Python errors naming the argument ----------------------------------------------------------

@pytest.mark.parametrize("x,match", [
    (torch.zeros(8, dtype=torch.int32), "x must be float32, float16 or bfloat16"),
    (torch.zeros(0), "x is empty"),
    ("not a tensor", "x must be a torch.Tensor"),
])
def test_quantize_rejects_bad_tensors(x, match):
    with pytest.raises((ValueError, TypeError), match=match):
        mq.quantize_4bit(x)


@pytest.mark.parametrize("kwargs,match", [
    ({"blocksize": 48}, "blocksize must be one of"),
    ({"blocksize": 8192}, "blocksize must be one of"),
    ({"quant_type": "int4"}, "quant_type must be one of"),
])
def test_quantize_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mq.quantize_4bit(torch.randn(128), **kwargs)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_refused_unless_allowed(bad):
    x = torch.randn(300)
    x[200] = bad
    with pytest.raises(ValueError, match="NaN or Inf.*block 3"):
        mq.quantize_4bit(x, 64)
    packed, state = mq.quantize_4bit(x, 64, double_quant=False, allow_nonfinite=True)
    assert not torch.isfinite(state.absmax[3])
    assert torch.equal(mq.dequantize_4bit(packed, state)[:192], quant.dequantize_ref(packed, state)[:192])


def test_dequantize_rejects_mismatched_state():
    packed, state = mq.quantize_4bit(torch.randn(64, 64), 64)
    with pytest.raises(ValueError, match="packed weight must be 2048 uint8 bytes"):
        mq.dequantize_4bit(packed[:100], state)
    wrong = QuantState(state.absmax, torch.Size([64, 32]), state.dtype, 64, "nf4", state.nested_absmax,
                       state.nested_map, state.nested_offset)
    with pytest.raises(ValueError, match="absmax must be 32 values"):
        mq.dequantize_4bit(packed, wrong)
    plain = QuantState(state.absmax, state.shape, state.dtype, 64, "nf4")  # uint8 codes without nested state
    with pytest.raises(ValueError, match="absmax must be 64 values of torch.float32"):
        mq.dequantize_4bit(packed, plain)
    with pytest.raises(TypeError, match="state must be a QuantState"):
        mq.dequantize_4bit(packed, {"absmax": state.absmax})
    with pytest.raises(ValueError, match="dtype must be"):
        mq.dequantize_4bit(packed, state, torch.int8)


def test_kernels_check_arguments_themselves():
    """Called directly, bypassing the Python checks, the C++ kernels still refuse bad input with an error naming
    the argument (RuntimeError from TORCH_CHECK), never a crash."""
    packed, state = mq.quantize_4bit(torch.randn(64, 64), 64, double_quant=False)
    with pytest.raises(RuntimeError, match="blocksize must be a power of two"):
        OPS.quantize_4bit(torch.randn(64), 48, "nf4")
    with pytest.raises(RuntimeError, match="quant_type must be 'nf4' or 'fp4'"):
        OPS.quantize_4bit(torch.randn(64), 64, "int4")
    with pytest.raises(RuntimeError, match="absmax has 64 values but 128 blocks"):
        OPS.dequantize_4bit(packed, state.absmax, None, None, 0.0, 32, 256, "nf4", [64, 64], torch.float32)
    with pytest.raises(RuntimeError, match="packed has 2048 bytes"):
        OPS.dequantize_4bit(packed, state.absmax, None, None, 0.0, 64, 256, "nf4", [64, 65], torch.float32)
    with pytest.raises(RuntimeError, match="nested_absmax and nested_map must be given together"):
        OPS.dequantize_4bit(packed, state.absmax, torch.zeros(1), None, 0.0, 64, 256, "nf4", [64, 64], torch.float32)
    with pytest.raises(RuntimeError, match="x has last dimension 32"):
        OPS.gemm_4bit(torch.randn(2, 32), packed, *ops._state_args(state))


def test_packed_bytes_in_float_storage_are_reinterpreted():
    packed, state = mq.quantize_4bit(torch.randn(32, 64), 64)
    as_bf16 = packed.view(-1).view(torch.bfloat16).reshape(-1, 1)  # what bnb_4bit_quant_storage=bf16 writes
    assert torch.equal(mq.dequantize_4bit(as_bf16, state), mq.dequantize_4bit(packed, state))


def test_8bit_wrappers_check_arguments():
    with pytest.raises(ValueError, match="code_map must be 256 float32 values"):
        mq.quantize_blockwise_8bit(torch.randn(10), torch.zeros(16), 256)
    codes, absmax = mq.quantize_blockwise_8bit(torch.randn(600), quant.DYNAMIC_SIGNED, 256)
    with pytest.raises(ValueError, match="absmax must be 3 float32 values"):
        mq.dequantize_blockwise_8bit(codes, absmax[:2], quant.DYNAMIC_SIGNED, 256)
    with pytest.raises(ValueError, match="codes must be uint8"):
        mq.dequantize_blockwise_8bit(codes.int(), absmax, quant.DYNAMIC_SIGNED, 256)
