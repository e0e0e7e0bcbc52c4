"""4-bit weights that FSDP2 (torch.distributed.fsdp.fully_shard) can shard and gather as integer storage.

FSDP2 shards parameters, never buffers, and reinterprets nothing it is not told to: a uint8 packed weight kept as a
plain parameter would be all-gathered correctly, but its scales (absmax, another tensor of another dtype) would
not travel with it. Packed4bit is a tensor subclass that holds one Linear4bit weight's rows as two inner tensors,
    codes   (rows · in / 2,) uint8        two 4-bit codes per byte, bitsandbytes' order (quant.py)
    absmax  (rows · in / blocksize,)      uint8 double-quant codes, or float32 without double quantization
and implements FSDP2's all-gather extension: fsdp_pre_all_gather hands FSDP one uint8 tensor, the codes followed
by the absmax's bytes (bytes stay bytes: never a float view of packed codes, so no NaN bit pattern is rewritten),
and fsdp_post_all_gather splits every rank's piece back into codes and absmax and concatenates them over ranks as
the whole weight for the layer's forward and backward. A shard is a run of whole rows holding whole quantization
blocks, so the concatenation is the one-process layout byte for byte. The second-level scales of double
quantization (nested_absmax, one float32 per 256 blocks = 1/4096 byte per weight) and the offset stay replicated on
every rank: they are 0.1 % of the 4-bit bytes, and sharding them would need shards of whole 16,384-value groups,
which small models do not have.

The outer tensor is (rows, in_features) uint8: FSDP shards it on dim 0 through torch.chunk, new_zeros, narrow
and copy_, and the handful of aten ops here map each of those onto the inner tensors by rows.

ShardableLinear4bit is Linear4bit's forward over a Packed4bit parameter; to_shardable() swaps it in for every
Linear4bit of a model (same bytes, so the same outputs). Leaves out: sharding anything but dim 0, uneven shards
(FSDP2's padding would have to be rebuilt inside the codes), CPU offload of the shards, and saving a sharded
4-bit model (training saves only adapters).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn

from . import layout, ops, quant
from .linear4bit import Linear4bit
from .quant import QuantState

aten = torch.ops.aten


@dataclass(frozen=True)
class Meta4bit:
    """What every shard of one weight shares (replicated, not gathered)."""

    in_features: int
    blocksize: int
    quant_type: str
    dtype: torch.dtype  # the original weight's dtype, what dequantize returns
    nested_absmax: torch.Tensor | None  # (ceil(B/256),) float32 for the whole weight, or None
    nested_map: torch.Tensor | None  # (256,) float32
    nested_offset: float


class Packed4bit(torch.Tensor):
    """Rows of a 4-bit weight: outer shape (rows, in_features) uint8; inner tensors `codes` and `absmax`."""

    @staticmethod
    def __new__(cls, codes: torch.Tensor, absmax: torch.Tensor, meta: Meta4bit, shape=None, start: int = 0):
        rows = codes.numel() * 2 // meta.in_features
        shape = torch.Size(shape if shape is not None else (rows, meta.in_features))
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=torch.uint8, device=codes.device,
                                                   requires_grad=False)

    def __init__(self, codes, absmax, meta, shape=None, start: int = 0):
        # start: a partial weight (quantize_rows) holds only rows [start, start + rows) of its outer shape
        self.codes, self.absmax, self.meta, self.start = codes, absmax, meta, start

    @classmethod
    def from_linear4bit(cls, lin: Linear4bit) -> "Packed4bit":
        nested = lin.weight_nested_absmax
        meta = Meta4bit(lin.in_features, lin.blocksize, lin.quant_type, lin.weight_dtype, nested,
                        lin.weight_nested_map, lin.nested_offset)
        # shards are runs of whole rows: bitsandbytes' order, also for a weight held in decode tiles (layout.py)
        return cls(layout.to_rows(lin.weight).reshape(-1), lin.weight_absmax, meta)

    @property
    def rows(self) -> int:
        """Rows held (the outer shape's first dim, except for a partial weight)."""
        return self.codes.numel() * 2 // self.meta.in_features

    @property
    def partial(self) -> bool:
        return self.rows != self.shape[0]

    def quant_state(self) -> QuantState:
        m = self.meta
        return QuantState(absmax=self.absmax, shape=torch.Size([self.rows, m.in_features]), dtype=m.dtype,
                          blocksize=m.blocksize, quant_type=m.quant_type, nested_absmax=m.nested_absmax,
                          nested_map=m.nested_map, nested_offset=m.nested_offset)

    def __repr__(self) -> str:
        held = (f"rows {self.start}..{self.start + self.rows} of {self.shape[0]}" if self.partial
                else f"rows={self.rows}")
        return f"Packed4bit({held}, in_features={self.meta.in_features}, {self.meta.quant_type})"

    # -- torch.compile / FSDP tracing: the subclass flattens to its two inner tensors
    def __tensor_flatten__(self):
        return ["codes", "absmax"], (self.meta, tuple(self.shape), self.start)

    @staticmethod
    def __tensor_unflatten__(inner, ctx, outer_size, outer_stride):
        meta, shape, start = ctx
        return Packed4bit(inner["codes"], inner["absmax"], meta, shape, start)

    def _fresh_rows(self, rows: int, make, device) -> "Packed4bit":
        """`rows` new rows of this weight's layout: make(numel, dtype=, device=) builds each inner tensor
        (torch.zeros for FSDP2's padded shard; torch.empty on "meta" for another rank's chunk, which no tensor
        holds)."""
        m = self.meta
        return Packed4bit(make(rows * m.in_features // 2, dtype=torch.uint8, device=device),
                          make(rows * m.in_features // m.blocksize, dtype=self.absmax.dtype, device=device), m)

    def _rows(self, start: int, stop: int) -> "Packed4bit":
        """Rows [start, stop) as views of this tensor's storage."""
        per_row_codes, per_row_blocks = self.meta.in_features // 2, self.meta.in_features // self.meta.blocksize
        return Packed4bit(self.codes[start * per_row_codes:stop * per_row_codes],
                          self.absmax[start * per_row_blocks:stop * per_row_blocks], self.meta)

    def _map(self, fn) -> "Packed4bit":
        """fn applied to both inner tensors (moves, copies, fresh zeros); nested scales follow a device move."""
        codes, absmax = fn(self.codes), fn(self.absmax)
        meta = self.meta
        if codes.device != self.codes.device:
            move = (lambda t: None if t is None else t.to(codes.device))
            meta = replace(meta, nested_absmax=move(meta.nested_absmax), nested_map=move(meta.nested_map))
        return Packed4bit(codes, absmax, meta)

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        x = args[0]
        if func in (aten.detach.default, aten.alias.default):
            return Packed4bit(x.codes, x.absmax, x.meta, x.shape, x.start)
        if func is aten.split.Tensor:  # torch.chunk(w, world_size) in fully_shard
            size, dim = args[1], (args[2] if len(args) > 2 else kwargs.get("dim", 0))
            _check_dim0(func, dim)
            n = x.shape[0]
            if not x.partial:
                return [x._rows(a, min(a + size, n)) for a in range(0, n, size)]
            # A partial weight holds exactly one chunk, this rank's; FSDP2 keeps that one and reads only the
            # others' sizes.
            if x.start % size or x.rows != min(size, n - x.start):
                raise ValueError(f"{x!r} does not hold one whole chunk of {size} rows (quantize_rows made it for "
                                 "another number of ranks)")
            return [x._rows(0, x.rows) if a == x.start else x._fresh_rows(min(a + size, n) - a, torch.empty, "meta")
                    for a in range(0, n, size)]
        if func is aten.new_zeros.default:
            return x._fresh_rows(args[1][0], torch.zeros, x.codes.device)
        if x.partial:  # FSDP2 asks a parameter for its chunks and for fresh zeros, no more
            raise NotImplementedError(f"{x!r} is partial (this rank's rows only): FSDP2 shards it (distributed.py), "
                                      f"nothing else may use it; {func} asked")
        if func is aten.slice.Tensor:  # narrow(0, start, length)
            dim, start, end = (list(args[1:4]) + [0, None, None][len(args) - 1:])[:3]
            _check_dim0(func, dim)
            start, end = start or 0, x.rows if end is None else min(end, x.rows)
            return x._rows(start, end)
        if func is aten.copy_.default:
            src = args[1]
            if not isinstance(src, Packed4bit) or src.codes.shape != x.codes.shape:
                raise ValueError(f"Packed4bit.copy_: source must be a Packed4bit of {x.rows} rows, got {src!r}")
            x.codes.copy_(src.codes)
            x.absmax.copy_(src.absmax)
            return x
        if func in (aten.view.default, aten.as_strided.default, aten._unsafe_view.default):
            # FSDP2 keeps a flat view of a shard (view(-1)) and restrides the gathered weight to its own shape:
            # the rows stay what they are; only the outer shape is relabelled.
            size = list(args[1])
            if -1 in size:
                size[size.index(-1)] = x.numel() // -math.prod(size)
            return Packed4bit(x.codes, x.absmax, x.meta, size)
        if func is aten._to_copy.default:
            device = kwargs.get("device")
            return x._map(lambda t: t.to(device=device) if device is not None else t.clone())
        if func is aten.clone.default:
            return x._map(torch.clone)
        if func is aten.is_pinned.default:
            return x.codes.is_pinned()
        if func is aten._has_compatible_shallow_copy_type.default:
            return False
        raise NotImplementedError(f"Packed4bit (a 4-bit weight for FSDP2) does not implement {func}")

    # -- FSDP2's all-gather extension -----------------------------------------------------------------------
    # One uint8 input per shard, its codes then its absmax's bytes: FSDP2 gathers it as bytes. (Two inputs would
    # also travel as bytes, but FSDP2's one-rank path in torch 2.13 copies only a parameter's first input.)
    def fsdp_pre_all_gather(self, mesh, outer_size=None, outer_stride=None, module=None, mp_policy=None):
        return (torch.cat([self.codes, self.absmax.view(torch.uint8)]),), (self.codes.numel(), self.absmax.dtype)

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        (flat,) = all_gather_outputs  # (ranks x shard bytes,) uint8: every rank's [codes | absmax bytes]
        n_codes, absmax_dtype = metadata
        shards = flat.view(-1, n_codes + self.absmax.numel() * self.absmax.element_size())  # (ranks, shard bytes)
        # Copies, always: FSDP2 frees and re-allocates the storage of what this returns, so it must own it.
        codes = shards[:, :n_codes].clone(memory_format=torch.contiguous_format).view(-1)  # (rows * in / 2,)
        absmax = shards[:, n_codes:].clone(memory_format=torch.contiguous_format).view(-1).view(absmax_dtype)
        if out is not None:  # later gathers: refill the whole weight FSDP2 built the first time. Autograd saved
            # it in forward and FSDP2 freed and re-gathered it for backward: same values, so keep the version
            # counter (as FSDP2 does for its own parameters) or backward would refuse the "modified" tensor.
            for dst, src in ((out.codes, codes), (out.absmax, absmax)):
                with torch.autograd._unsafe_preserve_version_counter(dst):
                    dst.copy_(src)
            return
        return Packed4bit(codes, absmax, self.meta), (codes, absmax)


def _check_dim0(func, dim) -> None:
    if dim != 0:
        raise NotImplementedError(f"Packed4bit shards along rows (dim 0) only; {func} asked for dim {dim}")


class ShardableLinear4bit(nn.Module):
    """Linear4bit's y = x · dequant(W)ᵀ + b with W in one Packed4bit parameter (frozen), so FSDP2 shards it."""

    def __init__(self, lin: Linear4bit | None = None, *, weight: Packed4bit | None = None, compute_dtype=None,
                 bias: nn.Parameter | None = None):
        """From a Linear4bit (same bytes), or from a Packed4bit weight (quantize_rows: this rank's rows only)."""
        super().__init__()
        if lin is not None:
            weight, compute_dtype, bias = Packed4bit.from_linear4bit(lin), lin.compute_dtype, lin.bias
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = compute_dtype
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight  # the whole weight: FSDP2 gathered it before this layer's forward (and again for backward)
        if isinstance(w, Packed4bit) and w.partial:
            raise RuntimeError(f"this layer holds one rank's rows of its 4-bit weight ({w!r}); run it under "
                               "--parallel fsdp2 (distributed.Parallel.wrap) or load the model without a RowShard")
        y = ops.gemm_4bit(x.to(self.compute_dtype), w.codes.view(-1, 1), w.quant_state())
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def check_shardable(model: nn.Module, world_size: int) -> None:
    """Every Linear4bit must split into world_size equal runs of rows holding whole quantization blocks."""
    for name, m in model.named_modules():
        if isinstance(m, ShardableLinear4bit) and isinstance(m.weight, Packed4bit) and m.weight.partial:
            if m.weight.rows * world_size != m.out_features:
                raise ValueError(f"--parallel fsdp2: {name} was loaded as {m.weight!r}, a share for "
                                 f"{m.out_features // m.weight.rows} ranks, but this run has {world_size}")
            continue
        if isinstance(m, Linear4bit):
            shard_rows(name, m.out_features, m.in_features, m.blocksize, world_size)


def shard_rows(name: str, out_features: int, in_features: int, blocksize: int, world_size: int) -> int:
    """Rows per rank of an (out, in) 4-bit weight split into world_size equal runs of whole rows holding whole
    quantization blocks; ValueError naming `name` when it cannot be split so."""
    rows = out_features // world_size
    if out_features % world_size or (rows * in_features) % blocksize or in_features % 2:
        raise ValueError(f"--parallel fsdp2: {name} ({out_features}x{in_features}, blocksize {blocksize}) cannot be "
                         f"split into {world_size} shards of whole rows and whole quantization blocks (needs "
                         f"out_features divisible by {world_size} and out_features/{world_size} x in_features "
                         f"divisible by {blocksize}); use --parallel ddp")
    return rows


@dataclass(frozen=True)
class RowShard:
    """One rank's share when loading for FSDP2: rows [rank·N/world, (rank+1)·N/world) of every 4-bit projection,
    the run of rows FSDP2 keeps on that rank. gather(t) returns every rank's equal-size t concatenated in rank
    order (an all_gather; Parallel.row_shard makes it)."""

    rank: int
    world: int
    gather: Callable[[torch.Tensor], torch.Tensor]

    def rows(self, out_features: int, in_features: int, blocksize: int, name: str = "weight") -> slice:
        per = shard_rows(name, out_features, in_features, blocksize, self.world)
        return slice(self.rank * per, (self.rank + 1) * per)


def quantize_rows(w: torch.Tensor, out_features: int, shard: RowShard, blocksize: int = 64,
                  quant_type: str = "nf4", double_quant: bool = True) -> Packed4bit:
    """This rank's rows w (N/world, K) of an (N, K) weight, quantized to the bytes the whole weight would get.

    4-bit codes and first-level absmax are per block, and blocks lie inside the rank's rows: computed here alone.
    Double quantization is not local (its offset is the mean of the whole absmax vector, its 256-block groups may
    straddle ranks), so the ranks all-gather their float32 absmax (1/16 byte per weight) and each runs the same
    double quantization on the whole vector, keeping its own codes: byte for byte the one-process result."""
    packed, absmax = ops.quantize_4bit_raw(w, blocksize, quant_type)
    quant.check_finite_absmax(absmax)
    nested = nested_map = None
    offset = 0.0
    if double_quant:
        codes, nested, nested_map, offset = ops.double_quantize(shard.gather(absmax))
        absmax = codes[shard.rank * absmax.numel():(shard.rank + 1) * absmax.numel()].clone()
    meta = Meta4bit(w.shape[1], blocksize, quant_type, w.dtype, nested, nested_map, offset)
    return Packed4bit(packed.view(-1), absmax, meta, shape=(out_features, w.shape[1]),
                      start=shard.rank * w.shape[0])


class _FrozenIntegerParameter(type):
    """Stands for nn.Parameter inside torch 2.11's FSDP2 module: isinstance checks go to nn.Parameter, and a call
    with integer data makes a parameter that does not require grad (instead of raising)."""

    def __instancecheck__(cls, obj) -> bool:
        return isinstance(obj, nn.Parameter)

    def __call__(cls, data=None, requires_grad=True):
        if data is not None and not (data.is_floating_point() or data.is_complex()):
            requires_grad = False
        return nn.Parameter(data, requires_grad)


class _FSDPParamNN:
    """torch.nn, with Parameter replaced by the class above (everything else looked up in torch.nn)."""

    class Parameter(metaclass=_FrozenIntegerParameter):
        pass

    def __getattr__(self, name):
        return getattr(nn, name)


def allow_integer_parameters() -> None:
    """Let FSDP2 shard Packed4bit (uint8) parameters on torch versions that cannot.

    torch 2.11's FSDPParam._init_sharded_param builds the sharded parameter as nn.Parameter(dtensor), which asks
    for requires_grad=True, and only then sets requires_grad to the original's; for uint8 data the first step
    raises "only Tensors of floating point dtype can require gradients" (found on the H200 machine's torch 2.11).
    Later versions pass requires_grad=param.requires_grad into the constructor. On the older ones, the FSDP2
    module's `nn` is swapped for a proxy whose Parameter does the same for integer data; floating-point parameters
    take exactly the original path, and the swap is skipped where torch already passes requires_grad through."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param

    if isinstance(_fsdp_param.nn, _FSDPParamNN):
        return
    if "requires_grad=param.requires_grad" in inspect.getsource(_fsdp_param.FSDPParam._init_sharded_param):
        return
    _fsdp_param.nn = _FSDPParamNN()


def to_shardable(model: nn.Module) -> nn.Module:
    """Swap every Linear4bit of `model` for a ShardableLinear4bit over the same bytes, in place."""
    allow_integer_parameters()
    for name, m in list(model.named_modules()):
        if isinstance(m, Linear4bit):
            model.set_submodule(name, ShardableLinear4bit(m).train(m.training))
    return model
