"""The fast LoRA branch: dropout(x)·Aᵀ once per distinct input, in the compute dtype, with cheap dropout masks.

LoRALinear.forward (lora.py) is the readable reference: per module it casts x to the adapter dtype (float32), drops it
out with nn.Dropout and multiplies by A, then B. This file computes the same function, y = base(x) + s·dropout(x)·AᵀBᵀ,
with fewer and cheaper ops; set_lora_path(model, "fused") dispatches a model's LoRALinear layers here and
set_lora_path(model, "reference") sends them back. What changes, and why:

- Sibling layers that read the same tensor (SHARED_INPUTS: q/k/v of an attention block, gate/up of an MLP) form one
  LoRAGroup. The first of them to run computes h = dropout(x)·Aᵀ for all of them, the A matrices concatenated into
  one (Σr, in) matrix: one (N, in) x (in, Σr) matmul instead of three (or two); the others take their column slice.
  A layer with no sibling is a group of one.
- The branch runs in the compute dtype, autocast's if it is on and x's otherwise (bf16 on tensor cores / AMX in
  QLoRA), with the float32 A and B (the master weights; their gradients and the optimizer state stay float32) cast
  to it once per call. x itself is never cast to float32.
- The output is one addmm per layer, y + (s / (1 - p))·h·Bᵀ: the dropout's 1/(1 - p) rides in addmm's alpha
  instead of a pass over x.
- A dropout mask is never stored: dropout.py's counter-based mask is a hash of (seed, element index), one seed per
  group and step, so the branch's autograd Function (_DroppedDown) keeps only x for its backward and draws the mask
  again there. Autograd of x·mask kept a bool mask and a dropped copy of x per adapter (9 bytes per element of x
  for q/k/v, in bf16, against 2). Each mask pass is one kernel (dropout_copies / dropout_sum) that reads x once for
  all of a group's copies, where masks from torch's generator took three passes (random int64 words, a comparison,
  a multiply), and bernoulli_ had been 28 % of a CPU QLoRA step on an AMX Xeon.
- Nor is x itself stored when it is the output of a norm or of SwiGLU (a recompute.Recipe, tagged by fused.call):
  _DroppedDown then saves that op's inputs, which the op keeps for its own backward anyway, and runs the op again in
  the backward, bit for bit the same x. On the Llama-3-8B shape, bf16 through the fused ops, a decoder layer without
  checkpointing saved 139.6 KB a token for its backward and saves 94.6 KB (q/k/v's and gate/up's norm outputs, 4,096
  values a token each, and down_proj's 14,336-wide input no longer kept twice); set_lora_path(...,
  recompute_inputs=False) keeps x as before.
- Decoding (DECODE_KERNELS, on by default; autograd off, no dropout, up to DECODE_MAX_ROWS rows of
  bf16/fp16 on CUDA; decode_kernels_apply): the
  group's x·Aᵀ is one ops.lora_down launch and each member's h·Bᵀ is added into its base output by one
  ops.lora_up_add_ launch (csrc/cuda/lora_decode.cu), in place of a cuBLAS split-K GEMM with its reduction kernel
  (4.3 + 1.5 µs a call on the H200) and a cuBLAS addmm (2.6 µs): decoding the Llama-3-8B shape in a CUDA graph with
  r=16 on all seven projections, those took 741 + 591 µs of a 5,025 µs token (3,475 µs merged). model.py calls
  q_proj, k_proj and v_proj one after another, so a member's base output normally exists only once it is called;
  but where a proj_group.ProjectionGroup has computed the siblings' base outputs at the first call (a Decoder sets
  those up), that first member's lora_up_add_ adds every sibling's term too (LoRAGroup._siblings): 4 up-launches
  a decoder layer instead of 7. The group's lora_down needs only x, so LoRALinear.forward asks for it (start)
  before the base projection, on a side stream: in a captured graph it runs beside the base GEMV.

Dropout modes. "fused" keeps peft's math: each layer draws its own mask, so with dropout on the group's
down-projections are separate matmuls over separately dropped inputs (one mask draw for the group); with dropout 0 or
in eval mode they are one. "shared-dropout" is an option that departs from peft: one mask per distinct input, shared
by its q/k/v (or gate/up) adapters, so the down-projection is always one matmul and there are 4 masks per decoder
layer instead of 7. Each adapter still sees Bernoulli(1 - p) dropout of its input; what changes is that siblings drop
the same positions within a step. In both modes P(drop) is p rounded to a multiple of 2⁻³² (bernoulli_ on float32
rounds at 2⁻²⁴).

Leaves out: fusing the B matrices (their outputs go to different tensors), and the dropped copies themselves: they
are written once per pass and read by cuBLAS (a kernel that masks x inside the skinny matmul would not write them).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from . import dropout, ops, recompute
from .lora import LoRALinear, lora_modules

LORA_PATHS = ("fused", "shared-dropout", "reference")
# Projections of one block that always read the same input tensor (model.py: Attention and MLP call them on x).
SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# Rows of x up to which decoding runs the few-row kernels (csrc/cuda/lora_decode_launch.h: kLoraMaxRows).
DECODE_MAX_ROWS = 16
# The decode kernels (off: cuBLAS + addmm_, for comparison). On an H200 (bench_generate.py --quick, 8B shape, r=16
# on all seven projections, CUDA graph) they took the unmerged adapter from 0.70x to 0.83x the merged model's tok/s
# at batch 1 and from 0.73x to 0.77x at batch 8.
DECODE_KERNELS = True


class _DroppedDown(torch.autograd.Function):
    """h = [(x ⊙ keep_c)·A_cᵀ]_c concatenated, (N, Σr): copy c of dropout.dropout_copies for member c (copies =
    members), one copy for all (copies = 1: shared dropout, a group of one), or x·Aᵀ without dropout (copies = 0).
    Saves A and x, or instead of x the inputs of the op that made it (recipe: recompute.py), never the masks."""

    @staticmethod
    def forward(ctx, x2, a, seed: int, ps: list[float], rs: list[int], copies: int, recipe=None):
        # x2 (N, in), a (Σr, in), both in the compute dtype; recipe None or (Replay, tensors) giving x2's source
        # torch.mm, unbind and split_with_sizes are what @, [c] and split run, with fewer dispatches (module doc).
        if copies == 0:
            h = torch.mm(x2, a.t())
        else:
            xd = torch.ops.minqlora.dropout_copies(x2, seed, ps, copies)  # (copies, N, in)
            h = (torch.mm(xd[0], a.t()) if copies == 1 else
                 torch.cat([torch.mm(xc, ac.t()) for xc, ac in zip(xd.unbind(0), a.split_with_sizes(rs))], 1))
        ctx.x_shape, ctx.x_dtype = x2.shape, x2.dtype
        if recipe is None:
            ctx.replay = None
            ctx.save_for_backward(a, x2)
        else:
            ctx.replay, tensors = recipe
            ctx.save_for_backward(a, *tensors)  # storages the recipe's op saved already
        ctx.seed, ctx.ps, ctx.rs, ctx.copies = seed, ps, rs, copies
        return h

    @staticmethod
    def backward(ctx, grad_h):
        a, *kept = ctx.saved_tensors
        ops, seed, ps, rs, copies = torch.ops.minqlora, ctx.seed, ctx.ps, ctx.rs, ctx.copies
        grad_x = grad_a = None
        if ctx.needs_input_grad[1]:  # only A's gradient reads x
            x2 = kept[0] if ctx.replay is None else ctx.replay(kept).reshape(ctx.x_shape)
            x2 = x2 if x2.dtype == ctx.x_dtype else x2.to(ctx.x_dtype)
            xd = (x2,) if copies == 0 else ops.dropout_copies(x2, seed, ps, copies)  # the same masks again
        if copies <= 1:
            if ctx.needs_input_grad[1]:
                grad_a = torch.mm(grad_h.t(), xd[0])  # (Σr, in): what autograd of x2 @ a.t() computes
            if ctx.needs_input_grad[0]:
                grad_x = torch.mm(grad_h, a)
                grad_x = grad_x if copies == 0 else ops.dropout_sum(grad_x.unsqueeze(0), seed, ps)
        else:
            gs = grad_h.split_with_sizes(rs, 1)
            if ctx.needs_input_grad[1]:
                grad_a = torch.cat([torch.mm(g.t(), xc) for g, xc in zip(gs, xd.unbind(0))])
            if ctx.needs_input_grad[0]:
                per_copy = grad_h.new_empty((copies, *ctx.x_shape))  # (copies, N, in): member c's g_c·A_c, masked
                for g, ac, out in zip(gs, a.split_with_sizes(rs), per_copy.unbind(0)):
                    torch.mm(g, ac, out=out)
                grad_x = ops.dropout_sum(per_copy, seed, ps)
        return grad_x, grad_a, None, None, None, None, None


def decode_kernels_apply(x2: torch.Tensor, ps: Sequence[float]) -> bool:
    """Whether a group's branch runs the few-row decode kernels (ops.lora_down, ops.lora_up_add_): autograd off, not
    under torch.compile (inductor schedules the matmuls itself, as for proj_group.py), no dropout in effect (eval
    mode or p = 0), and x2 (N, in) on CUDA in bf16/fp16 with N <= DECODE_MAX_ROWS and in a multiple of 8 (the
    kernels' 16-byte loads), and only while DECODE_KERNELS is on. Anywhere else the branch runs cuBLAS / ATen
    matmuls as before."""
    return (DECODE_KERNELS and not torch.is_grad_enabled() and not torch.compiler.is_compiling() and x2.is_cuda
            and x2.dtype in (torch.bfloat16, torch.float16) and x2.shape[0] <= DECODE_MAX_ROWS
            and x2.shape[-1] % 8 == 0 and not any(ps))


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the branch computes in: autocast's when autocast is on for x's device, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class LoRAGroup:
    """LoRALinear layers that read one input tensor; their down-projections dropout(x)·Aᵀ are computed together.

    The first member called with a new x computes h for every unmerged member and keeps it; each member then takes
    its own h once. The kept tensors are dropped when the last member has taken its h, so nothing outlives the block's
    forward. A member called twice with the same x (or x changed in place in between) starts a new computation.
    Not an nn.Module: the members own the parameters, and the group is not in any state_dict.
    """

    def __init__(self, members: Sequence[LoRALinear], shared_dropout: bool = False, recompute_inputs: bool = True):
        members = list(members)
        first = members[0]
        for m in members[1:]:
            same = (m.in_features, m.lora_A.weight.dtype, m.lora_A.weight.device) == (
                first.in_features, first.lora_A.weight.dtype, first.lora_A.weight.device)
            if not same:
                raise ValueError(f"LoRAGroup members must share in_features, adapter dtype and device: {first!r} vs "
                                 f"{m!r}")
            if shared_dropout and m.dropout != first.dropout:
                raise ValueError(f"shared dropout needs one dropout probability per group, got {first.dropout} and "
                                 f"{m.dropout}")
        self.members, self.shared_dropout, self.recompute_inputs = members, shared_dropout, recompute_inputs
        self._x, self._version, self._grad = None, -1, False
        self._h: dict[int, tuple[torch.Tensor, float]] = {}  # id(member) -> (h (N, r), dropout scale), not yet taken
        self._cast = None  # (dtype, params, versions, A (Σr, in), {id(member): B}): kept while autograd is off
        # decode kernels (decode_kernels_apply): (h (N, Σr) of the group, {id(member): its first column of h})
        self._decode: tuple[torch.Tensor, dict[int, int]] | None = None
        # id(member) -> its base output that already holds its adapter's term (_siblings), until the member asks
        self._added: dict[int, torch.Tensor] = {}
        self._ready: torch.cuda.Event | None = None  # h computed on the side stream (start), until awaited

    def __getstate__(self) -> dict:
        # Copies (copy.deepcopy of a model) carry the members, never a half-taken h (its tensors belong to a graph)
        # nor the cast weights (they would be the original's, not the copy's).
        return {**self.__dict__, "_x": None, "_h": {}, "_cast": None, "_decode": None, "_added": {}, "_ready": None}

    def _weights(self, live: list[LoRALinear], dtype: torch.dtype, training: bool):
        """(A, Bs): the live members' A matrices concatenated, (Σr, in), and each B, in dtype; Bs is None when
        autograd is on or in training mode (forward casts B itself, so its gradient flows to the float32 master
        weight). A checkpointed training forward runs with autograd off, but its adapters change every step: kept
        copies would be rebuilt each time, after checking them (their lists cost ~10 µs a group on the CPU).

        With autograd off in eval mode (decoding, eval) they are kept between calls while the adapters are
        unchanged: every A and B is checked by identity and in-place version counter, so an optimizer step,
        load_adapter or a merge makes new ones. A decode step then runs no cast or concatenation kernels: per Llama
        decoder layer 11 kernels for seven adapters instead of 24 (a concatenation and a cast of A per group, a cast
        of each B), each a few µs at batch 1.
        (A CUDA graph captured after the first call keeps the kept tensors: build a new Decoder after changing the
        adapters in place, as for any captured weight the graph reads through a cast.)"""
        def cat_a():
            return (torch.cat([m.lora_A.weight for m in live]) if len(live) > 1 else live[0].lora_A.weight).to(dtype)

        if torch.is_grad_enabled() or training:
            self._cast = None  # training: let a kept copy go
            return cat_a(), None
        params = [p for m in live for p in (m.lora_A.weight, m.lora_B.weight)]
        versions = [_version_of(p) for p in params]
        cast = self._cast  # (dtype, params, versions, A, Bs): holding the params keeps their identities unique
        fresh = (cast is not None and cast[0] == dtype and len(cast[1]) == len(params)
                 and all(p is q for p, q in zip(cast[1], params)) and cast[2] == versions)
        if not fresh:
            cast = self._cast = (dtype, params, versions, cat_a(), {id(m): m.lora_B.weight.to(dtype) for m in live})
        return cast[3], cast[4]

    def start(self, member: LoRALinear, x: torch.Tensor) -> None:
        """Before member's base projection, with autograd off: where the decode kernels apply on a GPU, enqueue the
        group's lora_down on a side stream now, so it runs beside the base GEMV instead of after it (in a captured
        graph, two branches); forward waits for it. Nothing happens elsewhere, or when h for this x exists."""
        key = id(member)
        if not x.is_cuda or key in self._added or self._holds(key, x, False):
            return
        if decode_kernels_apply(x.reshape(-1, x.shape[-1]), [m.dropout if member.training else 0.0
                                                             for m in self.members]):
            self._down(x, member.training, side=True)

    def forward(self, member: LoRALinear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """member's output y + s·dropout(x)·Aᵀ·Bᵀ, (..., out) in y's dtype; y = member.base_layer(x)."""
        grad, key = torch.is_grad_enabled(), id(member)
        if self._added and self._added.get(key) is y:  # its term went in with a sibling's (_siblings)
            del self._added[key]
            return y
        if not self._holds(key, x, grad):
            self._down(x, member.training)
        h, keep_scale = self._h.pop(key)  # (N, r)
        if self._ready is not None:  # h is being computed on the side stream (start)
            torch.cuda.current_stream(h.device).wait_event(self._ready)
            self._ready = None
        decode = self._decode
        self._let_go_when_taken()
        b = self._b(member, h.dtype, grad)  # (out, r)
        y2 = y.reshape(-1, member.out_features)  # (N, out)
        if y2.dtype != h.dtype:  # casts only where needed: a no-op .to() costs a dispatch too (module docstring)
            y2 = y2.to(h.dtype)
        if not grad and y2.data_ptr() == y.data_ptr() and y2.dtype == y.dtype:
            # Decoding / eval: y is the base's fresh output and no graph needs it, so add in place. Out of place,
            # cuBLAS first copies y into the result: 7 device-to-device copies per decoder layer, ~0.9 µs each at
            # batch 1 (H200, 8B shape: 203 µs of a 5.3 ms token).
            if decode is not None:  # few rows on CUDA: one small kernel in place of cuBLAS's addmm (module docstring)
                full, first = decode
                ys, bs, scales, offsets = [y2], [b], [member.scaling * keep_scale], [first[key]]
                for m, ym, bm, sm in self._siblings(member, x, y2):
                    ys.append(ym), bs.append(bm), scales.append(sm), offsets.append(first[id(m)])
                ops.lora_up_add_(ys, full, bs, scales, offsets)
                return y
            return y2.addmm_(h, b.t(), alpha=member.scaling * keep_scale).view(y.shape)
        out = torch.addmm(y2, h, b.t(), alpha=member.scaling * keep_scale).view(y.shape)  # y + s/(1-p) · h Bᵀ
        return out if out.dtype == y.dtype else out.to(y.dtype)

    def _holds(self, key: int, x: torch.Tensor, grad: bool) -> bool:
        """Whether member key's h for this very x (unchanged in place, the same grad mode) is kept, not yet taken."""
        return self._x is x and key in self._h and self._version == _version_of(x) and self._grad == grad

    def _let_go_when_taken(self) -> None:
        if not self._h:
            self._x = self._decode = None  # every member has its h: let x and h go

    def _b(self, member: LoRALinear, dtype: torch.dtype, grad: bool) -> torch.Tensor:
        """member's B (out, r) in dtype: the kept cast (_weights) with autograd off, else a cast of the parameter."""
        kept = self._cast[4].get(id(member)) if self._cast is not None and not grad else None
        return kept if kept is not None and kept.dtype == dtype else member.lora_B.weight.to(dtype)

    def _siblings(self, member: LoRALinear, x: torch.Tensor, y2: torch.Tensor):
        """[(m, its base output (N, out), its B, its scale)] for the live members other than `member` whose base
        output for this x already exists, kept by their proj_group.ProjectionGroup (decoding: the group's first call
        computes every member's), so that one ops.lora_up_add_ adds all their terms: per decoder layer 4 launches
        instead of 7. Each such member's h is taken and its output remembered in _added, which it gets back as is
        when it asks (forward). Outputs of another dtype or not dense, members whose base has no such output: left
        to their own call."""
        pg = member.base_layer.__dict__.get("group")
        if pg is None:
            return []
        out = []
        for m in self.members:
            base = m.base_layer
            ym = (pg.pending(base, x) if m is not member and id(m) in self._h and base.__dict__.get("group") is pg
                  else None)
            if ym is None or ym.dtype != y2.dtype or not ym.is_contiguous():
                continue
            h, keep_scale = self._h.pop(id(m))
            self._added[id(m)] = ym
            out.append((m, ym.view(-1, m.out_features), self._b(m, h.dtype, False), m.scaling * keep_scale))
        self._let_go_when_taken()
        return out

    def _down(self, x: torch.Tensor, training: bool, side: bool = False) -> None:
        """h = dropout(x)·Aᵀ for every unmerged member, kept in self._h; with side (start), the decode kernel
        launched by _on_side_stream, self._ready marking its end."""
        self._added = {}  # a new x: outputs of an earlier one are not asked for any more
        live = [m for m in self.members if not m.merged]
        dtype = compute_dtype(x)
        x2 = x.reshape(-1, x.shape[-1])  # (N, in), N = all leading dims
        x2 = x2 if x2.dtype == dtype else x2.to(dtype)
        a, _ = self._weights(live, dtype, training)  # (Σr, in), one cast for the group (none at all while kept)
        ps = [m.dropout if training else 0.0 for m in live]
        rs = [m.r for m in live]
        # x made by a cheap op (a norm, SwiGLU) that keeps its own inputs: save those, redo the op in the backward.
        wants = self.recompute_inputs and torch.is_grad_enabled() and a.requires_grad
        recipe = recompute.recipe_of(x) if wants else None
        decode = decode_kernels_apply(x2, ps)  # implies no dropout and no recipe
        if decode and side:
            h, self._ready = _on_side_stream(ops.lora_down, x2, a)
        elif not any(ps) and recipe is None:
            h = ops.lora_down(x2, a) if decode else x2 @ a.t()  # no dropout: one matmul for the group
        elif not any(ps):
            h = _DroppedDown.apply(x2, a, 0, ps[:1], rs, 0, recipe)  # the same matmul, x not kept
        else:
            copies = 1 if self.shared_dropout or len(live) == 1 else len(live)
            h = _DroppedDown.apply(x2, a, dropout.draw_seed(), ps if len(set(ps)) > 1 else ps[:1], rs, copies, recipe)
        hs = h.split_with_sizes(rs, 1) if len(live) > 1 else (h,)  # (N, Σr) -> (N, r) per member
        self._h = {id(m): (h, 1.0 / (1.0 - p)) for m, h, p in zip(live, hs, ps)}
        self._decode = (h, {id(m): sum(rs[:i]) for i, m in enumerate(live)}) if decode else None
        self._x, self._version, self._grad = x, _version_of(x), torch.is_grad_enabled()


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _on_side_stream(fn, x2: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
    """fn(x2, a) on the device's side stream, after the work queued so far on the current one: (its output, an
    event after it). The lora_down of a group (a few µs a launch, ~2 % of the SMs' bandwidth beside a GEMV) then
    overlaps the group's base GEMV, enqueued next, instead of following it."""
    cur = torch.cuda.current_stream(x2.device)
    side = _SIDE_STREAMS.get(x2.device)
    if side is None:
        side = _SIDE_STREAMS[x2.device] = torch.cuda.Stream(x2.device)
    side.wait_stream(cur)
    with torch.cuda.stream(side):
        h = fn(x2, a)
    ready = torch.cuda.Event()
    ready.record(side)
    x2.record_stream(side)  # x2's memory must outlive the side stream's read of it
    h.record_stream(cur)  # h is read on the current stream
    return h, ready


def _version_of(x: torch.Tensor) -> int | None:
    """x's in-place version counter; None for inference tensors (torch.inference_mode), which have none: there the
    identity check alone decides whether siblings see the same x (decoding calls them back to back)."""
    return None if x.is_inference() else x._version


def set_lora_path(model: nn.Module, path: str = "fused", recompute_inputs: bool = True) -> nn.Module:
    """Route every LoRALinear of `model` through `path` (LORA_PATHS); returns model.

    "fused" and "shared-dropout" group the layers of SHARED_INPUTS that sit side by side under one parent (module
    docstring); "reference" puts LoRALinear.forward back. recompute_inputs=False makes the grouped branches keep
    their inputs for the backward instead of recomputing norm and SwiGLU outputs there (module docstring).
    """
    if path not in LORA_PATHS:
        raise ValueError(f"LoRA path must be one of {LORA_PATHS}, got {path!r}")
    mods = lora_modules(model) if not isinstance(model, LoRALinear) else {"": model}
    if not mods:
        raise ValueError(f"set_lora_path(): {type(model).__name__} has no LoRA adapters (call add_lora first)")
    for m in mods.values():
        m.group = None
    if path == "reference":
        return model
    groups: dict[tuple[str, int], list[LoRALinear]] = {}  # (parent name, SHARED_INPUTS index) -> members
    for name, m in mods.items():
        parent, _, leaf = name.rpartition(".")
        kind = next((i for i, names in enumerate(SHARED_INPUTS) if leaf in names), None)
        groups.setdefault((parent, kind) if kind is not None else (name, -1), []).append(m)
    for members in groups.values():
        group = LoRAGroup(members, shared_dropout=path == "shared-dropout", recompute_inputs=recompute_inputs)
        for m in members:
            m.group = group
    return model
