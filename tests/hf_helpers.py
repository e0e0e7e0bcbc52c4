"""Shared by the tests that compare against transformers: weights with O(1) activations.

HF's init (std 0.02) gives near-zero logits, which would make every comparison trivially small; norms near 1,
matrices scaled by 1/sqrt(fan_in) and unit embeddings keep activations of order 1 through the layers.
"""

import torch


@torch.no_grad()
def unit_scale_(model: torch.nn.Module) -> torch.nn.Module:
    """Re-draw `model`'s parameters in place (from torch's global RNG) for O(1) activations; returns it."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.normal_(1.0, 0.2)
        elif p.ndim == 2:
            p.normal_(0.0, 1.0 if "embed" in name else p.shape[1] ** -0.5)
        else:
            p.normal_(0.0, 0.1)  # biases
    return model
