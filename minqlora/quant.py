"""The specification: 4-bit NF4/FP4 blockwise quantization, 8-bit blockwise (dynamic map) quantization, double
quantization and the bitsandbytes serialization of the result, in plain PyTorch.

Every C++ and CUDA kernel in csrc/ names the function here that it implements and must produce identical codes.
This file is written to be read, not to be fast: it runs on any device torch supports and allocates freely.
It leaves out dispatch to kernels (ops.py), modules (linear4bit.py) and files on disk (checkpoint.py).

Format facts (tables, thresholds, packing, state-dict keys) follow ../shared/reference/bnb-format.md, i.e.
bitsandbytes 0.50.2, so a tensor quantized here and one quantized by bitsandbytes are byte-identical.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from typing import Optional

import torch

from . import dynamic_maps, layout

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
QUANT_TYPES = ("nf4", "fp4")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NESTED_BLOCKSIZE = 256  # double quantization quantizes the absmax vector in blocks of 256 (QLoRA §3)
# Dtypes the packed bytes may be handed out as (bitsandbytes' quant_storage): a VIEW of the same bytes, shape
# ((n+1)//(2·itemsize), 1). FSDP1-era QLoRA checkpoints (fsdp_qlora, accelerate's FSDP recipe) store bf16, so the
# 4-bit weight has the dtype of the bf16 parameters it is sharded with.
STORAGE_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32)

# ---------------------------------------------------------------------------------------------------------------
# Code tables
# ---------------------------------------------------------------------------------------------------------------

# NF4 (QLoRA §3, "4-bit NormalFloat"): 16 values, sorted, with an exact zero at code 7. These are the canonical
# float32 constants; nf4_from_normal_quantiles() below shows where they come from.
NF4_TABLE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)

# bitsandbytes' FP4: bit 3 is the sign, bits 0..2 index the magnitudes {0, 0.0625, 8, 12, 4, 6, 2, 3} / 12.
FP4_TABLE = torch.tensor([
    0.0, 1 / 192, 2 / 3, 1.0, 1 / 3, 1 / 2, 1 / 6, 1 / 4,
    -0.0, -1 / 192, -2 / 3, -1.0, -1 / 3, -1 / 2, -1 / 6, -1 / 4,
], dtype=torch.float32)

# NF4 thresholds: float32 midpoints of adjacent table values. code = #{i : s > t_i}, so a value exactly on a
# midpoint takes the LOWER code.
NF4_THRESHOLDS = (NF4_TABLE[:-1] + NF4_TABLE[1:]) * 0.5

# FP4 thresholds on |s|, as float32. They are bitsandbytes' CUDA literals: 0.583333 is truncated there, so it is
# not exactly the midpoint of 1/2 and 2/3. The rank r = #{i : |s| > t_i} picks the r-th smallest magnitude, whose
# 3-bit pattern is FP4_RANK_TO_BITS[r].
FP4_THRESHOLDS = torch.tensor([0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333],
                              dtype=torch.float32)
FP4_RANK_TO_BITS = torch.tensor([0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011], dtype=torch.uint8)

ZERO_CODE = {"nf4": 7, "fp4": 0}  # the code of 0.0; used for all-zero blocks and the pad nibble of odd n


# The dynamic 8-bit maps (bnb-format.md §3, §6). Signed: 256 values in [-0.99297, 1], 0 at index 127; used for
# double quantization and Adam's first moment. Unsigned: 256 values in [0, 1]; Adam's second moment.
# Stored as float32 bit patterns in dynamic_maps.py (regenerating them from their recipe is fragile under rounding).
DYNAMIC_SIGNED, DYNAMIC_UNSIGNED = dynamic_maps.DYNAMIC_SIGNED, dynamic_maps.DYNAMIC_UNSIGNED


def nf4_from_normal_quantiles(offset: float = 0.9677083) -> torch.Tensor:
    """Documentation of where NF4 comes from (QLoRA §3): the table is not computed from this at run time.

    k-bit NormalFloat spaces its values at equal-probability quantiles of N(0, 1) and rescales them to [-1, 1].
    To have an exact zero (padding and zero weights must round-trip) the two halves are built separately: 8
    positive values from quantiles between `offset` and 1/2, 7 negative values likewise, plus 0. `offset` clips
    the infinite quantile at the tails. The result matches NF4_TABLE to about 1e-7; the stored constants are the
    ones bitsandbytes ships and stay canonical.
    """
    nd = statistics.NormalDist()

    def quantiles(count: int) -> list[float]:  # `count` points from `offset` down to 1/2, last (=0) dropped
        step = (offset - 0.5) / count
        return [nd.inv_cdf(offset - i * step) for i in range(count)]

    positive = quantiles(8)
    negative = [-q for q in quantiles(7)]
    values = sorted(negative + [0.0] + positive)
    top = max(abs(v) for v in values)
    return torch.tensor([v / top for v in values], dtype=torch.float32)


def code_table(quant_type: str) -> torch.Tensor:
    check_quant_type(quant_type)
    return NF4_TABLE if quant_type == "nf4" else FP4_TABLE


# ---------------------------------------------------------------------------------------------------------------
# Argument checks shared by the reference and the op wrappers
# ---------------------------------------------------------------------------------------------------------------

def check_quant_type(quant_type: str) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def check_blocksize(blocksize: int, name: str = "blocksize") -> None:
    if not isinstance(blocksize, int) or blocksize not in BLOCKSIZES:
        raise ValueError(f"{name} must be one of {BLOCKSIZES}, got {blocksize!r}")


def check_blocksize_8bit(blocksize: int, name: str = "blocksize") -> None:
    """8-bit blockwise quantization takes any positive block length, as bitsandbytes' CPU path does (its CUDA
    quantize_blockwise takes 64..4096, a subset)."""
    if not isinstance(blocksize, int) or isinstance(blocksize, bool) or blocksize < 1:
        raise ValueError(f"{name} must be a positive int, got {blocksize!r}")


def check_quant_storage(quant_storage: torch.dtype, name: str = "quant_storage") -> None:
    if quant_storage not in STORAGE_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in STORAGE_DTYPES)
        raise ValueError(f"{name} must be one of {names}, got {quant_storage!r}")


def check_float_input(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); there is nothing to quantize")


def check_finite_absmax(absmax: torch.Tensor, name: str = "x") -> None:
    """Refuse NaN/Inf input. The absmax of a block is NaN/Inf exactly when the block holds a NaN/Inf (the kernels
    propagate NaN through the max), so checking the small absmax vector is enough. One host sync."""
    if not bool(torch.isfinite(absmax).all()):
        bad = int((~torch.isfinite(absmax)).nonzero()[0])
        raise ValueError(f"{name} holds NaN or Inf (first in element block {bad}); pass allow_nonfinite=True to "
                         f"quantize it anyway (those blocks then decode to NaN)")


# ---------------------------------------------------------------------------------------------------------------
# Blockwise scaling, shared by 4-bit and 8-bit
# ---------------------------------------------------------------------------------------------------------------

def _blocks(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Flatten x row-major into float32 and cut it into rows of `blocksize`; the tail is zero-padded, which never
    changes a block's absmax. (n,) -> (ceil(n/blocksize), blocksize)."""
    flat = x.reshape(-1).float()
    pad = (-flat.numel()) % blocksize
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)


