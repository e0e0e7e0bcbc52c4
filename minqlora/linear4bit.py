"""Linear4bit: a frozen nn.Linear whose weight is stored in 4 bits (NF4/FP4, optionally double-quantized).

The weight lives in plain buffers in bitsandbytes' layout and the module's state_dict() uses bitsandbytes' keys
(bnb-format.md §4), so it goes straight to safetensors and loads in transformers + bitsandbytes. Every module owns
its buffers (the double-quant map included), so a model's state_dict() has no two tensors sharing memory.
For decoding on a GPU the bytes may be regrouped in place into layout.py's tiles (use_tiles; decode.Decoder does
it), a permutation the kernels read directly and state_dict() undoes. The packed bytes may be held as a
float16/bfloat16/float32 view (bitsandbytes' quant_storage, what FSDP1-era QLoRA
checkpoints store); the kernels always see them viewed back as uint8. Forward is the
differentiable gemm_4bit op: y = x · dequant(W)ᵀ + b, whose backward gives x its gradient and W none (QLoRA §3).
Adapters (lora.py) and model loading (checkpoint.py) live elsewhere.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from . import layout, ops, quant
from .quant import QuantState

# Buffer names -> the suffix of bitsandbytes' state-dict key under "<prefix>weight".
_STATE_BUFFERS = ("weight", "weight_absmax", "weight_nested_absmax", "weight_nested_map")


class _GradInputOnly(torch.autograd.Function):
    """gemm_4bit's autograd node without its forward: y (..., out) is left unwritten, grad_x = grad_y · dequant(W)
    as gemm_4bit's own backward computes it (csrc/gemm_autograd.cpp). For a recomputation whose output only enters a
    sum (Linear4bit.output_unused): the o_proj and down_proj GEMMs of a checkpointed decoder layer, about a third of
    its matmul FLOPs on the Llama-3-8B shape, plus their weights' dequantization at many rows."""

    @staticmethod
    def forward(ctx, x, args):  # x (..., in); args: ops.weight_args of the weight, shape (out, in) last
        ctx.args = args  # the frozen buffers and scalars, not graph tensors: nothing to save_for_backward
        return x.new_empty((*x.shape[:-1], args[-1][0]))

    @staticmethod
    def backward(ctx, grad_y):
        return torch.ops.minqlora.gemm_4bit_grad_input(grad_y, *ctx.args), None


