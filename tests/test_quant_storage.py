"""quant_storage: packed 4-bit bytes handed out as a float16/bfloat16/float32 view, as bitsandbytes' quant_storage.

Covers the op wrappers (bytes and shapes identical to bitsandbytes 0.50.2 for every storage dtype, the state-dict
entries and JSON blob identical too), that storage is a view and never a value conversion (NaN bit patterns in a
float32 view survive every path), sizes a storage cannot hold, Linear4bit holding, saving, moving and loading a
float-storage weight, and per-module double-quant maps (no two layers share a tensor). Checkpoints against
transformers + bitsandbytes are in test_checkpoint.py.
"""

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch

import minqlora as mq
from minqlora import quant
from minqlora.linear4bit import Linear4bit

STORAGES = [torch.uint8, torch.float16, torch.bfloat16, torch.float32]


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


@pytest.mark.parametrize("storage", STORAGES, ids=str)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_bytes_and_shape_equal_bitsandbytes(storage, quant_type, double_quant):
    x = torch.randn(128, 512, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    packed, state = mq.quantize_4bit(x, 64, quant_type, double_quant=double_quant, quant_storage=storage)
    theirs, _ = bnbF.quantize_4bit(x, blocksize=64, quant_type=quant_type, compress_statistics=double_quant,
                                   quant_storage=storage)
    assert packed.dtype == theirs.dtype == storage
    assert packed.shape == theirs.shape == ((x.numel() + 1) // (2 * storage.itemsize), 1)
    ours_u8, _ = mq.quantize_4bit(x, 64, quant_type, double_quant=double_quant)
    assert torch.equal(as_bytes(packed), ours_u8.view(-1))  # the same bytes as uint8 storage, viewed
    if quant_type == "nf4":  # bnb's CPU FP4 rules are not its CUDA ones (test_quant_bnb.py)
        assert torch.equal(as_bytes(packed), as_bytes(theirs))
    # dequantize and the reference take the view as it is
    assert torch.equal(mq.dequantize_4bit(packed, state), mq.dequantize_4bit(ours_u8, state))
    assert torch.equal(quant.dequantize_ref(packed, state), mq.dequantize_4bit(packed, state))
    ref_packed, _ = quant.quantize_ref(x, 64, quant_type, double_quant, quant_storage=storage)
    assert ref_packed.dtype == storage and torch.equal(as_bytes(ref_packed), as_bytes(packed))


def test_state_dict_and_json_equal_bitsandbytes_with_bf16_storage():
    """bitsandbytes records the storage only as the weight tensor's dtype; its JSON blob has no such field (and its
    QuantState.from_dict refuses unknown ones), so ours must not have one either."""
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    lin = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.bfloat16, compress_statistics=False,
                            quant_type="nf4", quant_storage=torch.bfloat16)
    lin.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", blocksize=64,
                                   compress_statistics=False, quant_storage=torch.bfloat16)
    theirs = lin.to("cpu").state_dict()
    ours = Linear4bit(128, 64, bias=False, double_quant=False, weight_dtype=torch.bfloat16,
                      quant_storage=torch.bfloat16)
    ours.set_quantized(*mq.quantize_4bit(w, 64, "nf4", double_quant=False, quant_storage=torch.bfloat16))
    mine = ours.state_dict()
    assert list(mine) == list(theirs)
    for k in theirs:
        assert mine[k].dtype == theirs[k].dtype and mine[k].shape == theirs[k].shape, k
        assert torch.equal(as_bytes(mine[k]), as_bytes(theirs[k])), k
    assert mine["weight"].dtype == torch.bfloat16
    # bitsandbytes reads our dict back (its own loader, with its own key checks)
    qs = bnbF.QuantState.from_dict({k.removeprefix("weight."): v for k, v in mine.items() if k != "weight"}, "cpu")
    assert qs.shape == w.shape and qs.dtype == torch.bfloat16