def _absmax(blocks: torch.Tensor) -> torch.Tensor:
    # amax propagates NaN, which is what check_finite_absmax relies on.
    return blocks.abs().amax(dim=1)


def _scale(blocks: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """s = x * (1/absmax) in float32, as bitsandbytes does (a reciprocal then a multiply, not a division).

    Two edge cases bitsandbytes leaves to IEEE arithmetic are pinned down here so that every block gets the
    nearest code: an all-zero block (absmax 0) scales to 0 instead of 0*inf = NaN, and a block whose absmax is so
    small that 1/absmax overflows (absmax < 2^-128, denormal) is divided instead.
    """
    inv = torch.reciprocal(absmax)
    s = blocks * inv[:, None]
    tiny = torch.isinf(inv)[:, None]
    s = torch.where(tiny, blocks / absmax[:, None], s)
    return torch.where((absmax == 0)[:, None], torch.zeros_like(s), s)


# ---------------------------------------------------------------------------------------------------------------
# 4-bit
# ---------------------------------------------------------------------------------------------------------------

def encode_4bit(s: torch.Tensor, quant_type: str) -> torch.Tensor:
    """Scaled values s in [-1, 1] (float32) -> 4-bit codes (uint8, one per element). The nearest table value,
    ties to the lower code: code = number of thresholds strictly below s (torch.bucketize, right=False)."""
    if quant_type == "nf4":
        return torch.bucketize(s, NF4_THRESHOLDS.to(s.device)).to(torch.uint8)
    rank = torch.bucketize(s.abs(), FP4_THRESHOLDS.to(s.device))
    sign = (s < 0).to(torch.uint8) << 3
    return FP4_RANK_TO_BITS.to(s.device)[rank] | sign


def pack_nibbles(codes: torch.Tensor, quant_type: str) -> torch.Tensor:
    """(n,) codes -> ((n+1)//2, 1) uint8: element 2j in the HIGH nibble, 2j+1 in the low one; odd n pads with
    the code of zero."""
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), ZERO_CODE[quant_type])])
    pairs = codes.view(-1, 2)
    return ((pairs[:, 0] << 4) | pairs[:, 1]).view(-1, 1)


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """((n+1)//2, 1) uint8 -> (n,) codes, the inverse of pack_nibbles."""
    flat = packed.reshape(-1)
    return torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[:n]


