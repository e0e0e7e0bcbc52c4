"""Counter-based dropout masks for the LoRA branch: the spec of the dropout_copies and dropout_sum ops.

Whether element i of copy c is kept is a pure function of a 64-bit seed and the index c·numel + i: a 32-bit hash
compared with round(p·2³²), so P(drop) is p rounded to a multiple of 2⁻³². Nothing of the mask lives between a
forward and its backward; the backward draws it again from the seed. lora_fused.py's branch keeps only its input x
for the backward where autograd of x·mask kept a bool mask and one dropped copy of x per adapter: 9 bytes per
element of x for q/k/v against 2 (bf16); by that count about half of what a Llama-3-8B layer keeps without
checkpointing (the measured peaks are in benchmarks/README.md). Each op is one pass, reading x once for all of a group's copies, where the
masks drawn from torch's generator took three (random int64 words, a comparison, a multiply).

The hash is Wellons' lowbias32 (an xor-shift-multiply integer mix, bias 0.17 in his avalanche measure), applied to
the index's low word keyed by the seed's low word, then again with the index's high word and the seed's high word
added. Written here on int64 tensors holding 32-bit values, every product below 2⁴⁸ (no overflow); the kernels
(csrc/cpu/dropout.cpp, csrc/cuda/dropout_kernels.cuh) compute the same bits with uint32 arithmetic.

A seed is drawn from torch's default CPU generator (draw_seed), so torch.manual_seed, torch.utils.checkpoint's
and checkpointing.py's RNG restore, and sft's resume all reproduce it.
"""

from __future__ import annotations

from typing import Sequence

import torch

MIX1, MIX2 = 0x7FEB352D, 0x846CA68B  # lowbias32's multipliers
GOLDEN = 0x9E3779B9  # keys the seed's high word apart from its low word
MASK32 = 0xFFFFFFFF


def _mul32(v, c: int):
    """v·c mod 2³² for v in [0, 2³²) (int or int64 tensor), c a 32-bit constant, as two products below 2⁴⁸."""
    return (v * (c & 0xFFFF) + (((v * (c >> 16)) & 0xFFFF) << 16)) & MASK32


def mix32(v):
    """lowbias32: v ^= v >> 16; v *= MIX1; v ^= v >> 15; v *= MIX2; v ^= v >> 16 (mod 2³²)."""
    v = v ^ (v >> 16)
    v = _mul32(v, MIX1)
    v = v ^ (v >> 15)
    v = _mul32(v, MIX2)
    return v ^ (v >> 16)


def keys(seed: int) -> tuple[int, int]:
    """The two 32-bit keys of a seed in [0, 2⁶³)."""
    if not 0 <= seed < 1 << 63:
        raise ValueError(f"dropout seed must be in [0, 2**63), got {seed}")
    return mix32(seed & MASK32), mix32((seed >> 32) ^ GOLDEN)


def threshold(p: float) -> int:
    """Elements whose hash is below this are dropped: round(p·2³²), for 0 <= p < 1."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return round(p * 2**32)


def hash_bits(seed: int, start: int, n: int, device=None) -> torch.Tensor:
    """The 32-bit hashes of indices start .. start + n - 1, as int64."""
    k1, k2 = keys(seed)
    i = torch.arange(start, start + n, dtype=torch.int64, device=device)
    return mix32((mix32((i & MASK32) ^ k1) + ((i >> 32) ^ k2)) & MASK32)


def keep_mask(seed: int, shape: Sequence[int], ps: Sequence[float], device=None) -> torch.Tensor:
    """Bool (copies, *shape): copy c keeps element i where hash(c·numel + i) >= threshold(ps[c]) (ps of length 1 or
    copies; shape[0] is copies)."""
    copies, n = shape[0], 1
    for s in shape[1:]:
        n *= s
    thr = torch.tensor([threshold(p) for p in _per_copy(ps, copies)], dtype=torch.int64, device=device)
    return (hash_bits(seed, 0, copies * n, device).view(copies, n) >= thr[:, None]).view(tuple(shape))


def _per_copy(ps: Sequence[float], copies: int) -> list[float]:
    ps = list(ps)
    if len(ps) not in (1, copies):
        raise ValueError(f"dropout: {len(ps)} probabilities for {copies} copies (give 1 or {copies})")
    return ps * copies if len(ps) == 1 else ps


def dropout_copies_ref(x: torch.Tensor, seed: int, ps: Sequence[float], copies: int) -> torch.Tensor:
    """(copies, *x.shape): x ⊙ keep_c for each copy c, in x's dtype (no 1/(1-p): the caller scales the product)."""
    keep = keep_mask(seed, (copies,) + tuple(x.shape), ps, x.device)
    return x.unsqueeze(0) * keep.to(x.dtype)


def dropout_sum_ref(g: torch.Tensor, seed: int, ps: Sequence[float]) -> torch.Tensor:
    """Σ_c g[c] ⊙ keep_c over the leading dim of g (copies, ...), summed in float32, in g's dtype: the gradient of
    dropout_copies with respect to x."""
    keep = keep_mask(seed, tuple(g.shape), ps, g.device)
    return (g.float() * keep).sum(0).to(g.dtype)


def draw_seed() -> int:
    """A fresh seed from torch's default CPU generator (63 bits)."""
    return int(torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64).item())
