"""Llama against transformers' LlamaForCausalLM on the same weights: logits, padding, KV cache, config parsing.

Covers tiny random fp32 configs (GQA, odd head counts, tied embeddings, llama3/linear rope, head_dim != H/heads,
biases), meta-device construction, tied checkpoints without lm_head, gradient checkpointing and bad configs.
Leaves out bf16 numerics and real checkpoints (checkpoint.py's tests).
"""

import pytest
import torch
import transformers

from hf_helpers import unit_scale_
from minqlora.model import KVCache, Llama, LlamaConfig

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}

CONFIGS = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2),
    "tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "llama3_rope": dict(num_attention_heads=4, num_key_value_heads=1, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
    "linear_rope": dict(num_attention_heads=2, rope_scaling={"type": "linear", "factor": 4.0}),
    "odd_heads": dict(hidden_size=48, num_attention_heads=3, num_key_value_heads=1),
    "head_dim": dict(hidden_size=48, num_attention_heads=3, num_key_value_heads=3, head_dim=24,
                     tie_word_embeddings=True),
    "bias": dict(num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True),
}


def tiny_config(**overrides) -> LlamaConfig:
    base = dict(vocab_size=101, hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, rms_norm_eps=1e-5)
    return LlamaConfig(**{**base, **overrides})


