"""tests/cuda: the CUDA kernels against the reference (quant.py), the CPU kernels and bitsandbytes' CUDA build.

They run where a CUDA GPU is present (benchmarks/gpu.sh on the GPU machine). Without one, no file here is collected:
CI is CPU-only, and this is the project's one allowed skip. Every test collected here carries the `cuda` marker
(registered in pyproject.toml), so `pytest -m "not cuda"` also leaves them out.
"""

from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent

collect_ignore_glob = [] if torch.cuda.is_available() else ["*.py"]


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.cuda)
