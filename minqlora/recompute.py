"""Recipes: tensors that carry how to compute them again, so a backward can redo a cheap op instead of keeping its
output.

A LoRA branch keeps its input x for A's gradient (lora_fused.py), and in a decoder layer that input is the output of
a cheap op whose own backward keeps the op's inputs already: RMSNorm's output (read by q/k/v and by gate/up; the norm
keeps its input) and SwiGLU's (read by down_proj; SwiGLU keeps gate and up). Kept by the branch as well, the same
information is stored twice: (2 · 4,096 + 14,336) values a token on the Llama-3-8B shape, 45 KB of the 139 KB a
layer without checkpointing saved in bf16 through the fused ops (tests/test_recompute.py measures it). fused.call
tags those outputs (tag); lora_fused.py's down-projection, handed a tagged x, saves the recipe's inputs (the
storages the op saved anyway, so no new bytes) and runs the op again in its backward (Replay): the same
implementation on the same inputs under the same autocast state, so the same bits as the forward's x.

A recipe is stale once its output or one of its inputs has been changed in place (their version counters moved):
recipe_of then answers None and the caller keeps x as before. Nothing is tagged while gradients are off (decoding,
evaluation) or under torch.compile (which traces fused.call's spec functions and plans its own recomputation).
Whether a branch uses a recipe is its own choice: set_lora_path(..., recompute_inputs=False) keeps x as before, the
reference the tests hold this path to.

Leaves out: recomputing anything that costs a matmul (gate, up, q, k, v come out of 4-bit projections), and what the
ops save for their own backward (fused.py's Functions decide that).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

_ATTR = "_minqlora_recipe"  # the tagged tensor's attribute: (Replay, input tensors, version counters)


@dataclass(frozen=True)
class Replay:
    """fn(*args) again, given the tensor arguments: no tensors inside, so a ctx can hold it (the tensors go through
    save_for_backward, where checkpointing's hooks see them)."""

    fn: Callable  # the implementation that ran: fused.implementation(...) or the spec function itself
    args: tuple  # fn's arguments with None at the tensor positions
    slots: tuple[int, ...]  # the positions of the tensor arguments
    autocast: tuple[str, bool, torch.dtype] | None  # (device type, on, dtype) when fn ran; None: no autocast there

    def __call__(self, tensors) -> torch.Tensor:
        args = list(self.args)
        for i, t in zip(self.slots, tensors):
            args[i] = t
        with torch.no_grad():
            if self.autocast is None:
                return self.fn(*args)
            kind, on, dtype = self.autocast
            with torch.autocast(kind, dtype=dtype, enabled=on):
                return self.fn(*args)


def tag(out: torch.Tensor, fn: Callable, args: tuple) -> torch.Tensor:
    """Mark out as fn(*args), recomputable from args; returns out. No-op where no recipe is wanted (module doc)."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return out
    slots = tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor))
    tensors = tuple(args[i] for i in slots)
    if out.is_inference() or any(t.is_inference() for t in tensors):  # inference tensors have no version counter
        return out
    kind = out.device.type
    autocast = ((kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
                if torch.amp.is_autocast_available(kind) else None)
    replay = Replay(fn, tuple(None if i in slots else a for i, a in enumerate(args)), slots, autocast)
    setattr(out, _ATTR, (replay, tensors, _versions(out, tensors)))
    return out


def recipe_of(x: torch.Tensor) -> tuple[Replay, tuple[torch.Tensor, ...]] | None:
    """(replay, its tensor inputs) when x itself was tagged (not a view or copy of it) and is still what the recipe
    computes; else None."""
    entry = getattr(x, _ATTR, None)
    if entry is None:
        return None
    replay, tensors, versions = entry
    return (replay, tensors) if _versions(x, tensors) == versions else None


def _versions(out: torch.Tensor, tensors: tuple[torch.Tensor, ...]) -> tuple[int, ...]:
    return tuple(t._version for t in (out, *tensors))

