"""The next-token loss without (N, vocab) logits: a linear layer and cross-entropy fused chunk by chunk.

For hidden states h (N, H), an output layer W (V, H) (+ bias b) and targets t (N,), the summed cross-entropy is

    loss = Σ_i [ lse_i − z_i[t_i] ],    z_i = h_i Wᵀ + b,    lse_i = log Σ_v exp(z_i[v])

over the rows with t_i != ignore_index. The plain path (sft.token_loss_sum) builds z for all N rows at once, in the
model dtype and again in fp32 for F.cross_entropy: 6 bytes per row per vocabulary entry, 6 GB for 8,192 tokens of a
128,256-entry vocabulary (and as much again for its gradient). Here the rows go through in chunks of `chunk`, and
each chunk's gradient is formed while its z is at hand:

    ∂loss/∂z_i = softmax(z_i) − onehot(t_i),     ∂h_i = ∂z_i W,     ∂W = Σ_i ∂z_iᵀ h_i,     ∂b = Σ_i ∂z_i

so memory is O(chunk × V) at any N, and no matmul is repeated: backward only scales the stored ∂h (N, H) (and ∂W,
∂b) by the incoming gradient. Recomputing z in backward instead would cost one more (N × H × V) matmul — about 2 %
of a Llama-3-8B step, 7 % of a SmolLM2-135M one, whose head is a fifth of its weights. The gradients are formed
only when autograd will want them (grad mode on and an input requiring grad); W gets one only when it requires it
(in QLoRA the output layer is frozen, so none is computed). The roundings are the plain path's: z in the compute
dtype, lse and softmax in fp32, ∂z cast to the compute dtype before the two matmuls (what autograd does for
logits.float()); the incoming gradient is applied after the matmuls instead of before, a difference of one
rounding of the compute dtype (none in fp32 or for a power-of-two scale).

Leaves out: label smoothing, z-loss, logit soft-capping, a 4-bit or LoRA output layer (those use the plain path),
and a vocabulary-parallel output layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .data import IGNORE_INDEX  # -100, F.cross_entropy's default: prompt and padding labels


def _chunks(hidden, weight, bias, targets, chunk: int, ignore_index: int, grads: tuple[bool, bool, bool]):
    """(Σ loss fp32 scalar, ∂h, ∂W, ∂b) for a summed loss, gradients for an incoming gradient of 1 (None where not
    in `grads`). hidden (N, H), weight (V, H), bias (V,) or None, in the compute dtype; targets (N,) int64."""
    need_h, need_w, need_b = grads
    n = hidden.shape[0]
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_h = torch.empty_like(hidden) if need_h else None
    # The weight and bias gradients add up over chunks in fp32, then take the parameter's dtype.
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        t = targets[rows]
        valid = t != ignore_index
        safe_t = t.clamp(min=0)[:, None]  # ignored rows pick column 0; masked out below
        z = F.linear(hidden[rows], weight, bias).float()  # (c, V): the compute dtype's rounding, then fp32
        lse = torch.logsumexp(z, dim=-1, keepdim=True)  # (c, 1)
        total += torch.where(valid, (lse - z.gather(1, safe_t)).squeeze(1), 0.0).sum()
        if not any(grads):
            continue
        g = z.sub_(lse).exp_()  # softmax, in place over z: (c, V) fp32
        g.scatter_add_(1, safe_t, torch.full_like(lse, -1.0))  # − onehot(t)
        g.mul_(valid[:, None])  # ignored rows: no gradient
        g = g.to(hidden.dtype)  # the rounding autograd applies when it casts logits.float()'s gradient
        if need_h:
            grad_h[rows] = g @ weight  # (c, V) @ (V, H)
        if need_w:
            grad_w += g.t() @ hidden[rows]  # (V, c) @ (c, H)
        if need_b:
            grad_b += g.sum(0, dtype=torch.float32)
    return total, grad_h, grad_w, grad_b


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of F.linear(hidden, weight, bias) against targets, `chunk` rows at a time; gradients
    are formed in forward (for an incoming gradient of 1) and scaled in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int, ignore_index: int, with_grads: bool):
        grads = tuple(with_grads and need for need in ctx.needs_input_grad[:3])
        total, grad_h, grad_w, grad_b = _chunks(hidden, weight, bias, targets, chunk, ignore_index, grads)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        grad_h = grad_h * grad_total if grad_h is not None else None  # stays in the compute dtype
        grad_w = (grad_w * grad_total).to(w_dtype) if grad_w is not None else None
        grad_b = (grad_b * grad_total).to(b_dtype) if grad_b is not None else None
        return grad_h, grad_w, grad_b, None, None, None, None


def compute_dtype(device: torch.device, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype F.linear would compute in here: autocast's when it is on for this device, else the weight's."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return param_dtype


def linear_cross_entropy(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor, chunk: int = 512,
                         ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Σ cross_entropy(head(hidden).float(), targets) over rows whose target is not ignore_index, in chunks.

    hidden (..., H) and targets (...) are flattened to N rows; head is the output nn.Linear (V, H). Returns an fp32
    scalar on hidden's device, equal to F.cross_entropy(head(hidden).float(), targets, reduction="sum",
    ignore_index=ignore_index) up to fp32 summation order, with the same dtype rules (autocast honoured).
    chunk: rows per piece; the pieces' transient memory is about chunk × V × (2 + 4 + 2) bytes.
    """
    if not isinstance(head, nn.Linear):
        raise TypeError(f"linear_cross_entropy needs the output layer as an nn.Linear, got {type(head).__name__}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int (rows per piece), got {chunk!r}")
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    if h.shape[0] != t.shape[0]:
        raise ValueError(f"hidden has {h.shape[0]} rows but targets has {t.shape[0]}")
    if h.shape[1] != head.in_features:
        raise ValueError(f"hidden width {h.shape[1]} != head.in_features {head.in_features}")
    if t.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be integer class indices, got {t.dtype}")
    dtype = compute_dtype(h.device, head.weight.dtype)
    bias = head.bias.to(dtype) if head.bias is not None else None
    # Under autocast the casts here are what F.linear would do; the Function itself then runs in `dtype`.
    weight = head.weight.to(dtype)
    h = h.to(dtype)
    with_grads = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (h, weight, bias))
    with torch.autocast(h.device.type, enabled=False):
        return _LinearCrossEntropy.apply(h, weight, bias, t.long(), chunk, ignore_index, with_grads)
