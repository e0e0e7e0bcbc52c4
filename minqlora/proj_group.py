"""Sibling 4-bit projections in one launch: q/k/v of an attention block, gate/up of an MLP, at few rows.

A decode step multiplies one token by every weight of the model, and the small ones cost mostly their launch and
its tail: on the H200, one M=1 GEMV of a 1024x4096 k or v weight (2 MB, ~0.5 µs of HBM) took ~5 µs, a 4096x4096 one
7.3 µs. model.py's Attention calls q_proj, k_proj and v_proj on the same x one after another (and MLP gate_proj and
up_proj), so here the first of them to run computes all of them with ops.gemm_4bit_group (one kernel launch, each
output bit for bit what its own gemm_4bit would give) and the others take their output. Like lora_fused.LoRAGroup,
this is dispatch, not a module swap: the model stays plain Llama and each Linear4bit its own module.

It applies only where it cannot change anything: no autograd (decoding, eval), not under torch.compile (inductor
does its own scheduling; decode mode "compile"), CUDA, x in the members' compute
dtype (bf16/fp16), at most ops.GROUP_MAX_ROWS rows, members without bias. Anywhere else a member runs its own
forward. group_projections(model) sets the groups up (decode.Decoder calls it); group_projections(model, False)
removes them.

Leaves out: grouping under autograd (training has many rows, where the launches do not matter), and fusing the
outputs into one tensor (members return separate tensors, as their own forwards do).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from . import ops
from .linear4bit import Linear4bit

# Projections of one block that read the same input tensor (model.py: Attention and MLP call them on one x).
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# Rows up to which the group runs as one launch (csrc/cuda/gemv_ops.cpp: the one-token and 8/16-token kernels).
GROUP_MAX_ROWS = 16


class ProjectionGroup:
    """Linear4bit layers reading one x; the first called with a new x computes every member's output.

    Outputs not yet taken are kept until their member asks for them with the same x (an identity check: decoding
    runs under inference_mode, whose tensors have no version counter); a member called again, or with another x,
    starts a new computation. Not an nn.Module and not in any state_dict."""

    def __init__(self, members: Sequence[Linear4bit]):
        members = list(members)
        first = members[0]
        for m in members[1:]:
            if (m.in_features, m.blocksize, m.quant_type) != (first.in_features, first.blocksize, first.quant_type):
                raise ValueError(f"ProjectionGroup members must share in_features, blocksize and quant_type: "
                                 f"{first!r} vs {m!r}")
        self.members = members
        self._x = None
        self._y: dict[int, torch.Tensor] = {}  # id(member) -> output not yet taken

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_x": None, "_y": {}}  # copies never carry another model's outputs

    def applies(self, x: torch.Tensor) -> bool:
        first = self.members[0]
        return (not torch.is_grad_enabled() and not torch.compiler.is_compiling() and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
                and all(m.compute_dtype == x.dtype and m.bias is None and m.weight.device == x.device
                        for m in self.members)
                and x.numel() <= GROUP_MAX_ROWS * first.in_features)

    def pending(self, member: Linear4bit, x: torch.Tensor) -> torch.Tensor | None:
        """member's output for x if the group has computed it and member has not taken it yet, else None (a
        look, not a take: member's own call still gets it from forward)."""
        return self._y.get(id(member)) if self._x is x else None

    def forward(self, member: Linear4bit, x: torch.Tensor) -> torch.Tensor | None:
        """member's output for x, or None when the group does not apply (member then runs its own forward)."""
        if self._x is x and id(member) in self._y:
            y = self._y.pop(id(member))
            if not self._y:
                self._x = None
            return y
        if not self.applies(x):
            return None
        ys = ops.gemm_4bit_group(x, [(m.weight, m.quant_state) for m in self.members])
        self._y = {id(m): y for m, y in zip(self.members, ys) if m is not member}
        self._x = x if self._y else None
        return ys[self.members.index(member)]


def _base(module: nn.Module) -> nn.Module:
    return getattr(module, "base_layer", module)  # a LoRALinear's frozen base (lora.py)


def group_projections(model: nn.Module, on: bool = True) -> nn.Module:
    """Give the sibling Linear4bit projections of every block (SIBLINGS, side by side under one parent) a shared
    ProjectionGroup, or (on=False) take them away; returns model. Other layers are left as they are."""
    for parent in model.modules():
        for names in SIBLINGS:
            mods = [_base(getattr(parent, n, None)) if hasattr(parent, n) else None for n in names]
            if not all(type(m) is Linear4bit for m in mods):
                continue
            group = ProjectionGroup(mods) if on else None
            for m in mods:
                m.group = group
    return model
