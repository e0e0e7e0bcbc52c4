"""Activation checkpointing of decoder layers: the modes, and the checkpointed inputs offloaded to host memory.

A decoder layer's forward keeps about 20 activations of (B, T, H) size (more with the LoRA branches) for its
backward. The modes trade that memory for recomputation:
  "none"       keep everything: no recomputation, the most memory.
  "full"       keep only the layer input x (B, T, H); backward runs the layer's forward again first
               (torch.utils.checkpoint, non-reentrant). QLoRA trains this way.
  "selective"  as full, but the attention kernel's outputs (out (B, T, H) and its log-sum-exp (B, heads, T)) are
               kept too, so the recomputation skips attention, the one O(T²) part: about twice full's memory per
               layer for the FLOPs of 2·T·H per token per layer (at T = 2048 on the 8B shape about 4 % of the
               layer's matmuls; at T = 32768, 60 %). Built on torch's selective checkpointing
               (create_selective_checkpoint_contexts); every other op is recomputed as in full.
With offload, the kept inputs go to pinned host memory instead (Unsloth's trick): copied out on a side stream as
forward passes, copied back in backward one block ahead of use, so the copies overlap with compute. Each residual
half of a layer (attention, MLP) is then checkpointed on its own, and the MLP half, which is position-wise, runs in
pieces of mlp_tile() tokens: the recomputation holds one half's activations (one piece's, for the MLP) at a time,
whatever the depth. That is the long-context mode; the price is host memory (2 · B · T · H · 2 bytes per layer)
and PCIe traffic (16 MB per 1k tokens per layer on the 8B shape each way, hidden behind compute when prefetched).
On a CPU the "host copy" is the tensor itself (no copy), so the same code path runs and is tested there. The
recomputation of each half skips its last projection's matmul (o_proj, down_proj), whose output only enters the
residual sum: 35 % of a Llama-3-8B layer's recomputed matmul FLOPs, 5-17 % of a step (benchmarks/README.md).

The offloading path is its own autograd Function in the reentrant style (it re-runs the layer under enable_grad in
backward and calls torch.autograd.backward on it), because torch's non-reentrant checkpoint keeps its inputs in a
closure where no hook can move them. Like torch's reentrant checkpoint it works with loss.backward() but not with
torch.autograd.grad(..., inputs=params), and it restores the RNG state so dropout masks are drawn again identically.

Leaves out: offloading other saved tensors (the selective mode's attention outputs stay on the GPU), CPU-offloaded
optimizer state (optim.py pages it), per-layer mode choices.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from functools import partial

import torch
from torch.distributed.fsdp import FSDPModule
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from .linear4bit import Linear4bit

MODES = ("full", "selective", "none")
# Elements of one (tokens, intermediate) tensor per piece of the offloaded MLP half (forward and recomputation):
# 16,384 tokens × 14,336 on the Llama-3-8B shape, 8,192 × 28,672 on the 70B shapes, 470 MB in bf16 either way and
# still GEMMs large enough to run at full speed. (A fixed 16,384 tokens put 70B's pieces at 940 MB: the 48 GiB
# cap of issue 9 ran out of memory at 16k tokens on the H200.)
MLP_TILE_ELEMENTS = 16384 * 14336
# The offloaded recomputation leaves o_proj's and down_proj's outputs unwritten (_outputs_unused); off: it runs
# every projection again, for comparison (bench_step.py's "+recompute-all" configurations).
SKIP_UNUSED_OUTPUTS = True


def mlp_tile(intermediate_size: int) -> int:
    """Tokens per piece of the offloaded MLP half: MLP_TILE_ELEMENTS / intermediate size."""
    return max(1, MLP_TILE_ELEMENTS // intermediate_size)


_aten = torch.ops.aten
# The fused attention kernels SDPA dispatches to (flash / memory-efficient / cuDNN on CUDA, flash on CPU). The math
# fallback (masks on some backends) is plain matmuls and softmax, recomputed like everything else.
ATTENTION_OPS = frozenset(getattr(_aten, name).default for name in (
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_fused_attention_overrideable") if hasattr(_aten, name))


def checkpoint_mode(value) -> str:
    """"full", "selective" or "none" from a mode name or a bool (True = "full", as `gradient_checkpointing` was)."""
    if value is True:
        return "full"
    if value is False or value is None:
        return "none"
    if value not in MODES:
        raise ValueError(f"gradient checkpointing mode must be one of {MODES} (or a bool), got {value!r}")
    return value


def _keep_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


selective_contexts = partial(create_selective_checkpoint_contexts, _keep_attention)


class HostOffloader:
    """Pinned host copies of the checkpointed layer inputs of one forward pass, for the layers' backward.

    save(x) starts a device-to-host copy of x on a side stream and returns its slot; load(i) returns slot i on the
    device (waiting for its copy) and starts bringing slot i - 1 back, since backward visits the layers in reverse.
    On a CPU device the slot holds x itself.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.host: list[torch.Tensor | None] = []  # per slot: the pinned host copy (or, on a CPU, x itself)
        self.back: dict[int, torch.Tensor] = {}  # slots already copied back (or being copied) to the device
        # _OffloadedCheckpoint's anchor, one for the pass: a zero-size leaf that requires grad (it never gets one)
        self.anchor = torch.empty(0, requires_grad=True)

    def save(self, x: torch.Tensor) -> int:
        x = x.detach()
        if not self.cuda:
            self.host.append(x)
            return len(self.host) - 1
        host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # x is written by the compute stream
        with torch.cuda.stream(self.stream):
            host.copy_(x, non_blocking=True)
        x.record_stream(self.stream)  # the allocator must not hand x's memory out before the copy has read it
        self.host.append(host)
        return len(self.host) - 1

    def _bring_back(self, i: int) -> None:
        if i < 0 or i in self.back or self.host[i] is None:
            return
        with torch.cuda.stream(self.stream):  # after slot i's own device-to-host copy, on the same stream
            self.back[i] = self.host[i].to(self.device, non_blocking=True)

    def load(self, i: int) -> torch.Tensor:
        if not self.cuda:
            x, self.host[i] = self.host[i], None
            return x
        self._bring_back(i)
        x = self.back.pop(i)
        self.host[i] = None  # the pinned block returns to torch's host cache once its copies are done
        compute = torch.cuda.current_stream(self.device)
        compute.wait_stream(self.stream)
        x.record_stream(compute)
        self._bring_back(i - 1)  # overlaps with this layer's recomputation and backward
        return x


