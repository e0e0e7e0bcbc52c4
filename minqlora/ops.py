"""The only file that touches torch.ops.minqlora: typed wrappers around the compiled ops, their fake (meta)
implementations for torch.compile, and the public quantize/dequantize API (gemm_4bit's autograd is C++:
csrc/gemm_autograd.cpp).

The arithmetic lives in csrc/ (kernels) and quant.py (the specification); this file checks arguments in Python
so bad input fails with a ValueError naming the argument before any kernel runs.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _C  # noqa: F401  (loading the library registers the ops)
from . import quant
from .quant import QuantState

_ops = torch.ops.minqlora


# ---------------------------------------------------------------------------------------------------------------
# Fake implementations: output shapes and dtypes only, so torch.compile(fullgraph=True) can trace the ops.
# ---------------------------------------------------------------------------------------------------------------

@torch.library.register_fake("minqlora::quantize_4bit")
def _(x, blocksize, quant_type):
    n = x.numel()
    return (x.new_empty(((n + 1) // 2, 1), dtype=torch.uint8),
            x.new_empty(((n + blocksize - 1) // blocksize,), dtype=torch.float32))


@torch.library.register_fake("minqlora::dequantize_4bit")
def _(packed, absmax, nested_absmax, nested_map, nested_offset, blocksize, nested_blocksize, quant_type, shape,
      dtype):
    return packed.new_empty(shape, dtype=dtype)


@torch.library.register_fake("minqlora::quantize_blockwise_8bit")
def _(x, code_map, blocksize):
    n = x.numel()
    return (x.new_empty((n,), dtype=torch.uint8), x.new_empty(((n + blocksize - 1) // blocksize,), dtype=torch.float32))


@torch.library.register_fake("minqlora::dequantize_blockwise_8bit")
def _(codes, absmax, code_map, blocksize, dtype):
    return codes.new_empty((codes.numel(),), dtype=dtype)


@torch.library.register_fake("minqlora::gemm_4bit")
def _(x, packed, absmax, nested_absmax, nested_map, nested_offset, blocksize, nested_blocksize, quant_type, shape):
    return x.new_empty((*x.shape[:-1], shape[0]))


@torch.library.register_fake("minqlora::gemv_4bit")
def _(x, packed, absmax, nested_absmax, nested_map, nested_offset, blocksize, nested_blocksize, quant_type, shape,
      rows_per_cta=0, kernel=0):
    return x.new_empty((*x.shape[:-1], shape[0]))


@torch.library.register_fake("minqlora::gemm_4bit_group")
def _(x, packed, absmax, nested_absmax, nested_map, nested_offset, blocksize, nested_blocksize, quant_type,
      out_features):
    return [x.new_empty((*x.shape[:-1], n)) for n in out_features]


@torch.library.register_fake("minqlora::gemm_4bit_grad_input")
def _(grad_y, packed, absmax, nested_absmax, nested_map, nested_offset, blocksize, nested_blocksize, quant_type,
      shape):
    return grad_y.new_empty((*grad_y.shape[:-1], shape[1]))


@torch.library.register_fake("minqlora::rms_norm")
def _(x, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("minqlora::rms_norm_backward")
def _(grad, x, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("minqlora::rope")
def _(x, cos, sin, transpose=False):
    return torch.empty_like(x)


@torch.library.register_fake("minqlora::rope_kv_cache")
def _(q, k, v, cos, sin, k_cache, v_cache, slots):
    return torch.empty_like(q)  # k_cache and v_cache change in place (Tensor(a!) in the schema)


@torch.library.register_fake("minqlora::swiglu")
def _(gate, up):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@torch.library.register_fake("minqlora::dropout_copies")
def _(x, seed, p, copies):
    return x.new_empty((copies, *x.shape))


@torch.library.register_fake("minqlora::dropout_sum")
def _(g, seed, p):
    return g.new_empty(g.shape[1:])


@torch.library.register_fake("minqlora::swiglu_backward")
def _(grad, gate, up):
    return (torch.empty_like(gate, memory_format=torch.contiguous_format),
            torch.empty_like(up, memory_format=torch.contiguous_format))


@torch.library.register_fake("minqlora::lora_down")
def _(x, a):
    return x.new_empty((*x.shape[:-1], a.shape[0]))


@torch.library.register_fake("minqlora::lora_up_add_")
def _(ys, h, bs, scales, offsets):
    return None  # ys change in place (Tensor(a!)[] in the schema)


# gemm_4bit's autograd (grad_x = grad_y · dequant(W); the frozen weight gets no gradient) is registered in C++ at
# the Autograd key, csrc/gemm_autograd.cpp: a Python formula here cost more per call than a bf16 F.linear.


# ---------------------------------------------------------------------------------------------------------------
# Typed wrappers over the raw ops (argument checks in Python, names in the messages)
# ---------------------------------------------------------------------------------------------------------------

def quantize_4bit_raw(x: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4"):
    """x -> (packed ((n+1)//2, 1) uint8, absmax (B,) float32). Kernel for quant.quantize_4bit_ref."""
    quant.check_float_input(x)
    quant.check_blocksize(blocksize)
    quant.check_quant_type(quant_type)
    return _ops.quantize_4bit(x, blocksize, quant_type)


def quantize_blockwise_8bit(x: torch.Tensor, code_map: torch.Tensor, blocksize: int = 256):
    """x -> (codes (n,) uint8, absmax (B,) float32). Kernel for quant.quantize_blockwise_8bit_ref.

    Any positive blocksize, as bitsandbytes' CPU path: the kernels take the powers of two 32..4096 (fixed shifts
    and vector widths), every other length runs the reference, which is exact and device-agnostic."""
    quant.check_float_input(x)
    quant.check_blocksize_8bit(blocksize)
    _check_map(code_map, x.device)
    if blocksize not in quant.BLOCKSIZES:
        return quant.quantize_blockwise_8bit_ref(x, code_map, blocksize)
    return _ops.quantize_blockwise_8bit(x, code_map, blocksize)


def dequantize_blockwise_8bit(codes: torch.Tensor, absmax: torch.Tensor, code_map: torch.Tensor,
                              blocksize: int = 256, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(codes, absmax) -> (n,) of dtype. Kernel for quant.dequantize_blockwise_8bit_ref; any positive blocksize
    (the kernels take 32..4096 powers of two, the reference the rest)."""
    quant.check_blocksize_8bit(blocksize)
    _check_map(code_map, codes.device)
    if codes.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8, got {codes.dtype}")
    if absmax.dtype != torch.float32 or absmax.numel() != -(-codes.numel() // blocksize):
        raise ValueError(f"absmax must be {-(-codes.numel() // blocksize)} float32 values for {codes.numel()} codes "
                         f"in blocks of {blocksize}; got {absmax.numel()} of {absmax.dtype}")
    if dtype not in quant.FLOAT_DTYPES:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    if blocksize not in quant.BLOCKSIZES:
        return quant.dequantize_blockwise_8bit_ref(codes, absmax, code_map, blocksize, dtype)
    return _ops.dequantize_blockwise_8bit(codes, absmax, code_map, blocksize, dtype)


def _check_map(code_map: torch.Tensor, device: torch.device) -> None:
    if code_map.dtype != torch.float32 or code_map.numel() != 256:
        raise ValueError(f"code_map must be 256 float32 values, got {code_map.numel()} of {code_map.dtype}")
    if code_map.device != device:
        raise ValueError(f"code_map is on {code_map.device} but the data is on {device}")


def _state_args(state: QuantState):
    """The QuantState fields in the order the 4-bit ops take them, after packed."""
    return (state.absmax, state.nested_absmax, state.nested_map, float(state.nested_offset), state.blocksize,
            state.nested_blocksize, state.quant_type, list(state.shape))


def weight_args(packed: torch.Tensor, state: QuantState) -> tuple:
    """(packed as uint8 bytes, *the state's fields): every argument of the 4-bit ops after x, for a caller that
    keeps them across calls (Linear4bit: its weight is frozen) and calls gemm_4bit_args."""
    return (quant.packed_bytes(packed), *_state_args(state))


# ---------------------------------------------------------------------------------------------------------------
# The public API (re-exported by minqlora/__init__.py)
# ---------------------------------------------------------------------------------------------------------------

def quantize_4bit(x: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = True,
                  allow_nonfinite: bool = False, quant_storage: torch.dtype = torch.uint8):
    """Quantize x (any shape, fp32/fp16/bf16) to 4 bits: returns (packed, QuantState).

    packed is ((n+1)//2, 1) uint8, two codes per byte, in bitsandbytes' layout; quant_storage=torch.bfloat16
    (float16, float32) hands the same bytes out as a view of that dtype, ((n+1)//(2·itemsize), 1), as
    bitsandbytes' quant_storage does (quant.as_storage). With double_quant, the float32 absmax vector is itself
    quantized to 8 bits (QLoRA §3), 4.127 instead of 4.5 bits per parameter. NaN/Inf in x raise ValueError unless
    allow_nonfinite=True.
    """
    quant.check_quant_storage(quant_storage)
    packed, absmax = quantize_4bit_raw(x, blocksize, quant_type)
    packed = quant.as_storage(packed, quant_storage)
    if not allow_nonfinite:
        quant.check_finite_absmax(absmax)
    state = QuantState(absmax=absmax, shape=x.shape, dtype=x.dtype, blocksize=blocksize, quant_type=quant_type)
    if double_quant:
        state.absmax, state.nested_absmax, state.nested_map, state.nested_offset = double_quantize(absmax)
    return packed, state


def double_quantize(absmax: torch.Tensor):
    """QLoRA §3 on a float32 absmax vector (B,): (codes (B,) uint8, nested_absmax float32, nested_map (256,),
    offset float). Same steps as quant.double_quantize_ref; the mean is torch's, as bitsandbytes', so offsets agree
    exactly. The map is a fresh copy: each state (layer) owns its table."""
    offset = quant.absmax_offset(absmax)
    codes, nested = quantize_blockwise_8bit(absmax - offset, quant.DYNAMIC_SIGNED.to(absmax.device),
                                            quant.NESTED_BLOCKSIZE)
    # float(offset): one host sync; the offset is a Python float in the bnb JSON
    return codes, nested, quant.DYNAMIC_SIGNED.to(absmax.device, copy=True), float(offset)


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Inverse of quantize_4bit: a tensor of state.shape in `dtype` (default: the original dtype). packed may be
    uint8 or a float view of the bytes (quant_storage). Double-quantized scales are decoded inside the kernel, not
    in a separate pass."""
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a QuantState, got {type(state).__name__}")
    packed = quant.packed_bytes(packed)
    state.validate(packed)
    dtype = dtype or state.dtype
    if dtype not in quant.FLOAT_DTYPES:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    return _ops.dequantize_4bit(packed, *_state_args(state), dtype)


def gemm_4bit(x: torch.Tensor, packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """y = x · dequant(W)ᵀ for W of state.shape (N, K): x (..., K) -> y (..., N), differentiable in x only.

    On CUDA, few rows of bf16/fp16 x (up to 32, csrc/cuda/gemv_ops.cpp) run the fused 4-bit kernel; on the CPU up
    to 8 rows (4 without AVX2) decode the weight a block at a time into each dot product (csrc/cpu/gemv.cpp); more
    rows and other dtypes dequantize the weight and call a matmul."""
    return gemm_4bit_args(x, weight_args(packed, state))


def gemm_4bit_args(x: torch.Tensor, args: tuple) -> torch.Tensor:
    """gemm_4bit with the weight given as weight_args(packed, state), built once: rebuilding them each call (a
    QuantState, a reshape of the bytes, a list of the shape) was a fifth of Linear4bit's Python time per forward
    (benchmarks/bench_host.py)."""
    if x.shape[-1] != args[-1][-1]:
        raise ValueError(f"x has last dimension {x.shape[-1]} but the weight has in_features {args[-1][-1]}")
    return _ops.gemm_4bit(x, *args)


def gemm_4bit_group(x: torch.Tensor, weights: list[tuple[torch.Tensor, QuantState]]) -> list[torch.Tensor]:
    """[gemm_4bit(x, packed, state) for (packed, state) in weights], equal bit for bit, in one CUDA launch for few
    rows (up to 16, two or three weights: csrc/cuda/gemv_ops.cpp); one gemm_4bit per weight otherwise. The weights
    share in_features, blocksize, nested blocksize and quant_type. Not differentiable: for decoding and eval
    (proj_group.py)."""
    if not weights:
        raise ValueError("gemm_4bit_group needs at least one (packed, state) weight")
    first = weights[0][1]
    for i, (_, st) in enumerate(weights):
        if st.shape[-1] != x.shape[-1]:
            raise ValueError(f"x has last dimension {x.shape[-1]} but weight {i} has in_features {st.shape[-1]}")
        if (st.blocksize, st.nested_blocksize, st.quant_type) != (first.blocksize, first.nested_blocksize,
                                                                  first.quant_type):
            raise ValueError(f"gemm_4bit_group: weight {i} has blocksize {st.blocksize}, nested blocksize "
                             f"{st.nested_blocksize}, {st.quant_type}; weight 0 has {first.blocksize}, "
                             f"{first.nested_blocksize}, {first.quant_type}")
    return _ops.gemm_4bit_group(
        x, [quant.packed_bytes(p) for p, _ in weights], [st.absmax for _, st in weights],
        [st.nested_absmax for _, st in weights], [st.nested_map for _, st in weights],
        [float(st.nested_offset) for _, st in weights], first.blocksize, first.nested_blocksize, first.quant_type,
        [int(st.shape[0]) for _, st in weights])


def gemv_4bit(x: torch.Tensor, packed: torch.Tensor, state: QuantState, rows_per_cta: int = 0,
              kernel: str = "auto") -> torch.Tensor:
    """The fused CUDA kernel behind gemm_4bit for few rows, called directly (tests, benchmarks): bf16/fp16 x on a
    GPU, in_features a multiple of 32 and of the blocksize, any number of rows. Not differentiable.

    rows_per_cta (a multiple of 16 up to 128; 0 = the launcher's choice) sets the CTA shape; kernel picks "ring"
    (the register ring, any M), "stream" (one token, operands streamed through shared memory; at M > 1 the ring
    runs), "stream-window" (the same with the block scales copied 8-16 chunks at a time; csrc/cuda/gemv_stream.cuh)
    or "auto" (stream-window for one token)."""
    kernels = {"auto": 0, "ring": 1, "stream": 2, "stream-window": 3}
    if kernel not in kernels:
        raise ValueError(f"gemv_4bit: kernel must be one of {sorted(kernels)}, got {kernel!r}")
    if x.shape[-1] != state.shape[-1]:
        raise ValueError(f"x has last dimension {x.shape[-1]} but the weight has in_features {state.shape[-1]}")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"gemv_4bit takes bfloat16 or float16 x, got {x.dtype}")
    if state.shape[-1] % 32 or state.shape[-1] % state.blocksize:
        raise ValueError(f"gemv_4bit needs in_features ({state.shape[-1]}) to be a multiple of 32 and of the "
                         f"blocksize ({state.blocksize}); gemm_4bit handles the rest")
    return _ops.gemv_4bit(x, quant.packed_bytes(packed), *_state_args(state), rows_per_cta, kernels[kernel])


def rope_kv_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """static_cache.rope_kv_cache_ref in one CUDA launch: returns q rotated, writes rotated k and v into the caches
    at `slots` along dim 2. CUDA only (StaticKVCache.rope_update calls it where it applies); the checks are the
    kernel's own (RuntimeError naming the argument): this runs once per layer per decode step."""
    return _ops.rope_kv_cache(q, k, v, cos, sin, k_cache, v_cache, slots)


def lora_down(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """h = x · aᵀ: x (..., K), a (R, K) of x's dtype -> h (..., R) in x's dtype, float32 accumulation. Not
    differentiable: lora_fused.LoRAGroup calls it with autograd off. On CUDA, up to 16 rows of bf16/fp16 with K a
    multiple of 8 run one few-row kernel (csrc/cuda/lora_decode.cu); anything else is x @ a.t() itself.
    The checks are the kernels' own (RuntimeError naming the argument): this runs once per group per decode step."""
    return _ops.lora_down(x, a)


def lora_up_add_(ys: list[torch.Tensor], h: torch.Tensor, bs: list[torch.Tensor], scales: list[float],
                 offsets: list[int]) -> None:
    """For each i, in place: ys[i] (M, N_i) += scales[i] · h[:, offsets[i] : offsets[i] + r_i] · bs[i]ᵀ, bs[i]
    (N_i, r_i), h (M, R), all one dtype. Not differentiable. On CUDA, up to 16 rows of bf16/fp16, up to three
    members of r <= 128, run one kernel (y read as float32, the dot in float32, one rounding, as addmm_); anything
    else is ys[i].addmm_(h_i, bs[i].t(), alpha=scales[i]) itself. Checked by the kernels (RuntimeError)."""
    _ops.lora_up_add_(ys, h, bs, scales, offsets)


# ---------------------------------------------------------------------------------------------------------------
# ---- optimizer and paging ----
# Wrappers and fakes of the AdamW step (references: optim.adamw_step_ref / adamw_step_8bit_ref) and of CUDA
# managed memory (paging="managed" in optim.PagedAdamW). The steps mutate p and the state in place and return
# nothing; their schemas mark those arguments mutable (Tensor(a!)), so torch.compile functionalizes them.
# ---------------------------------------------------------------------------------------------------------------

@torch.library.register_fake("minqlora::adamw_step_32bit")
def _(p, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step):
    return None


@torch.library.register_fake("minqlora::adamw_step_8bit")
def _(p, grad, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax, map_signed, map_unsigned, lr, beta1, beta2,
      eps, weight_decay, step):
    return None


@torch.library.register_fake("minqlora::managed_empty")
def _(size, dtype, device):
    return torch.empty(size, dtype=dtype, device=device)


@torch.library.register_fake("minqlora::prefetch_managed")
def _(t, device):
    return None


def has_cuda_kernels() -> bool:
    """Whether this build of minqlora._C holds the CUDA kernels (a CUDA torch and nvcc at build time)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("minqlora::adamw_step_32bit", "CUDA")


def _check_adamw_args(p: torch.Tensor, grad: torch.Tensor, beta1: float, beta2: float, step: int,
                      states: dict) -> None:
    """The kernels' checks (csrc/optim_checks.h), done here first so bad input raises ValueError naming the
    argument before any kernel runs. states: name -> (tensor, dtype, numel)."""
    if p.dtype not in quant.FLOAT_DTYPES or p.numel() == 0:
        raise ValueError(f"p must be a non-empty float32, float16 or bfloat16 tensor, got {p.dtype} {tuple(p.shape)}")
    if grad.dtype != p.dtype or grad.shape != p.shape or grad.device != p.device:
        raise ValueError(f"grad must match p ({p.dtype} {tuple(p.shape)} on {p.device}), got {grad.dtype} "
                         f"{tuple(grad.shape)} on {grad.device}")
    for name, (t, dtype, numel) in states.items():
        if t.dtype != dtype or t.numel() != numel or t.device != p.device:
            raise ValueError(f"{name} must be {numel} values of {dtype} on {p.device}, got {t.numel()} of {t.dtype} "
                             f"on {t.device}")
    if not all(t.is_contiguous() for t in (p, grad, *(v[0] for v in states.values()))):
        raise ValueError("p, grad and the state tensors must be contiguous")
    _check_adamw_scalars(beta1, beta2, step)


def _check_adamw_scalars(beta1: float, beta2: float, step: int) -> None:
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError(f"beta1 and beta2 must be in [0, 1), got {beta1}, {beta2}")
    if int(step) < 1:
        raise ValueError(f"step must be >= 1 (the count including this update), got {step}")


def adamw_step_32bit(p: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
                     lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int) -> None:
    """One AdamW step with float32 m, v (p any float dtype, contiguous); p, exp_avg, exp_avg_sq change in place."""
    n = p.numel()
    _check_adamw_args(p, grad, beta1, beta2, step, {"exp_avg": (exp_avg, torch.float32, n),
                                                     "exp_avg_sq": (exp_avg_sq, torch.float32, n)})
    _ops.adamw_step_32bit(p, grad, exp_avg, exp_avg_sq, float(lr), float(beta1), float(beta2), float(eps),
                          float(weight_decay), int(step))


def adamw_step_32bit_list(p: list[torch.Tensor], grad: list[torch.Tensor], exp_avg: list[torch.Tensor],
                          exp_avg_sq: list[torch.Tensor], *, lr: float, beta1: float, beta2: float, eps: float,
                          weight_decay: float, step: int) -> None:
    """adamw_step_32bit on every (p[i], grad[i], exp_avg[i], exp_avg_sq[i]) in one call (one step count and one set
    of hyperparameters). The per-tensor checks are the kernels' own (RuntimeError naming the element and the
    argument; the elements before a failing one have been updated); only the scalars are checked here."""
    _check_adamw_scalars(beta1, beta2, step)
    _ops.adamw_step_32bit_list(p, grad, exp_avg, exp_avg_sq, float(lr), float(beta1), float(beta2), float(eps),
                               float(weight_decay), int(step))


def adamw_step_8bit(p: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                    exp_avg_absmax: torch.Tensor, exp_avg_sq_absmax: torch.Tensor, map_signed: torch.Tensor,
                    map_unsigned: torch.Tensor, *, lr: float, beta1: float, beta2: float, eps: float,
                    weight_decay: float, step: int) -> None:
    """One AdamW step with m, v as uint8 codes (signed / unsigned dynamic map, blocks of 256 with float32 absmax);
    p, the codes and the absmax vectors change in place."""
    n, nb = p.numel(), -(-p.numel() // 256)
    _check_adamw_args(p, grad, beta1, beta2, step, {
        "exp_avg": (exp_avg, torch.uint8, n), "exp_avg_sq": (exp_avg_sq, torch.uint8, n),
        "exp_avg_absmax": (exp_avg_absmax, torch.float32, nb),
        "exp_avg_sq_absmax": (exp_avg_sq_absmax, torch.float32, nb),
        "map_signed": (map_signed, torch.float32, 256), "map_unsigned": (map_unsigned, torch.float32, 256)})
    _ops.adamw_step_8bit(p, grad, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax, map_signed, map_unsigned,
                         float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), int(step))


def managed_empty(size, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialized tensor in CUDA unified memory on `device`. Raises RuntimeError rather than hand out more
    managed memory than the GPU has free (checked here, then again atomically with the allocation in C++)."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"managed memory lives on a CUDA device, got {device}")
    if not has_cuda_kernels():
        raise RuntimeError("managed memory needs minqlora built with CUDA (this build has CPU kernels only)")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    size = [int(d) for d in size]
    if any(d < 0 for d in size):
        raise ValueError(f"size must be non-negative, got {size}")
    nbytes = torch.Size(size).numel() * dtype.itemsize
    free, total = torch.cuda.mem_get_info(device)
    live = _ops.managed_bytes_in_use()
    if live + nbytes > free:
        raise RuntimeError(f"refusing to allocate {nbytes} bytes of CUDA managed memory on {device}: {live} bytes are "
                           f"already allocated as managed memory and the GPU has only {free} of {total} bytes free. "
                           f"Oversubscribing unified memory can hang a shared GPU; use paging='host' (optimizer state "
                           f"in pinned host memory) instead.")
    return _ops.managed_empty(size, dtype, device)


def managed_bytes_in_use() -> int:
    """Bytes of CUDA managed memory that managed_empty has handed out and that are not yet freed (all devices)."""
    return _ops.managed_bytes_in_use() if has_cuda_kernels() else 0


def prefetch_managed(t: torch.Tensor, device) -> None:
    """Asynchronously migrate managed tensor t to `device` (a GPU, or "cpu") on the current CUDA stream; a no-op
    for ordinary device memory."""
    _ops.prefetch_managed(t, torch.device(device))
