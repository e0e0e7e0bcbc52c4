"""fused.py on the GPU (Triton kernels from torch.compile): each function against its eager self, and 20 QLoRA
training steps with fusion on against fusion off (same seed, dropout 0) under every checkpointing mode.

The CPU twins are in tests/test_fused.py.
"""

import pytest
import torch

from minqlora import fused
from minqlora import lora_fused
from minqlora.lora_fused import set_lora_path
from test_fused import check_against_eager
from test_lora_cuda import tiny_qlora, train_losses


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compiled_functions_equal_the_eager_ones_on_cuda(dtype):
    assert "cuda" in fused.fused_devices(), "fusion is on for CUDA tensors by default"
    fused.set_fused(True, min_elements=0)  # these tensors are far below the size where fusion pays
    try:
        check_against_eager("cuda", dtype)
    finally:
        fused.set_fused(True)


@pytest.mark.parametrize("mode", ["none", "full", "offload"])
def test_training_with_fusion_equals_training_without(mode, monkeypatch):
    monkeypatch.setattr(lora_fused, "CUDA_MIN_ROWS", 0)
    runs = []
    for on in (False, True):
        fused.set_fused(on, min_elements=0)
        try:
            model = set_lora_path(tiny_qlora(dropout=0.0, seed=0), "fused")
            model.model.offload_checkpoints = mode == "offload"
            runs.append(train_losses(model, checkpointing="none" if mode == "none" else "full"))
        finally:
            fused.set_fused(True)
    eager, fast = runs
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(eager), rtol=2e-2, atol=2e-2)
    assert fast[-1] < fast[0] - 0.1  # it learns the batch