def _device_rng(device: torch.device):
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng(states, device: torch.device) -> None:
    """Restore (CPU generator state, device generator state or None) as taken by get_rng_state / _device_rng."""
    torch.set_rng_state(states[0])
    if states[1] is not None:
        torch.cuda.set_rng_state(states[1], device)


def _tiles(n: int, tile: int):
    return [slice(i, min(i + tile, n)) for i in range(0, n, tile)] if tile else [slice(0, n)]


def _run(fn, x, args, tile: int):
    """fn(x, *args), or for a position-wise fn and tile > 0, fn over `tile`-token pieces of x (B, T, H) stitched
    back together: the same values, with the intermediates of one piece alive at a time."""
    if not tile or x.shape[0] * x.shape[1] <= tile:
        return fn(x, *args)
    flat = x.reshape(-1, x.shape[-1])
    return torch.cat([fn(flat[rows], *args) for rows in _tiles(flat.shape[0], tile)]).view_as(x)


class _OffloadedCheckpoint(torch.autograd.Function):
    """y = fn(x, *args), keeping only x (in host memory) and recomputing fn in backward.

    fn is one residual half of a decoder layer. tile > 0 declares fn position-wise (the MLP half): forward and
    the recomputation then run it over pieces of `tile` tokens, in the same order, so dropout draws the same masks
    and backward holds one piece's activations at a time. `unused`: the half's last projection (its Linear4bit),
    whose output the recomputation leaves unwritten (_outputs_unused). `anchor` is a zero-size tensor that requires
    grad: autograd records this Function only when an input requires grad, and the first layer's input (the frozen
    embedding's output) does not; the LoRA weights that do are inside fn, out of autograd's sight here.
    """

    @staticmethod
    def forward(ctx, fn, mode: str, tile: int, unused: tuple, offloader: HostOffloader, anchor, x, *args):
        ctx.fn, ctx.tile, ctx.offloader, ctx.slot = fn, tile, offloader, offloader.save(x)
        # Layers whose outputs the recomputation leaves unwritten (_outputs_unused); none under selective caching,
        # which wants the recomputation to replay the forward's ops one for one.
        ctx.unused = unused if mode != "selective" else ()
        ctx.save_for_backward(*args)
        kind = x.device.type
        ctx.autocast = (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        ctx.rng = (torch.get_rng_state(), _device_rng(x.device))
        if mode == "selective":
            # Grad mode on, as in the recomputation, so SDPA picks the same kernel and the cached outputs fit its
            # backward; nothing is saved for autograd here (the graph is dropped on return).
            caching, ctx.cached = selective_contexts()
            with torch.enable_grad(), caching, torch.autograd.graph.saved_tensors_hooks(_drop, _dropped):
                y = _run(fn, x.detach(), args, tile)
        else:
            ctx.cached = None
            y = _run(fn, x, args, tile)  # grad mode is off inside forward: nothing is recorded
        return y.detach()

    @staticmethod
    def backward(ctx, grad_y):
        args = ctx.saved_tensors
        x = ctx.offloader.load(ctx.slot)  # detached (save), so requires_grad_ below marks no tensor of the forward
        need_x = ctx.needs_input_grad[6]  # the first layer's input needs no gradient
        kind, autocast_on, autocast_dtype = ctx.autocast
        tokens = x.shape[0] * x.shape[1]  # x (B, T, H), as _run
        if ctx.tile and tokens > ctx.tile:
            flat, grad_flat = x.reshape(-1, x.shape[-1]), grad_y.reshape(-1, x.shape[-1])
            pieces = [(flat[rows], grad_flat[rows], rows) for rows in _tiles(tokens, ctx.tile)]
            grad_x = torch.empty_like(x) if need_x else None
        else:
            pieces, grad_x = [(x, grad_y, None)], None
        # The forward's RNG state for the recomputation (the same dropout seeds), and this one's back afterwards: what
        # torch.random.fork_rng does, less its per-call device lookups (a few µs per half layer, issue 8).
        states = (torch.get_rng_state(), _device_rng(x.device))
        try:
            _set_rng(ctx.rng, x.device)
            for piece, grad, rows in pieces:
                piece = piece.detach().requires_grad_(need_x)
                with torch.enable_grad(), torch.autocast(kind, dtype=autocast_dtype, enabled=autocast_on), \
                        ctx.cached or nullcontext(), _outputs_unused(ctx.unused):
                    y = ctx.fn(piece, *args)
                if y.requires_grad:  # LoRA gradients accumulate into .grad here, piece by piece
                    torch.autograd.backward(y, grad)
                if need_x and rows is not None:
                    grad_x.view(-1, x.shape[-1])[rows] = piece.grad
                elif need_x:
                    grad_x = piece.grad
        finally:
            _set_rng(states, x.device)
        return (None,) * 6 + (grad_x,) + (None,) * len(args)


def _drop(t):
    return None


def _dropped(_):
    raise RuntimeError("checkpointing: a tensor dropped in the offloaded forward was needed (backward recomputes)")


def checkpoint_layer(layer, x: torch.Tensor, cos, sin, mask, *, mode: str = "full",
                     offloader: HostOffloader | None = None) -> torch.Tensor:
    """A decoder layer (model.DecoderLayer) under checkpointing `mode` ("full" or "selective").

    Without an offloader: torch's checkpoint of the whole layer. With one (one per forward pass): each residual
    half checkpointed on its own, its input kept in host memory, the MLP half in mlp_tile()-token pieces, so the
    recomputation holds at most one half's activations (of one piece, for the MLP) at a time.
    """
    if offloader is None:
        context_fn = selective_contexts if mode == "selective" else _no_contexts
        return checkpoint(layer, x, cos, sin, mask, use_reentrant=False, context_fn=context_fn)
    if isinstance(layer, FSDPModule):
        # The halves are called as methods, past the module call where FSDP2 gathers the layer's shards.
        raise ValueError("offloaded checkpoints do not combine with FSDP2 (--parallel fsdp2); use DDP or leave "
                         "offload_checkpoints off")
    anchor = offloader.anchor
    o_proj, down_proj = (_frozen_4bit(m) if SKIP_UNUSED_OUTPUTS else () for m in layer.output_projections())
    x = _OffloadedCheckpoint.apply(layer.attention_block, mode, 0, o_proj, offloader, anchor, x, cos, sin, mask)
    tile = mlp_tile(layer.mlp.down_proj.in_features)
    return _OffloadedCheckpoint.apply(layer.mlp_block, "full", tile, down_proj, offloader, anchor, x)


def _frozen_4bit(module) -> tuple:
    """(the Linear4bit under module,) — itself or a LoRALinear's base layer — or () for any other layer."""
    base = getattr(module, "base_layer", module)
    return (base,) if isinstance(base, Linear4bit) else ()


@contextmanager
def _outputs_unused(layers: tuple):
    """Linear4bit.output_unused on `layers` for the length of the block. A half's recomputation needs every op's
    saved inputs but not the value of its last projection, which only enters the residual sum. Skipping that GEMM
    (and at many rows its weight's dequantization) saves o_proj + down_proj: 75.5M of the 218M weights of a
    Llama-3-8B layer, so about 35 % of the recomputation's matmul FLOPs. The gradients are the same bits: backward
    reads no forward value there."""
    for m in layers:
        m.output_unused = True
    try:
        yield
    finally:
        for m in layers:
            m.output_unused = False


def _no_contexts():
    return nullcontext(), nullcontext()
