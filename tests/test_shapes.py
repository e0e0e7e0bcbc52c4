"""shapes.py: named shapes, the random-weight builder in 4 bits, and the parameter / FLOP counts."""

import pytest
import torch
from torch import nn

from minqlora import ops
from minqlora.linear4bit import Linear4bit
from minqlora.model import Llama
from minqlora.shapes import SHAPES, flops_per_token, parameter_count, random_model, shape_config


def test_tiny_is_built_in_4bit_and_runs():
    model = random_model("tiny", quantize="nf4", seed=3)
    layer = model.model.layers[0]
    for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.mlp.down_proj):
        assert isinstance(m, Linear4bit) and m.weight.dtype == torch.uint8 and m.weight_nested_absmax is not None
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 512, (2, 9))
    logits = model(ids)
    assert logits.shape == (2, 9, 512) and torch.isfinite(logits).all()
    # Activations of order one: the draws are scaled by fan-in, not HF's 0.02.
    assert 0.1 < logits.float().std() < 10


def test_same_seed_same_model_other_seed_other_model():
    a, b, c = (random_model("tiny", seed=s) for s in (1, 1, 2))
    sa, sb, sc = (m.state_dict() for m in (a, b, c))
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.self_attn.q_proj.weight"], sc["model.layers.0.self_attn.q_proj.weight"])


def test_dense_build_quantizes_to_the_4bit_build():
    # quantize=None draws the same weights; quantizing them gives the 4-bit build's bytes.
    dense, q = random_model("tiny", quantize=None, seed=5), random_model("tiny", quantize="nf4", seed=5)
    w = dense.model.layers[1].mlp.gate_proj.weight
    packed, _ = ops.quantize_4bit(w.detach(), 64, "nf4", True)
    assert torch.equal(packed, q.model.layers[1].mlp.gate_proj.weight)
    assert torch.equal(dense.model.embed_tokens.weight, q.model.embed_tokens.weight)


def test_parameter_count_matches_a_built_model():
    config = shape_config("tiny", tie_word_embeddings=False)
    with torch.device("meta"):
        model = Llama(config)
    assert parameter_count(config) == sum(p.numel() for p in model.parameters())
    assert parameter_count(shape_config("tiny", tie_word_embeddings=True)) == parameter_count(config) - 512 * 64
    # The published sizes: Llama-3-8B 8.03 B, Llama-2-70B 68.98 B, Llama-3-70B 70.55 B parameters.
    for name, billions in (("llama-3-8b", 8.03), ("llama-2-70b", 68.98), ("llama-3-70b", 70.55)):
        assert abs(parameter_count(shape_config(name)) / 1e9 - billions) < 0.01, name
    # 2 FLOPs per weight that multiplies (not the embedding lookup), plus attention.
    c8 = shape_config("llama-3-8b")
    matmul = parameter_count(c8) - c8.vocab_size * c8.hidden_size - (2 * c8.num_hidden_layers + 1) * c8.hidden_size
    assert flops_per_token(c8, 0) == pytest.approx(2 * matmul, rel=1e-6)


def test_named_shapes_and_bad_names():
    assert {"llama-3-8b", "llama-2-70b", "llama-3-70b", "tiny"} <= set(SHAPES)
    assert shape_config("llama-3-70b").num_hidden_layers == 80
    assert shape_config("llama-3-8b", num_hidden_layers=2).num_hidden_layers == 2
    with pytest.raises(ValueError, match="unknown shape"):
        shape_config("llama-9")
    with pytest.raises(ValueError, match="hidden_sizes"):
        shape_config("tiny", hidden_sizes=3)
