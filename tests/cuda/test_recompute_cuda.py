"""recompute.py on the GPU: one decoder layer through each fused backend (the extension's kernels, Inductor's) saves
both norm outputs and the SwiGLU output less and computes the same output, loss and gradients, bit for bit, as the
LoRA branches that keep their inputs. The CPU twin (and the check itself) is tests/test_recompute.py."""

import pytest
import torch

from minqlora import fused
from test_recompute import check_layer


@pytest.mark.parametrize("p", [0.0, 0.05])
@pytest.mark.parametrize("backend", fused.BACKENDS)
def test_layer_saves_less_and_computes_the_same_on_cuda(backend, p):
    fused.set_fused(True, min_elements=0, backend=backend)  # the tiny layer is far below compile's threshold
    try:
        check_layer("cuda", torch.bfloat16, p, fused_ops=True)
    finally:
        fused.set_fused(True)
