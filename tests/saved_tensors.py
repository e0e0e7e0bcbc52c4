"""What a forward pass keeps for its backward: the tensors autograd saves, counted by unique storage.

saved_bytes(fn, *args) runs fn under torch.autograd.graph.saved_tensors_hooks and adds up the bytes of every
distinct storage packed for the backward (views of one storage, such as q/k/v's transposes or two Functions saving
the same input, count once), leaving out the storages of `exclude` (parameters and buffers, which are alive anyway,
and per-forward tensors shared by every layer such as RoPE's cos/sin). It is how tests check that a layer saves what
its docstrings claim, and how the per-token numbers in lora_fused.py's docstring were measured.

Leaves out: memory that is not saved for backward (the forward's transient peaks, the outputs themselves unless
saved), and tensors a custom Function keeps on ctx instead of save_for_backward (none in minqlora do).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch


@dataclass
class Saved:
    """The storages one forward saved: total bytes and, per storage, (bytes, dtype, shape of the first view saved)."""

    bytes: int = 0
    storages: dict[int, tuple[int, torch.dtype, tuple[int, ...]]] = field(default_factory=dict)

    def table(self) -> str:
        rows = sorted(self.storages.values(), key=lambda r: -r[0])
        return "\n".join(f"{n:>12,d} B  {str(dt):<15} {list(shape)}" for n, dt, shape in rows)


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def saved_bytes(fn: Callable, *args, exclude: Iterable[torch.Tensor] = ()) -> tuple[object, Saved]:
    """(fn(*args), Saved): the distinct storages autograd packed while fn ran, minus those of `exclude`."""
    skip = {_storage_key(t) for t in exclude}
    saved = Saved()

    def pack(t: torch.Tensor):
        key = _storage_key(t)
        if key not in skip and key not in saved.storages:
            n = t.untyped_storage().nbytes()
            saved.storages[key] = (n, t.dtype, tuple(t.shape))
            saved.bytes += n
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, saved


def module_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """module's parameters and buffers: what `exclude` usually needs."""
    return [*module.parameters(), *(b for b in module.buffers() if b is not None)]
