"""The decode layout of a packed 4-bit weight: the same bytes, regrouped so the fused GEMV reads them contiguously.

bitsandbytes stores a (N, K) weight's bytes row by row: row n is K/2 bytes at n·K/2 (bnb-format.md). The fused
kernel (csrc/cuda/gemv_common.cuh) decodes chunks of 16 rows × 128 values, 64 bytes of each of 16 rows, and HBM
serves such 64-byte pieces of many rows at 2.6-3.0 TB/s where contiguous reads run at 4.2 (H200,
benchmarks/read_patterns.cu). In tiles each chunk is one contiguous kilobyte:

    tiles[i, c, r, b] = rows[16·i + r, 64·c + b]        tiles: (N/16, K/128, 16, 64) uint8

A pure permutation: nothing is added, the scales keep their order, and every op that does not read tiles itself
takes them back to rows first (csrc/common.h, rows_order). The 4-D shape is the marker: no flag travels beside it.
Checkpoints always hold rows: Linear4bit converts back when it saves (linear4bit.py). decode.Decoder puts a model's
GPU weights in tiles (use_tiles below); training reads either layout.
"""
from __future__ import annotations

import torch

TILE_ROWS, TILE_VALUES = 16, 128  # one chunk of the fused kernel: 16 output features × 128 input features


def tiles_apply(shape) -> bool:
    """Whether a weight of `shape` can be held in tiles: 2-D, N a multiple of 16 and K of 128 (every Llama
    projection); other weights stay in rows."""
    return len(shape) == 2 and min(shape) > 0 and shape[0] % TILE_ROWS == 0 and shape[1] % TILE_VALUES == 0


def is_tiles(packed: torch.Tensor) -> bool:
    return packed.dim() == 4 and tuple(packed.shape[2:]) == (TILE_ROWS, TILE_VALUES // 2)


def to_tiles(packed: torch.Tensor, shape) -> torch.Tensor:
    """bitsandbytes' bytes ((N·K/2, 1) uint8, or flat) of a (N, K) weight -> tiles (N/16, K/128, 16, 64)."""
    if is_tiles(packed):
        return packed
    n_out, k_in = int(shape[0]), int(shape[1])
    if not tiles_apply(shape):
        raise ValueError(f"a weight of shape {list(shape)} cannot be held in tiles: out_features must be a multiple "
                         f"of {TILE_ROWS} and in_features of {TILE_VALUES}")
    if packed.dtype != torch.uint8 or packed.numel() != n_out * k_in // 2:
        raise ValueError(f"packed must be {n_out * k_in // 2} uint8 bytes for shape {list(shape)}, got "
                         f"{packed.numel()} of {packed.dtype}")
    rows = packed.reshape(n_out // TILE_ROWS, TILE_ROWS, k_in // TILE_VALUES, TILE_VALUES // 2)
    return rows.transpose(1, 2).contiguous()


def to_rows(packed: torch.Tensor) -> torch.Tensor:
    """Tiles -> bitsandbytes' bytes ((N·K/2, 1) uint8); bytes already in rows are returned as they are."""
    if not is_tiles(packed):
        return packed
    return packed.transpose(1, 2).reshape(-1, 1)


def use_tiles(model: torch.nn.Module, tiles: bool = True) -> int:
    """Every Linear4bit of `model` into tiles (or back to rows, tiles=False) where it applies
    (Linear4bit.use_tiles); returns how many weights are held in tiles now."""
    from .linear4bit import Linear4bit  # linear4bit imports this module
    return sum(m.use_tiles(tiles) for m in model.modules() if isinstance(m, Linear4bit))