def test_float32_view_keeps_nan_bit_patterns():
    """Blocks of +absmax give NF4 code 15 everywhere: bytes 0xFF, i.e. float32 NaN (0xFFFFFFFF) in the view. They
    must come back unchanged through every path that touches the storage."""
    x = torch.ones(4, 64)
    x[1] = -1.0  # code 0: bytes 0x00, float32 +0.0
    packed, state = mq.quantize_4bit(x, 64, "nf4", double_quant=False, quant_storage=torch.float32)
    assert packed.dtype == torch.float32 and torch.isnan(packed).sum() == 24  # rows 0, 2, 3: 8 floats each
    assert torch.equal(as_bytes(packed), mq.quantize_4bit(x, 64, "nf4", double_quant=False)[0].view(-1))
    assert torch.equal(mq.dequantize_4bit(packed, state), x)
    lin = Linear4bit(64, 4, bias=False, double_quant=False, compute_dtype=torch.float32, weight_dtype=torch.float32,
                     quant_storage=torch.float32)
    lin.set_quantized(packed, state)
    lin = lin.to(torch.float16).to("cpu")  # a cast must not touch the bytes
    assert lin.weight.dtype == torch.float32 and torch.equal(as_bytes(lin.weight), as_bytes(packed))
    assert torch.equal(lin(torch.eye(64)), x.t())


@pytest.mark.parametrize("storage, numel", [(torch.float32, 10), (torch.float16, 6), (torch.bfloat16, 2 * 64 + 1)])
def test_sizes_a_storage_cannot_hold_are_refused(storage, numel):
    """(numel + 1) // 2 bytes must be a multiple of the itemsize; bitsandbytes' shape formula would drop the tail."""
    with pytest.raises(ValueError, match=r"quant_storage=\w+ needs the packed byte count"):
        mq.quantize_4bit(torch.randn(numel), 32, quant_storage=storage)
    with pytest.raises(ValueError, match="quant_storage must be one of uint8, float16, bfloat16, float32"):
        mq.quantize_4bit(torch.randn(64), 32, quant_storage=torch.int32)


@pytest.mark.parametrize("storage", STORAGES[1:], ids=str)
def test_linear4bit_with_float_storage(storage):
    torch.manual_seed(0)
    base = torch.nn.Linear(256, 96, bias=True)
    plain = Linear4bit.from_linear(base, compute_dtype=torch.float32)
    held = Linear4bit.from_linear(base, compute_dtype=torch.float32, quant_storage=storage)
    assert held.weight.dtype == storage and held.quant_storage == storage
    assert held.weight.shape == (256 * 96 // (2 * storage.itemsize), 1)
    assert torch.equal(as_bytes(held.weight), plain.weight.view(-1))
    assert held.memory_bytes() == plain.memory_bytes() and f"quant_storage={storage}" in repr(held)
    x = torch.randn(5, 256, requires_grad=True)
    y = held(x)
    assert torch.equal(y, plain(x))
    y.sum().backward()  # gradient flows to x through the uint8 view
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert torch.equal(held.dequantize(), plain.dequantize())
    # state_dict keeps the storage dtype; loading it into a fresh module restores it (and the bytes)
    sd = held.state_dict()
    assert sd["weight"].dtype == storage
    fresh = Linear4bit(256, 96, bias=True, compute_dtype=torch.float32, weight_dtype=torch.float32)
    fresh.load_state_dict(sd)
    assert fresh.weight.dtype == storage and torch.equal(fresh(x), y)


def test_every_layer_owns_its_double_quant_map():
    """A plain state_dict() of several layers must have no two tensors sharing memory (safetensors refuses
    that), and an in-place edit of one layer's map must not reach other layers or later quantizations."""
    layers = [Linear4bit.from_linear(torch.nn.Linear(64, 64), compute_dtype=torch.float32) for _ in range(3)]
    maps = [m.weight_nested_map for m in layers]
    pointers = {t.untyped_storage().data_ptr() for t in maps} | {quant.DYNAMIC_SIGNED.untyped_storage().data_ptr()}
    assert len(pointers) == 4
    sds = [m.state_dict() for m in layers]
    tensors = [t for sd in sds for t in sd.values()]
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == len(tensors)
    before = quant.DYNAMIC_SIGNED.clone()
    maps[0].mul_(0)  # vandalize one layer's table
    assert torch.equal(quant.DYNAMIC_SIGNED, before) and torch.equal(maps[1], before)
    _, state = mq.quantize_4bit(torch.randn(64, 64))
    assert torch.equal(state.nested_map, before)
    a, b = mq.quantize_4bit(torch.randn(64, 64))[1], mq.quantize_4bit(torch.randn(64, 64))[1]
    assert a.nested_map.data_ptr() != b.nested_map.data_ptr()
