"""proj_group.py and ops.gemm_4bit_group on the CPU: the group op equals one gemm_4bit per weight, groups are found
among sibling projections (LoRA bases included) and never change a result, and where they do not apply (CPU,
autograd, bias) each member runs its own forward. The one-launch CUDA path: tests/cuda/test_gemv_cuda.py.
"""

import copy

import pytest
import torch
from torch import nn

from minqlora import ops
from minqlora.linear4bit import Linear4bit
from minqlora.lora import add_lora
from minqlora.model import Llama, LlamaConfig
from minqlora.proj_group import ProjectionGroup, group_projections
from test_lora import quantize_projections, randomize_adapters

CFG = LlamaConfig(vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=32)


def tiny(lora: bool) -> Llama:
    torch.manual_seed(0)
    model = quantize_projections(Llama(CFG)).eval()
    if lora:
        add_lora(model, r=4, alpha=8)
        randomize_adapters(model)
    return model


def test_group_op_equals_gemm_4bit_per_weight():
    weights = [ops.quantize_4bit(torch.randn(n, 128), 64, "nf4", dq) for n, dq in ((40, True), (24, False))]
    x = torch.randn(2, 3, 128)
    got = ops.gemm_4bit_group(x, weights)
    for (packed, state), y in zip(weights, got):
        torch.testing.assert_close(y, ops.gemm_4bit(x, packed, state), rtol=0, atol=0)


@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
def test_groups_found_and_results_unchanged(lora):
    model = tiny(lora)
    ids = torch.randint(0, 61, (2, 5))
    with torch.no_grad():
        want = model(ids)
    group_projections(model)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    base = (lambda m: m.base_layer) if lora else (lambda m: m)
    group = base(attn.q_proj).group
    assert isinstance(group, ProjectionGroup) and group.members == [base(attn.q_proj), base(attn.k_proj),
                                                                    base(attn.v_proj)]
    assert base(mlp.gate_proj).group is base(mlp.up_proj).group is not group
    assert base(attn.o_proj).__dict__.get("group") is None and base(mlp.down_proj).__dict__.get("group") is None
    keys = set(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(ids), want, rtol=0, atol=0)  # CPU: members run their own forwards
        torch.testing.assert_close(copy.deepcopy(model)(ids), want, rtol=0, atol=0)
    assert set(model.state_dict()) == keys
    group_projections(model, False)
    assert base(attn.q_proj).group is None


def test_group_applies_only_without_autograd_on_cuda_few_rows_no_bias():
    model = tiny(False)
    group_projections(model)
    q = model.model.layers[0].self_attn.q_proj
    x = torch.randn(1, 1, 64)
    with torch.no_grad():
        assert not q.group.applies(x)  # CPU
    assert q.group.forward(q, x) is None


def test_mismatched_members_refused():
    a = Linear4bit.from_linear(nn.Linear(64, 32, bias=False))
    b = Linear4bit.from_linear(nn.Linear(128, 32, bias=False))
    with pytest.raises(ValueError, match="in_features"):
        ProjectionGroup([a, b])
