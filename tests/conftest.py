"""Shared test setup: hypothesis profiles. "ci" (default, small and deterministic) and "thorough"
(HYPOTHESIS_PROFILE=thorough, many examples), and the cpu_fusion fixture. Input generators live in
quant_strategies.py."""

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def cpu_fusion():
    """fused.py's Functions on CPU tensors too, at every size, for one test; the previous setting afterwards."""
    from minqlora import fused

    before = fused.fused_devices()
    fused.set_fused(True, cpu=True, min_elements=0)
    yield
    fused.set_fused(bool(before), cpu="cpu" in before)