def hf_pair(cfg: LlamaConfig, seed: int = 0) -> tuple[transformers.LlamaForCausalLM, Llama]:
    """A HF model built from cfg.to_hf() with weights large enough to matter, and ours loaded from its state dict."""
    torch.manual_seed(seed)
    hf_cfg = transformers.LlamaConfig(**cfg.to_hf(), attn_implementation="eager")
    hf = unit_scale_(transformers.LlamaForCausalLM(hf_cfg).eval())
    ours = Llama(cfg).eval()
    assert sorted(ours.state_dict()) == sorted(hf.state_dict())
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(name):
    cfg = tiny_config(**CONFIGS[name])
    hf, ours = hf_pair(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert got.shape == (2, 37, cfg.vocab_size)
    assert expected.abs().max() > 1.0  # the weights really move the logits
    assert (got - expected).abs().max() <= 1e-4
    if cfg.tie_word_embeddings:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_mask_matches_transformers_and_unpadded(side):
    cfg = tiny_config(**CONFIGS["gqa"])
    hf, ours = hf_pair(cfg)
    g = torch.Generator().manual_seed(2)
    lengths = [9, 5, 1]
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in lengths]
    t = max(lengths)
    ids = torch.zeros(len(seqs), t, dtype=torch.long)
    mask = torch.zeros(len(seqs), t, dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(t - len(s), t) if side == "left" else slice(0, len(s))
        ids[i, span], mask[i, span] = s, 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        got = ours(ids, attention_mask=mask)
        expected = hf(ids, attention_mask=mask, position_ids=positions).logits
        real = mask.bool()
        assert torch.isfinite(got).all()
        assert (got[real] - expected[real]).abs().max() <= 1e-4
        for i, s in enumerate(seqs):
            alone = ours(s[None])[0]
            assert (got[i][real[i]] - alone).abs().max() <= 1e-4


def test_kv_cache_decoding_equals_full_recompute():
    cfg = tiny_config(**CONFIGS["llama3_rope"])
    _, ours = hf_pair(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = ours(ids)
        for chunks in ([8] + [1] * 12, [3, 5, 4, 1, 7]):
            cache = KVCache(cfg.num_hidden_layers, max_len=24)
            pieces, start = [], 0
            for n in chunks:
                pieces.append(ours(ids[:, start:start + n], cache=cache))
                start += n
            assert cache.length == 20
            assert (torch.cat(pieces, dim=1) - full).abs().max() <= 1e-4


def test_kv_cache_with_left_padding():
    cfg = tiny_config(**CONFIGS["gqa"])
    _, ours = hf_pair(cfg)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=g)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0
    with torch.no_grad():
        full = ours(ids, attention_mask=mask)
        cache = KVCache(cfg.num_hidden_layers, max_len=12)
        pieces = [ours(ids[:, :7], attention_mask=mask[:, :7], cache=cache)]
        for i in range(7, 12):
            pieces.append(ours(ids[:, i:i + 1], attention_mask=mask[:, :i + 1], cache=cache))
    got = torch.cat(pieces, dim=1)
    assert (got[mask.bool()] - full[mask.bool()]).abs().max() <= 1e-4


def test_kv_cache_overflow_is_an_error():
    cfg = tiny_config()
    ours = Llama(cfg)
    cache = KVCache(cfg.num_hidden_layers, max_len=4)
    with pytest.raises(ValueError, match="max_len"):
        ours(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_meta_construction_then_materialize():
    cfg = tiny_config(**CONFIGS["tied"], rope_scaling=LLAMA3_ROPE)
    hf, _ = hf_pair(cfg)
    with torch.device("meta"):
        ours = Llama(cfg)
    assert all(p.is_meta for p in ours.parameters())
    ours.to_empty(device="cpu")
    ours.init_rope("cpu")
    ours.tie_weights()
    assert torch.equal(ours.model.rotary_emb.inv_freq, hf.model.rotary_emb.inv_freq)
    sd = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}  # tied HF checkpoints omit it
    ours.load_state_dict(sd, strict=True, assign=True)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = torch.randint(0, cfg.vocab_size, (1, 11))
    with torch.no_grad():
        assert (ours.eval()(ids) - hf(ids).logits).abs().max() <= 1e-4


def test_dtype_cast_keeps_rope_in_fp32():
    cfg = tiny_config(rope_theta=500000.0)
    ours = Llama(cfg)
    reference = ours.model.rotary_emb.inv_freq.clone()
    ours.to(torch.bfloat16)
    assert ours.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(ours.model.rotary_emb.inv_freq, reference)
    assert ours.model.embed_tokens.weight.dtype == torch.bfloat16


def test_gradient_checkpointing_gives_same_gradients():
    cfg = tiny_config(**CONFIGS["gqa"])
    _, ours = hf_pair(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    ours.train()
    grads = []
    for on in (False, True):
        ours.zero_grad()
        ours.gradient_checkpointing = on
        ours(ids).logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in ours.parameters()])
    assert ours.model.gradient_checkpointing
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_from_hf_reads_both_transformers_styles():
    cfg = tiny_config(**CONFIGS["llama3_rope"], eos_token_id=[5, 7], torch_dtype="bfloat16")
    v5 = transformers.LlamaConfig(**cfg.to_hf()).to_dict()  # transformers 5: nested "rope_parameters", "dtype"
    assert "rope_parameters" in v5
    assert LlamaConfig.from_hf(v5) == cfg
    v4 = {**cfg.to_hf(), "rope_scaling": {**LLAMA3_ROPE, "type": "llama3"}}  # transformers 4 style
    assert LlamaConfig.from_hf(v4) == cfg
    plain = LlamaConfig.from_hf({"hidden_size": 64, "num_attention_heads": 8, "rope_scaling": {"rope_type": "default"}})
    assert plain.head_dim == 8 and plain.num_key_value_heads == 8 and plain.rope_scaling is None


@pytest.mark.parametrize("bad, message", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_scaling.rope_type 'yarn'"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
     "rope_parameters.rope_type 'dynamic'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling.low_freq_factor"),
    ({"model_type": "mistral"}, "model_type 'mistral'"),
    ({"architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"num_attention_heads": 4, "num_key_value_heads": 3}, "num_key_value_heads"),
])
def test_bad_configs_are_rejected(bad, message):
    d = {"hidden_size": 32, "num_attention_heads": 4, **bad}
    with pytest.raises(ValueError, match=message):
        LlamaConfig.from_hf(d)
