"""The elementwise math of a Llama layer (RMSNorm, rotary embedding, SwiGLU) and its fused GPU path.

The functions rms_norm, rope_qk and swiglu are the spec: plain PyTorch, what model.py computes, run eagerly on a
CPU. In eager mode each is several passes over (tokens, width) tensors: RMSNorm casts to float32, squares, averages,
takes rsqrt, multiplies and casts back (about 8 kernels forward, 10 backward); rotate-half RoPE slices, negates,
concatenates, multiplies and adds (about 6 per tensor); SwiGLU is silu then a multiply. torch.profiler on a
Llama-3-8B-shaped QLoRA step at 4 × 2048 tokens on an H200 (benchmarks/README.md, bench_step.py --profile) put the
multiplies, adds, casts and concatenations of these ops at about 250 ms of the 566 ms of kernel time, against 339 ms
for every matmul of the step together.

call(fn, *args) is the dispatcher model.py uses. Where fusion is on for the tensor's device (CUDA by default;
set_fused, or MINQLORA_FUSED=0 to turn it off) it runs fn's autograd Function below, on one of two backends
(BACKENDS). "extension" (the default wherever minqlora was built with its CUDA kernels): the forward and the
hand-derived backward as minqlora's CUDA kernels (csrc/cuda/layer_kernels.cuh), one C++ dispatch and one launch per
op. "compile" (the default of a build without them; MINQLORA_FUSED=compile or set_fused(True, backend="compile")):
the forward is fn itself compiled by torch.compile (Inductor: one generated kernel, each tensor read and written
once), the backward the hand-derived gradient, compiled the same way; a compiled call costs the host far more, so it
takes only large tensors (MIN_FUSED_ELEMENTS). Measured on an H200 (benchmarks/README.md): the extension ties
compile at 4 × 2048 tokens and wins where compile's threshold leaves the eager ops (8B-shaped QLoRA step without
checkpointing at 2 × 1024: 10,382 tok/s against 7,708; batch-1 decode 214 tok/s against 165).
Writing the backward out (instead of letting AOTAutograd derive it) keeps the compiled functions to no-grad graphs: one variant per dtype and rank rather than one per grad mode and
requires_grad pattern, which exceeded dynamo's recompile limit in a test session, and a backward that saves only what
it needs (RoPE saves cos and sin, not q and k). Elsewhere — fusion off, a CPU, inside an outer torch.compile (which
inlines fn), under a TorchDispatchMode such as torch's selective checkpointing (whose policy must see each aten op),
or when cos/sin/weights need gradients the Functions do not give — fn runs as written. Results equal the eager ones
up to rounding: Inductor keeps float32 intermediates where eager rounds each step to bf16 (tests/test_fused.py,
tests/cuda/test_fused_cuda.py). call tags the outputs of rms_norm and swiglu with the implementation that made them
(recompute.py), so a LoRA branch reading them can run it again in its backward instead of keeping them.

Leaves out: CPUs by default (Inductor's C++ kernels cost a compile of tens of seconds on a 2-core machine, and the
CPU step is dominated by matmuls; set_fused(True, cpu=True) takes CPU tensors too, which the tests do), and fusing
across module boundaries (the residual add with the next norm), which would tie modules together.
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import recompute

# -- the spec -----------------------------------------------------------------------------------------------------


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (B, heads, T, head_dim); cos/sin (B, T, head_dim) broadcast over heads.
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def rope_qk(q, k, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_rope to queries and keys: one function, so the fused path is one kernel for both."""
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight over the last dim, normalized in fp32 and cast back to x's dtype before the weight (HF)."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


# -- the gradients, by hand (float32 inside, cast to the input dtypes) ----------------------------------------------


def _rms_norm_backward(grad, x, weight, eps: float):
    """d/dx of rms_norm: with x̂ = x·r, r = rsqrt(mean(x²) + eps) and g = grad·weight, dx = r·(g - x̂·mean(g·x̂))."""
    xf = x.float()
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    xhat = xf * r
    g = grad.float() * weight.float()
    return (r * (g - xhat * (g * xhat).mean(-1, keepdim=True))).to(x.dtype)