class Linear4bit(nn.Module):
    """y = x · dequant(W)ᵀ + b with W (out_features, in_features) frozen in 4 bits.

    Buffers: weight ((out·in+1)//2, 1) uint8 packed codes, or the same bytes viewed as quant_storage
    (((out·in+1)//(2·itemsize), 1) float16/bfloat16/float32); weight_absmax (B,) float32, or uint8 codes with double
    quantization; weight_nested_absmax (ceil(B/256),) float32 and weight_nested_map (256,) float32 with double
    quantization. B = ceil(out·in / blocksize). The bias, if any, is an ordinary frozen Parameter.
    compute_dtype is the dtype the weight is dequantized to and the matmul runs in; the output is cast back to the
    input's dtype.
    output_unused: set (by checkpointing.py, for the length of a recomputation) when whatever reads this layer's
    output needs no value from it, only the graph through it: forward then leaves y unwritten and backward still
    gives x its gradient.
    """

    output_unused = False

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, quant_type: str = "nf4",
                 blocksize: int = 64, double_quant: bool = True, compute_dtype: torch.dtype = torch.bfloat16,
                 weight_dtype: torch.dtype = torch.bfloat16, quant_storage: torch.dtype = torch.uint8, device=None):
        super().__init__()
        quant.check_quant_type(quant_type)
        quant.check_blocksize(blocksize)
        quant.check_quant_storage(quant_storage)
        if compute_dtype not in quant.FLOAT_DTYPES:
            raise ValueError(f"compute_dtype must be float32, float16 or bfloat16, got {compute_dtype}")
        self.in_features, self.out_features = in_features, out_features
        self.quant_type, self.blocksize, self.compute_dtype = quant_type, blocksize, compute_dtype
        self.weight_dtype = weight_dtype            # dtype of the original weight; dequantize() returns it
        self.nested_offset = 0.0                    # double-quant offset (a float32 value), see quant.QuantState
        n = in_features * out_features
        n_blocks = -(-n // blocksize)
        packed = quant.as_storage(torch.zeros(((n + 1) // 2, 1), dtype=torch.uint8, device=device), quant_storage)
        self.register_buffer("weight", packed)
        self.register_buffer("weight_absmax", torch.zeros(n_blocks, device=device,
                                                          dtype=torch.uint8 if double_quant else torch.float32))
        nested = (torch.zeros(-(-n_blocks // quant.NESTED_BLOCKSIZE), device=device),
                  quant.DYNAMIC_SIGNED.to(device, copy=True)) if double_quant else (None, None)
        self.register_buffer("weight_nested_absmax", nested[0])
        self.register_buffer("weight_nested_map", nested[1])
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=weight_dtype, device=device),
                                 requires_grad=False) if bias else None

    # -- construction -----------------------------------------------------------------------------------------

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str = "nf4", double_quant: bool = True,
                    blocksize: int = 64, compute_dtype: torch.dtype = torch.bfloat16, device=None,
                    quant_storage: torch.dtype = torch.uint8) -> "Linear4bit":
        """Quantize an nn.Linear (on `device`, default its own device). The original module is left untouched."""
        w = linear.weight.detach()
        w = w.to(device) if device is not None else w
        mod = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, quant_type=quant_type,
                  blocksize=blocksize, double_quant=double_quant, compute_dtype=compute_dtype, weight_dtype=w.dtype,
                  quant_storage=quant_storage, device="meta")
        packed, state = ops.quantize_4bit(w, blocksize, quant_type, double_quant, quant_storage=quant_storage)
        mod.set_quantized(packed, state)
        if linear.bias is not None:
            mod.bias = nn.Parameter(linear.bias.detach().to(w.device).clone(), requires_grad=False)
        return mod

    def set_quantized(self, packed: torch.Tensor, state: QuantState) -> None:
        """Install a packed weight and its state (validated against this module's shape). The packed weight keeps
        its storage dtype when it is one of quant.STORAGE_DTYPES (other dtypes are held as their uint8 bytes), so
        a checkpoint re-saves as it was read. The double-quant map is copied: this module owns it."""
        if list(state.shape) != [self.out_features, self.in_features]:
            raise ValueError(f"quantized weight has shape {list(state.shape)}, the module expects "
                             f"[{self.out_features}, {self.in_features}]")
        if packed.dtype in quant.STORAGE_DTYPES:
            packed = packed.reshape(-1, 1)
        else:
            packed = quant.packed_bytes(packed)
        state.validate(packed)
        self.quant_type, self.blocksize, self.weight_dtype = state.quant_type, state.blocksize, state.dtype
        self.nested_offset = float(state.nested_offset)
        self._buffers["weight"] = packed
        self._buffers["weight_absmax"] = state.absmax
        self._buffers["weight_nested_absmax"] = state.nested_absmax
        self._buffers["weight_nested_map"] = None if state.nested_map is None else state.nested_map.clone()
        self._weight_args = None  # the scalars changed too (nested_offset, blocksize): rebuild (_op_args)

    def use_tiles(self, tiles: bool = True) -> bool:
        """Hold the packed bytes in the decode layout (layout.py: contiguous 1 KB chunks, 8-17 % faster fused GEMVs
        at 4-16 rows on the H200) or back in bitsandbytes' rows. The buffer is replaced, not duplicated; the bytes and
        every result stay the same, and state_dict() always saves rows (a rows copy per tiled weight while the dict
        lives: layout.use_tiles(model, False) first saves without it). Only uint8 weights on a GPU whose shape tiles
        (out_features % 16, in_features % 128) change; returns whether the weight is held in tiles now. Like any
        buffer swap, it leaves CUDA graphs captured before it reading the old buffer: build a new decode.Decoder."""
        w = self.weight
        if tiles and (w.dtype != torch.uint8 or w.device.type != "cuda"
                      or not layout.tiles_apply((self.out_features, self.in_features))):
            return layout.is_tiles(w)
        new = layout.to_tiles(w, (self.out_features, self.in_features)) if tiles else layout.to_rows(w)
        if new is not w:
            self._buffers["weight"] = new
            self._weight_args = None  # they hold the old buffer
        return tiles

    @property
    def quant_state(self) -> QuantState:
        return QuantState(absmax=self.weight_absmax, shape=torch.Size([self.out_features, self.in_features]),
                          dtype=self.weight_dtype, blocksize=self.blocksize, quant_type=self.quant_type,
                          nested_absmax=self.weight_nested_absmax, nested_map=self.weight_nested_map,
                          nested_offset=self.nested_offset)

    @property
    def quant_storage(self) -> torch.dtype:
        """The dtype the packed bytes are held (and saved) as: uint8, or a float view (bitsandbytes' quant_storage)."""
        return self.weight.dtype

    # -- compute ----------------------------------------------------------------------------------------------

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The weight (out_features, in_features) in `dtype` (default: the original weight dtype)."""
        return ops.dequantize_4bit(self.weight, self.quant_state, dtype or self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (..., in) -> (..., out). gemm_4bit decodes W to compute_dtype; autograd flows to x only.
        group = self.__dict__.get("group")  # proj_group.py: siblings in one launch (decoding), set by its caller
        if group is not None and (y := group.forward(self, x)) is not None:
            return y
        # Casts only where the dtypes differ: a no-op .to() still costs a dispatch (~1.5 µs on the CPU), and under
        # autocast x is already in compute_dtype.
        dtype = x.dtype
        xc = x if dtype == self.compute_dtype else x.to(self.compute_dtype)
        if self.output_unused and torch.is_grad_enabled():
            y = _GradInputOnly.apply(xc, self._op_args())
        else:
            y = ops.gemm_4bit_args(xc, self._op_args())
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y if y.dtype == dtype else y.to(dtype)

    def _op_args(self) -> tuple:
        """ops.weight_args of this weight: the bytes as uint8 (a float-storage weight viewed back, no copy) and the
        state's fields. Kept between calls, the weight being frozen, and keyed by the buffers' identities, so a
        buffer swapped in (register_buffer, torch.func.functional_call) makes new ones; set_quantized (hence
        load_state_dict) and _apply (.to(), .cuda(), to_empty) drop them, so they never hold a moved weight's old
        memory. Under torch.compile they are built each call, which the trace turns into constants."""
        if torch.compiler.is_compiling():
            return ops.weight_args(self.weight, self.quant_state)
        b = self._buffers
        w, absmax, nested_absmax, nested_map = (b["weight"], b["weight_absmax"], b["weight_nested_absmax"],
                                                b["weight_nested_map"])
        kept = self.__dict__.get("_weight_args")
        if (kept is not None and kept[0] is w and kept[1] is absmax and kept[2] is nested_absmax
                and kept[3] is nested_map):
            return kept[4]
        args = ops.weight_args(w, self.quant_state)
        self._weight_args = (w, absmax, nested_absmax, nested_map, args)
        return args

    def __getstate__(self) -> dict:
        # Copies (copy.deepcopy, pickling) rebuild the kept arguments from their own buffers.
        return {**self.__dict__, "_weight_args": None}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={self.quant_type}, blocksize={self.blocksize}, "
                f"double_quant={self.weight_nested_absmax is not None}, compute_dtype={self.compute_dtype}"
                + (f", quant_storage={self.quant_storage}" if self.quant_storage != torch.uint8 else ""))

    # -- moving and casting -----------------------------------------------------------------------------------

    def _apply(self, fn, recurse=True):
        """Module.to()/.half()/.cuda()/.to_empty() move the quantized buffers but never change their dtypes:
        casting float32 absmax to bf16 would silently corrupt the weight."""
        held = {k: self._buffers[k] for k in _STATE_BUFFERS if self._buffers.get(k) is not None}
        for k in held:
            self._buffers[k] = None
        super()._apply(fn, recurse)
        for k, t in held.items():
            device = fn(t[:0]).device  # where fn sends a tensor of this kind; the dtype stays
            self._buffers[k] = torch.empty_like(t, device=device) if t.is_meta else t.to(device)
        self._weight_args = None  # they would keep the old buffers alive
        return self

    # -- bitsandbytes state-dict keys -------------------------------------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        w = layout.to_rows(self.weight)  # a checkpoint holds bitsandbytes' bytes, whatever the layout in memory
        destination[prefix + "weight"] = w if keep_vars else w.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        for k, v in self.quant_state.to_bnb_dict(prefix + "weight").items():
            destination[k] = v if keep_vars else v.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        if key not in state_dict:
            missing_keys.append(key)
            return
        try:
            state = QuantState.from_bnb_dict(state_dict, key)
            packed = state_dict[key]
            target = self.weight.device if not self.weight.is_meta else packed.device
            self.set_quantized(packed.to(target), state.to(target))
        except (KeyError, ValueError) as e:
            error_msgs.append(f"{key}: {e}")
            return
        if self.bias is not None:
            if prefix + "bias" not in state_dict:
                missing_keys.append(prefix + "bias")
            else:
                b = state_dict[prefix + "bias"]
                if b.shape != (self.out_features,):
                    error_msgs.append(f"{prefix}bias has shape {tuple(b.shape)}, expected ({self.out_features},)")
                else:
                    self.bias = nn.Parameter(b.detach().to(self.weight.device, self.weight_dtype).clone(),
                                             requires_grad=False)
        if strict:
            ours = set(self.quant_state.to_bnb_dict(key))
            unexpected_keys.extend(k for k in state_dict if k.startswith(key + ".") and k not in ours)

    def memory_bytes(self) -> int:
        """Bytes held by the quantized weight and its state (not the bias)."""
        return sum(t.numel() * t.element_size() for k in _STATE_BUFFERS if (t := self._buffers.get(k)) is not None)

    @property
    def bits_per_param(self) -> float:
        return 8 * self.memory_bytes() / math.prod((self.out_features, self.in_features))