def quantize_4bit_ref(x: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4"):
    """x (any shape, fp32/fp16/bf16) -> packed ((n+1)//2, 1) uint8, absmax (ceil(n/blocksize),) float32.

    x is one flat row-major vector of n elements cut into consecutive blocks. Per block, absmax = max|x| in
    float32 (stored unrounded), s = x * (1/absmax), and each s gets the nearest table code (ties to the lower).
    An all-zero block gets the code of zero (0x77 bytes for NF4; bitsandbytes' CUDA build writes 0x00, which also
    decodes to zero).
    """
    blocks = _blocks(x, blocksize)
    absmax = _absmax(blocks)
    codes = encode_4bit(_scale(blocks, absmax), quant_type).reshape(-1)[: x.numel()]
    return pack_nibbles(codes, quant_type), absmax


def dequantize_4bit_ref(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
                        shape, dtype: torch.dtype) -> torch.Tensor:
    """packed ((n+1)//2, 1) uint8 + float32 absmax -> tensor of `shape` and `dtype`.
    x = table[code] * absmax[block], computed in float32 and rounded once to `dtype`."""
    n = math.prod(shape)
    codes = unpack_nibbles(packed, n).long()
    table = code_table(quant_type).to(packed.device)
    scale = absmax.float().repeat_interleave(blocksize)[:n]
    return (table[codes] * scale).to(dtype).reshape(shape)


# ---------------------------------------------------------------------------------------------------------------
# 8-bit blockwise with a dynamic map (double quantization, 8-bit optimizer state)
# ---------------------------------------------------------------------------------------------------------------

def map_thresholds(code_map: torch.Tensor) -> torch.Tensor:
    """float32 midpoints of a sorted 256-entry map; nearest code = #{midpoints < s} (ties to the lower code)."""
    m = code_map.float()
    return (m[:-1] + m[1:]) * 0.5


def quantize_blockwise_8bit_ref(x: torch.Tensor, code_map: torch.Tensor, blocksize: int = 256):
    """x (any shape, float) -> codes (n,) uint8 and absmax (ceil(n/blocksize),) float32.
    Per block s = x * (1/absmax); code = index of the nearest map entry (ties to the lower index)."""
    blocks = _blocks(x, blocksize)
    absmax = _absmax(blocks)
    s = _scale(blocks, absmax)
    codes = torch.bucketize(s, map_thresholds(code_map).to(s.device)).to(torch.uint8)
    return codes.reshape(-1)[: x.numel()], absmax


def dequantize_blockwise_8bit_ref(codes: torch.Tensor, absmax: torch.Tensor, code_map: torch.Tensor,
                                  blocksize: int = 256, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes (n,) uint8 -> (n,) of `dtype`: map[code] * absmax[block] in float32, rounded once."""
    n = codes.numel()
    scale = absmax.float().repeat_interleave(blocksize)[:n]
    return (code_map.float().to(codes.device)[codes.reshape(-1).long()] * scale).to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# QuantState and double quantization
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class QuantState:
    """Everything needed to decode a packed 4-bit tensor besides the packed bytes themselves.

    absmax is float32 (B,) without double quantization; with it (nested=True), absmax holds the uint8 codes (B,)
    of (absmax - nested_offset) in the signed dynamic map, scaled per 256-block by nested_absmax (float32).
    """

    absmax: torch.Tensor            # (B,) float32, or uint8 codes when nested; B = ceil(numel / blocksize)
    shape: torch.Size               # original shape, e.g. [out_features, in_features]
    dtype: torch.dtype              # original dtype; dequantize returns this
    blocksize: int = 64
    quant_type: str = "nf4"
    nested_absmax: Optional[torch.Tensor] = None   # (ceil(B/256),) float32
    nested_map: Optional[torch.Tensor] = None      # (256,) float32, the signed dynamic map
    nested_offset: float = 0.0                     # mean of the original absmax, a float32 value
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def code(self) -> torch.Tensor:
        return code_table(self.quant_type)

    def to(self, device) -> "QuantState":
        move = (lambda t: None if t is None else t.to(device))
        return QuantState(move(self.absmax), self.shape, self.dtype, self.blocksize, self.quant_type,
                          move(self.nested_absmax), move(self.nested_map), self.nested_offset, self.nested_blocksize)

    def validate(self, packed: Optional[torch.Tensor] = None, name: str = "state") -> None:
        """Check that the pieces agree with each other (and with `packed`, uint8 or a STORAGE_DTYPES view of the
        bytes); raise ValueError naming the field."""
        check_quant_type(self.quant_type)
        check_blocksize(self.blocksize, f"{name}.blocksize")
        n_blocks = -(-self.numel // self.blocksize)
        want = torch.uint8 if self.nested else torch.float32
        if self.absmax.dtype != want or self.absmax.numel() != n_blocks:
            raise ValueError(f"{name}.absmax must be {n_blocks} values of {want} for shape {list(self.shape)} and "
                             f"blocksize {self.blocksize}; got {self.absmax.numel()} of {self.absmax.dtype}")
        if self.nested:
            n2 = -(-n_blocks // self.nested_blocksize)
            if self.nested_absmax.dtype != torch.float32 or self.nested_absmax.numel() != n2:
                raise ValueError(f"{name}.nested_absmax must be {n2} float32 values, got "
                                 f"{self.nested_absmax.numel()} of {self.nested_absmax.dtype}")
            if self.nested_map is None or self.nested_map.numel() != 256:
                raise ValueError(f"{name}.nested_map must have 256 entries")
        if packed is not None:
            nbytes = (self.numel + 1) // 2
            if packed.dtype not in STORAGE_DTYPES or packed.numel() * packed.element_size() != nbytes:
                raise ValueError(f"packed weight must be {nbytes} uint8 bytes (or those bytes viewed as float16/bfloat16/"
                                 f"float32) for shape {list(self.shape)}; got {packed.numel()} of {packed.dtype}")
            if packed.device != self.absmax.device:
                raise ValueError(f"packed weight is on {packed.device} but {name}.absmax on {self.absmax.device}")

    # -- bitsandbytes state-dict format (bnb-format.md §4) ------------------------------------------------------

    def to_bnb_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        """The quantization-state keys bitsandbytes writes for `prefix` (e.g. "model.layers.0.mlp.up_proj.weight"),
        in its order. The packed weight itself is stored under `prefix` by the caller. Every tensor is the
        state's own (the two tables fresh copies), so two layers' dicts never share memory. The storage dtype of the
        packed weight (quant_storage) is not in the JSON: bitsandbytes 0.50 records it only as the dtype of the
        `prefix` tensor, and its QuantState.from_dict refuses JSON fields it does not know."""
        blob = {"quant_type": self.quant_type, "blocksize": self.blocksize,
                "dtype": str(self.dtype).removeprefix("torch."), "shape": list(self.shape)}
        out = {f"{prefix}.absmax": self.absmax, f"{prefix}.quant_map": self.code.clone()}
        if self.nested:
            blob.update(nested_blocksize=self.nested_blocksize, nested_dtype="float32",
                        nested_offset=float(self.nested_offset))
            out[f"{prefix}.nested_absmax"] = self.nested_absmax
            out[f"{prefix}.nested_quant_map"] = self.nested_map.clone()  # as bitsandbytes: never shared
        data = json.dumps(blob).encode("utf-8")
        out[f"{prefix}.quant_state.bitsandbytes__{self.quant_type}"] = torch.tensor(list(data), dtype=torch.uint8)
        return out

    @classmethod
    def from_bnb_dict(cls, sd: dict, prefix: str) -> "QuantState":
        """Read the state bitsandbytes wrote for `prefix`; raise ValueError/KeyError naming the missing or bad key."""
        blob_keys = [k for k in (f"{prefix}.quant_state.bitsandbytes__nf4", f"{prefix}.quant_state.bitsandbytes__fp4")
                     if k in sd]
        if len(blob_keys) != 1:
            raise KeyError(f"expected exactly one of '{prefix}.quant_state.bitsandbytes__nf4' / '__fp4' in the "
                           f"state dict, found {len(blob_keys)}")
        key = blob_keys[0]
        raw = sd[key]
        try:
            blob = json.loads(bytes(raw.to(torch.uint8).tolist()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"'{key}' does not hold valid UTF-8 JSON: {e}") from None
        if not isinstance(blob, dict):
            raise ValueError(f"'{key}' must hold a JSON object, got {type(blob).__name__}")
        for field in ("quant_type", "blocksize", "dtype", "shape"):
            if field not in blob:
                raise ValueError(f"'{key}' lacks the field {field!r}")
        if blob["quant_type"] != key.rsplit("__", 1)[1]:
            raise ValueError(f"'{key}' says quant_type {blob['quant_type']!r}, which contradicts its key name")
        dtype = getattr(torch, str(blob["dtype"]), None)
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"'{key}' has unsupported dtype {blob['dtype']!r}")
        if not (isinstance(blob["shape"], list) and all(isinstance(d, int) and d > 0 for d in blob["shape"])):
            raise ValueError(f"'{key}' has an invalid shape {blob['shape']!r}")

        def need(name: str) -> torch.Tensor:
            if f"{prefix}.{name}" not in sd:
                raise KeyError(f"missing key '{prefix}.{name}' in the state dict")
            return sd[f"{prefix}.{name}"]

        nested = "nested_offset" in blob
        state = cls(absmax=need("absmax").reshape(-1), shape=torch.Size(blob["shape"]), dtype=dtype,
                    blocksize=blob["blocksize"], quant_type=blob["quant_type"])
        if nested:
            state.nested_absmax = need("nested_absmax").reshape(-1)
            state.nested_map = need("nested_quant_map").reshape(-1).float()
            state.nested_offset = float(blob["nested_offset"])
            state.nested_blocksize = int(blob.get("nested_blocksize", NESTED_BLOCKSIZE))
            if state.nested_blocksize not in BLOCKSIZES:
                raise ValueError(f"'{key}' has invalid nested_blocksize {state.nested_blocksize}")
        quant_map = need("quant_map").reshape(-1).float()
        if not torch.equal(quant_map.cpu(), state.code):
            raise ValueError(f"'{prefix}.quant_map' is not the standard {state.quant_type} table")
        state.validate(name=prefix)
        return state


def packed_bytes(t: torch.Tensor) -> torch.Tensor:
    """Packed 4-bit weights as uint8 ((n+1)//2, 1), or layout.py's decode tiles as they are. Some writers
    (bnb_4bit_quant_storage) store the bytes in a float dtype: reinterpret the bytes, never convert the values."""
    if t.dtype != torch.uint8:
        t = t.contiguous().view(-1).view(torch.uint8)
    elif t.dim() == 2 and t.shape[1] == 1 or layout.is_tiles(t):
        return t  # already the layout (the usual case), or the decode tiles (layout.py): no view to make
    return t.reshape(-1, 1)


def as_storage(packed: torch.Tensor, quant_storage: torch.dtype) -> torch.Tensor:
    """uint8 packed bytes ((n+1)//2, 1) viewed as `quant_storage`: ((n+1)//(2·itemsize), 1), the same memory.

    A view, never a value conversion: a float32 view of packed nibbles holds NaN and denormal bit patterns that
    any float arithmetic (or NaN canonicalisation) would change, so nothing may compute on it; packed_bytes() views
    it back. The byte count must be a multiple of the itemsize (bitsandbytes' shape formula would drop the tail).
    """
    check_quant_storage(quant_storage)
    if quant_storage == torch.uint8:
        return packed
    size = quant_storage.itemsize
    if packed.numel() % size:
        raise ValueError(f"quant_storage={str(quant_storage).removeprefix('torch.')} needs the packed byte count, "
                         f"(numel + 1) // 2 = {packed.numel()}, to be a multiple of {size}; use uint8 storage")
    return packed.reshape(-1).view(quant_storage).reshape(-1, 1)


def absmax_offset(absmax: torch.Tensor) -> torch.Tensor:
    """The double-quantization offset: the float32 mean of the absmax vector, computed by torch exactly as
    bitsandbytes does so offsets agree bit for bit. When absmax values near the float32 maximum make that sum
    overflow, the mean is taken in float64 instead (bitsandbytes would store inf and decode garbage)."""
    offset = absmax.mean()
    if not torch.isfinite(offset) and bool(torch.isfinite(absmax).all()):
        offset = absmax.double().mean().float()
    return offset


def double_quantize_ref(absmax: torch.Tensor, nested_blocksize: int = NESTED_BLOCKSIZE):
    """QLoRA §3 double quantization of the float32 absmax vector: subtract its mean, then 8-bit blockwise
    quantization with the signed dynamic map. Returns (codes uint8, nested_absmax float32, offset float)."""
    offset = absmax_offset(absmax)
    codes, absmax2 = quantize_blockwise_8bit_ref(absmax - offset, DYNAMIC_SIGNED, nested_blocksize)
    return codes, absmax2, float(offset)


def decode_absmax_ref(state: QuantState) -> torch.Tensor:
    """The float32 absmax a 4-bit decode uses: stored directly, or map[code] * absmax2 + offset with the
    product and the sum each rounded to float32 (two roundings, no fused multiply-add)."""
    if not state.nested:
        return state.absmax.float()
    scaled = dequantize_blockwise_8bit_ref(state.absmax, state.nested_absmax, state.nested_map,
                                           state.nested_blocksize)
    return scaled + torch.tensor(state.nested_offset, dtype=torch.float32, device=scaled.device)


def quantize_ref(x: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = True,
                 quant_storage: torch.dtype = torch.uint8):
    """The whole public quantize in reference form: (packed, QuantState); packed viewed as quant_storage."""
    packed, absmax = quantize_4bit_ref(x, blocksize, quant_type)
    state = QuantState(absmax, x.shape, x.dtype, blocksize, quant_type)
    if double_quant:
        state.absmax, state.nested_absmax, state.nested_offset = double_quantize_ref(absmax)
        state.nested_map = DYNAMIC_SIGNED.to(x.device, copy=True)  # each state its own table (it is saved per layer)
    return as_storage(packed, quant_storage), state


def dequantize_ref(packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """Inverse of quantize_ref; packed may be uint8 or any STORAGE_DTYPES view of the bytes."""
    return dequantize_4bit_ref(packed_bytes(packed), decode_absmax_ref(state), state.blocksize, state.quant_type,
                               state.shape, state.dtype)


def max_error_bound(quant_type: str) -> float:
    """Half the widest gap between adjacent table values: the largest |s - table[code]| the nearest-code rule
    can leave, so |x - dequant(quant(x))| <= absmax * this (plus float rounding of the products)."""
    table = torch.sort(code_table(quant_type)).values
    return float((table[1:] - table[:-1]).max()) / 2