def _rope_backward(grad_q, grad_k, cos, sin):
    """The transpose of x ↦ x·cos + rotate_half(x)·sin: g ↦ g·cos - rotate_half(g·sin), rotate_half being
    antisymmetric (its transpose is its negation)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return tuple(g * cos - rotate_half(g * sin) for g in (grad_q, grad_k))


def _swiglu_backward(grad, gate, up):
    """silu(g) = g·σ(g), silu'(g) = σ(g)·(1 + g·(1 - σ(g))); d gate = grad·up·silu'(gate), d up = grad·silu(gate)."""
    g, u, dh = gate.float(), up.float(), grad.float()
    sig = torch.sigmoid(g)
    return (dh * u * sig * (1 + g * (1 - sig))).to(gate.dtype), (dh * g * sig).to(up.dtype)


# -- the fused path -----------------------------------------------------------------------------------------------

# Two implementations of each spec function and its gradient on the fused path (BACKENDS):
#   "extension"  minqlora's own CUDA kernels (csrc/cuda/layer_kernels.cuh, through torch.ops.minqlora): one C++
#                dispatch and one launch per op, and forward outputs that round like the eager ops. All tensor
#                arguments must share one dtype. The default where the kernels are built (module docstring).
#   "compile"    torch.compile of the Python functions above (Inductor's Triton kernels).
BACKENDS = ("compile", "extension")
_setting = os.environ.get("MINQLORA_FUSED", "auto")  # "0" turns fusion off; "auto" (or unset): default_backend()
_devices = ("cuda",) if _setting != "0" else ()  # device types that take the fused path
_backend: str | None = _setting if _setting in BACKENDS else None  # None: default_backend(), at the first call
# The smallest first argument (elements) that takes the fused path. A compiled call costs the host far more than
# an eager kernel launch (torch.profiler, 8B shape on an H200: 376 µs of CPU per fused RMSNorm call, against 9 µs
# per cudaLaunchKernel), so small steps, which the host already cannot feed fast enough, get slower: a whole QLoRA
# step (full checkpointing + offload) at 2 × 1024 tokens ran at 5,260 tok/s compiled and 5,885 eager; at 4 × 2048,
# 8,824 compiled and 7,196 eager. 8,192 tokens × 4,096 wide is the smallest compiled size measured to win. The
# extension's ops cost the host what an eager op does, so they take every size.
MIN_FUSED_ELEMENTS = {"compile": 8192 * 4096, "extension": 0}
_min_elements: int | None = None  # None: MIN_FUSED_ELEMENTS of the backend
_compiled: dict[Callable, Callable] = {}


def set_fused(on: bool, cpu: bool = False, min_elements: int | None = None, backend: str | None = None) -> None:
    """Turn the fused paths on (for CUDA tensors; with cpu=True for CPU tensors too, "compile" backend only) or off,
    for every later call, for first arguments of at least min_elements elements (None: the backend's
    MIN_FUSED_ELEMENTS). backend None: default_backend() ("compile" with cpu=True). Compiled functions stay cached."""
    global _devices, _min_elements, _backend
    if backend is None:
        backend = "compile" if cpu else default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if on and backend == "extension" and (cpu or not has_extension_kernels()):
        raise ValueError("the 'extension' backend runs minqlora's CUDA kernels: it needs a CUDA build of minqlora "
                         "(has_extension_kernels()) and CUDA tensors (cpu=False)")
    _devices = (("cuda", "cpu") if cpu else ("cuda",)) if on else ()
    _backend, _min_elements = backend, min_elements


def default_backend() -> str:
    """"extension" where minqlora was built with its CUDA kernels, else "compile"."""
    return "extension" if has_extension_kernels() else "compile"


def current_backend() -> str:
    """The backend the fused path runs on now."""
    global _backend
    if _backend is None:
        _backend = default_backend()
    return _backend


def fused_devices() -> tuple[str, ...]:
    return _devices


def has_extension_kernels() -> bool:
    from . import ops  # noqa: F401  (loads minqlora._C, which registers the ops)
    return torch._C._dispatch_has_kernel_for_dispatch_key("minqlora::rms_norm", "CUDA")


def compiled(fn: Callable) -> Callable:
    """torch.compile(fn), built once per function. fullgraph: a graph break would silently give back the eager
    kernels; dynamic: one kernel for every token count (training, tiled MLP halves, prefill and decode)."""
    c = _compiled.get(fn)
    if c is None:
        _allow_variants()
        c = _compiled[fn] = torch.compile(fn, fullgraph=True, dynamic=True)
    return c


def _allow_variants(limit: int = 64) -> None:
    """Raise dynamo's per-function recompile limit (8) to `limit`. Each of these functions meets several dtypes,
    ranks (the offloaded MLP half is tiled in 2-D pieces), strides (q/k are transposed views), eps values and the
    sizes 1 that dynamic shapes specialise on (decoding): a GPU test session compiled rms_norm more than 8 times, and
    with fullgraph=True the ninth is an error instead of a silent fall back to eager. This is process-wide."""
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"  # renamed in torch 2.6
    setattr(cfg, name, max(getattr(cfg, name), limit))


@functools.cache
def _extension_ops() -> dict[Callable, Callable]:
    ops = torch.ops.minqlora
    return {
        rms_norm: ops.rms_norm, _rms_norm_backward: ops.rms_norm_backward, swiglu: ops.swiglu,
        _swiglu_backward: ops.swiglu_backward,
        rope_qk: lambda q, k, cos, sin: (ops.rope(q, cos, sin), ops.rope(k, cos, sin)),
        _rope_backward: lambda gq, gk, cos, sin: (ops.rope(gq, cos, sin, True), ops.rope(gk, cos, sin, True)),
    }


def implementation(fn: Callable, backend: str) -> Callable:
    """fn (a spec function or its gradient) on `backend`: compiled, or the extension's op."""
    return compiled(fn) if backend == "compile" else _extension_ops()[fn]


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        ctx.save_for_backward(x, weight)
        ctx.eps, ctx.backend = eps, current_backend()  # backward runs on the forward's backend
        return implementation(rms_norm, ctx.backend)(x, weight, eps)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        return implementation(_rms_norm_backward, ctx.backend)(grad, x, weight, ctx.eps), None, None


