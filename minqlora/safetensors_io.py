"""Writing safetensors files with the permissions every other output gets.

safetensors 0.8 writes through a temporary file created with mode 0600 and renames it, so its files ignore the
umask (0600 instead of the usual 0644) while everything else minqlora writes honours it. save() writes, then gives
the file the mode the umask asks for. Leaves out reading (safetensors itself) and the atomic rename of whole
outputs (the callers').
"""

from __future__ import annotations

import os

from safetensors.torch import save_file


def umask_mode() -> int:
    """0o666 minus the process umask: the mode open() gives a new file."""
    mask = os.umask(0)  # reading the umask means setting it; restored at once
    os.umask(mask)
    return 0o666 & ~mask


def honour_umask(path) -> None:
    """Give `path` the mode open() would have: what the user's umask asks for."""
    os.chmod(path, umask_mode())


def save(tensors: dict, path, metadata: dict | None = None) -> None:
    save_file(tensors, path, metadata=metadata)
    honour_umask(path)
