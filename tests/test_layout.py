"""The decode layout (minqlora/layout.py): a pure regrouping of bitsandbytes' bytes that every op reads as rows."""

import pytest
import torch

import minqlora as mq
from minqlora import layout


def quantized(n, k, seed=0, double_quant=True):
    torch.manual_seed(seed)
    return mq.quantize_4bit(torch.randn(n, k), blocksize=64, quant_type="nf4", double_quant=double_quant)


def test_tiles_are_the_documented_permutation():
    packed, state = quantized(32, 256)
    tiles = layout.to_tiles(packed, state.shape)
    rows = packed.reshape(32, 128)
    assert tiles.shape == (2, 2, 16, 64) and tiles.dtype == torch.uint8
    for i, c, r, b in ((0, 0, 0, 0), (1, 1, 15, 63), (0, 1, 7, 5), (1, 0, 3, 40)):
        assert tiles[i, c, r, b] == rows[16 * i + r, 64 * c + b]
    assert layout.is_tiles(tiles) and not layout.is_tiles(packed)
    assert torch.equal(layout.to_rows(tiles), packed) and layout.to_rows(packed) is packed
    assert layout.to_tiles(tiles, state.shape) is tiles


@pytest.mark.parametrize("double_quant", [True, False])
def test_every_op_reads_tiles_as_rows(double_quant):
    packed, state = quantized(48, 384, seed=1, double_quant=double_quant)
    tiles = layout.to_tiles(packed, state.shape)
    torch.testing.assert_close(mq.dequantize_4bit(tiles, state), mq.dequantize_4bit(packed, state), rtol=0, atol=0)
    x = torch.randn(5, 384)
    torch.testing.assert_close(mq.gemm_4bit(x, tiles, state), mq.gemm_4bit(x, packed, state), rtol=0, atol=0)
    gy = torch.randn(5, 48)
    torch.testing.assert_close(torch.ops.minqlora.gemm_4bit_grad_input(gy, tiles, *mq.ops._state_args(state)),
                               torch.ops.minqlora.gemm_4bit_grad_input(gy, packed, *mq.ops._state_args(state)),
                               rtol=0, atol=0)


def test_clear_errors():
    packed, state = quantized(24, 256)
    with pytest.raises(ValueError, match="out_features must be a multiple of 16"):
        layout.to_tiles(packed, state.shape)
    packed, state = quantized(32, 192)
    with pytest.raises(ValueError, match="in_features of 128"):
        layout.to_tiles(packed, state.shape)
    packed, state = quantized(32, 256)
    with pytest.raises(ValueError, match="uint8 bytes"):
        layout.to_tiles(packed[:-1], state.shape)
    # tiles of another weight's shape: the op names both
    tiles = layout.to_tiles(packed, state.shape).reshape(4, 1, 16, 64)
    with pytest.raises(RuntimeError, match="does not match the weight shape"):
        mq.dequantize_4bit(tiles, state)


def test_linear4bit_with_tiles_saves_rows_and_computes_the_same():
    """A Linear4bit holding tiles (what Linear4bit.use_tiles makes on a GPU; set by hand here, on the CPU, where
    use_tiles leaves the weight in rows) computes the same outputs, and its state_dict holds bitsandbytes' rows."""
    from minqlora.linear4bit import Linear4bit
    torch.manual_seed(0)
    lin = Linear4bit.from_linear(torch.nn.Linear(256, 32, bias=True))
    rows = lin.weight.clone()
    x = torch.randn(3, 256)
    want = lin(x)
    assert not lin.use_tiles() and lin.weight.shape == rows.shape  # CPU: nothing to gain, stays in rows
    lin._buffers["weight"] = layout.to_tiles(rows, (32, 256))
    lin._weight_args = None
    torch.testing.assert_close(lin(x), want, rtol=0, atol=0)
    sd = lin.state_dict()
    assert torch.equal(sd["weight"], rows) and sd["weight"].shape == rows.shape
    assert not lin.use_tiles(False) and torch.equal(lin.weight, rows)
    assert layout.use_tiles(torch.nn.Sequential(lin)) == 0