class _RoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        ctx.backend = current_backend()
        return implementation(rope_qk, ctx.backend)(q, k, cos, sin)

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors
        return (*implementation(_rope_backward, ctx.backend)(grad_q, grad_k, cos, sin), None, None)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        ctx.backend = current_backend()
        return implementation(swiglu, ctx.backend)(gate, up)

    @staticmethod
    def backward(ctx, grad):
        return implementation(_swiglu_backward, ctx.backend)(grad, *ctx.saved_tensors)


# spec function -> (its Function, the positions of arguments that must not need gradients on the fused path)
FUSED = {rms_norm: (_RMSNorm, (1,)), rope_qk: (_RoPE, (2, 3)), swiglu: (_SwiGLU, ())}


# Spec functions whose outputs carry a recompute.Recipe: what a LoRA branch reads (norm outputs into q/k/v and gate/up,
# SwiGLU's into down_proj), cheap to run again from inputs the op's own backward keeps.
RECOMPUTABLE = (rms_norm, swiglu)


def call(fn: Callable, *args):
    """fn(*args) through its fused Function where that applies (module docstring), else fn(*args) as written; the
    outputs of RECOMPUTABLE functions tagged with the implementation that made them (recompute.tag)."""
    function, no_grad_args = FUSED[fn]
    x = args[0]
    if x.device.type not in _devices or torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return _as_written(fn, args)
    on = current_backend()
    if (x.numel() < (MIN_FUSED_ELEMENTS[on] if _min_elements is None else _min_elements)
            or (torch.is_grad_enabled() and any(args[i].requires_grad for i in no_grad_args))
            or (on == "extension" and any(isinstance(a, torch.Tensor) and a.dtype != x.dtype for a in args))):
        return _as_written(fn, args)
    out = function.apply(*args)
    return recompute.tag(out, implementation(fn, on), args) if fn in RECOMPUTABLE else out


def _as_written(fn: Callable, args: tuple):
    out = fn(*args)
    return recompute.tag(out, fn, args) if fn in RECOMPUTABLE else out
