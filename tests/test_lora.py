"""LoRA against peft: LoRALinear vs peft's lora.Linear (forward, gradients, rsLoRA), merge/unmerge on nn.Linear and
Linear4bit, add_lora vs get_peft_model (targets, parameter counts, QLoRA counts vs peft on bitsandbytes), and
adapter files both ways between minqlora's Llama and transformers' LlamaForCausalLM + peft (same logits).

Covers tiny fp32/bf16 CPU models. Leaves out training dynamics (test_sft.py) and CUDA (tests/cuda).
"""

import copy
import json
import os

import bitsandbytes as bnb
import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

from minqlora import lora, quant
from hf_helpers import unit_scale_
from minqlora.linear4bit import Linear4bit
from minqlora.lora import LoRALinear, add_lora, load_adapter, merge_lora, save_adapter
from minqlora.model import Llama, LlamaConfig

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# -- helpers ------------------------------------------------------------------------------------------------------

def tree(d=16, f=24, n_layers=2, seed=0) -> nn.Module:
    """A small module tree with Llama's projection names (and a bias on q_proj), plus modules LoRA must skip."""
    torch.manual_seed(seed)
    layers = nn.ModuleList()
    for _ in range(n_layers):
        attn = nn.ModuleDict({k: nn.Linear(d, d, bias=k == "q_proj") for k in PROJ[:4]})
        mlp = nn.ModuleDict({"gate_proj": nn.Linear(d, f, bias=False), "up_proj": nn.Linear(d, f, bias=False),
                             "down_proj": nn.Linear(f, d, bias=False)})
        layers.append(nn.ModuleDict({"self_attn": attn, "mlp": mlp, "norm": nn.LayerNorm(d)}))
    return nn.ModuleDict({"embed": nn.Embedding(11, d), "layers": layers, "lm_head": nn.Linear(d, 11, bias=False)})


def tiny_config(**kw) -> LlamaConfig:
    base = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
    return LlamaConfig(**{**base, **kw})


def hf_llama(cfg: LlamaConfig, seed=0) -> transformers.LlamaForCausalLM:
    """A transformers Llama with O(1) activations (HF's std-0.02 init would make every comparison trivially small)."""
    torch.manual_seed(seed)
    return unit_scale_(transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**cfg.to_hf(), attn_implementation="eager")).eval())


def our_llama(hf: transformers.LlamaForCausalLM, cfg: LlamaConfig) -> Llama:
    ours = Llama(cfg).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return ours


def randomize_adapters(model: nn.Module, seed=1, std=0.3) -> None:
    """Nonzero A and B (B starts at zero, which would hide every mistake in B's path)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def quantize_projections(model: nn.Module, compute_dtype=torch.float32) -> nn.Module:
    for name, m in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in PROJ:
            model.set_submodule(name, Linear4bit.from_linear(m, compute_dtype=compute_dtype).train(m.training))
    return model


def dequantized_copy(hf, quantized: nn.Module):
    """hf with every quantized projection's weight replaced by its dequantized value, so both compute the same."""
    hf = copy.deepcopy(hf)
    with torch.no_grad():
        for name, m in quantized.named_modules():
            if isinstance(m, Linear4bit):
                hf.get_submodule(name).weight.copy_(m.dequantize(torch.float32))
    return hf


IDS = torch.randint(0, 61, (2, 11), generator=torch.Generator().manual_seed(5))


def logits(model):
    with torch.no_grad():
        out = model(IDS)
    return out if isinstance(out, torch.Tensor) else out.logits


# -- LoRALinear against peft's lora.Linear -------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_layer_matches_peft(bias, use_rslora, base_dtype):
    torch.manual_seed(0)
    base = nn.Linear(16, 24, bias=bias).to(base_dtype)
    pm = peft.get_peft_model(nn.ModuleDict({"q_proj": copy.deepcopy(base)}),
                             peft.LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj"], lora_dropout=0.0,
                                             use_rslora=use_rslora))
    theirs = pm.base_model.model["q_proj"]
    assert type(theirs) is peft.tuners.lora.Linear
    ours = LoRALinear(copy.deepcopy(base), r=4, alpha=6, use_rslora=use_rslora)
    assert ours.scaling == theirs.scaling["default"] == (6 / 2 if use_rslora else 6 / 4)
    with torch.no_grad():
        for name in ("lora_A", "lora_B"):
            w = torch.randn_like(getattr(ours, name).weight)
            getattr(ours, name).weight.copy_(w)
            getattr(theirs, name)["default"].weight.copy_(w)
    assert ours.lora_A.weight.dtype == theirs.lora_A["default"].weight.dtype == torch.float32

    x = torch.randn(2, 5, 16, dtype=base_dtype)
    xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    yo, yt = ours(xo), theirs(xt)
    assert yo.dtype == yt.dtype == base_dtype
    torch.testing.assert_close(yo, yt, rtol=0, atol=0)
    g = torch.randn_like(yo)
    yo.backward(g)
    yt.backward(g)
    torch.testing.assert_close(xo.grad, xt.grad, rtol=0, atol=0)
    torch.testing.assert_close(ours.lora_A.weight.grad, theirs.lora_A["default"].weight.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.lora_B.weight.grad, theirs.lora_B["default"].weight.grad, rtol=1e-6, atol=1e-6)
    assert ours.base_layer.weight.grad is None


def test_rslora_scaling():
    base = nn.Linear(8, 8)
    assert LoRALinear(base, r=16, alpha=8, use_rslora=True).scaling == 2.0
    assert LoRALinear(nn.Linear(8, 8), r=16, alpha=8).scaling == 0.5


def test_init_and_freezing():
    torch.manual_seed(0)
    base = nn.Linear(256, 64, bias=True)
    m = LoRALinear(base, r=32, alpha=16, dropout=0.1)
    assert m.base_layer is base and not any(p.requires_grad for p in base.parameters())
    assert m.lora_A.weight.requires_grad and m.lora_B.weight.requires_grad
    assert m.lora_A.weight.shape == (32, 256) and m.lora_B.weight.shape == (64, 32)
    assert m.lora_A.bias is None and m.lora_B.bias is None
    assert torch.count_nonzero(m.lora_B.weight) == 0
    a = m.lora_A.weight
    bound = 1 / 256 ** 0.5  # kaiming_uniform(a=√5) on fan_in 256: U(-1/16, 1/16)
    assert a.abs().max() <= bound and abs(a.std().item() - bound / 3 ** 0.5) < 0.05 * bound
    x = torch.randn(3, 256)
    assert torch.equal(m.eval()(x), base(x))  # ΔW = 0 at the start
    assert sorted(m.state_dict()) == ["base_layer.bias", "base_layer.weight", "lora_A.weight", "lora_B.weight"]


def test_adapter_dtype_and_4bit_base():
    base = Linear4bit.from_linear(nn.Linear(64, 32).to(torch.bfloat16))
    m = LoRALinear(base, r=4, alpha=8, dtype=torch.bfloat16)
    assert m.lora_A.weight.dtype == torch.bfloat16
    x = torch.randn(2, 64, dtype=torch.bfloat16, requires_grad=True)
    m(x).sum().backward()
    assert x.grad is not None and m.lora_A.weight.grad is not None
    assert all(b.grad is None for b in base.buffers())


def test_layer_bad_arguments():
    with pytest.raises(TypeError, match="Embedding"):
        LoRALinear(nn.Embedding(4, 4), r=2, alpha=4)
    with pytest.raises(ValueError, match="r must"):
        LoRALinear(nn.Linear(4, 4), r=0, alpha=4)
    with pytest.raises(ValueError, match="dropout"):
        LoRALinear(nn.Linear(4, 4), r=2, alpha=4, dropout=1.0)


# -- merge / unmerge -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge_linear(dtype):
    torch.manual_seed(0)
    m = LoRALinear(nn.Linear(32, 24).to(dtype), r=4, alpha=8)
    randomize_adapters(m)
    w0 = m.base_layer.weight.clone()
    x = torch.randn(5, 32, dtype=dtype)
    y = m(x)
    m.merge()
    assert m.merged
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(m(x), y, rtol=tol, atol=tol)
    torch.testing.assert_close(m.base_layer.weight, (w0.double() + m.delta_weight().double()).to(dtype),
                               rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="already merged"):
        m.merge()
    m.unmerge()
    assert not m.merged
    # Back to w0 up to one rounding of the merged weight W' = w0 + ΔW to the weight dtype (exact in float64).
    ulp = m.delta_weight().abs().max().item() * (2 ** -23 if dtype == torch.float32 else 2 ** -8)
    torch.testing.assert_close(m.base_layer.weight.float(), w0.float(), rtol=0, atol=2 * ulp)
    with pytest.raises(RuntimeError, match="not merged"):
        m.unmerge()
    with pytest.raises(ValueError, match="requantize"):
        m.merge(requantize=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_linear4bit_16bit(dtype):
    torch.manual_seed(0)
    q = Linear4bit.from_linear(nn.Linear(128, 48).to(dtype), compute_dtype=torch.float32)
    m = LoRALinear(q, r=8, alpha=16)
    randomize_adapters(m)
    x = torch.randn(5, 128, dtype=dtype)
    y = m(x)
    m.merge()
    assert type(m.base_layer) is nn.Linear and m.base_layer.weight.dtype == dtype
    assert not m.base_layer.weight.requires_grad
    want_w = (q.dequantize(torch.float32) + m.delta_weight()).to(dtype)
    assert torch.equal(m.base_layer.weight, want_w)
    tol = 1e-5 if dtype == torch.float32 else 3e-2  # bf16: one rounding of W + ΔW, and x in bf16 throughout
    torch.testing.assert_close(m(x), y, rtol=tol, atol=tol)
    assert sorted(m.state_dict()) == ["base_layer.bias", "base_layer.weight", "lora_A.weight", "lora_B.weight"]
    m.unmerge()
    assert m.base_layer is q  # the original 4-bit layer comes back untouched
    assert torch.equal(m(x), y)


def test_merge_linear4bit_requantize_is_lossy_and_final():
    torch.manual_seed(0)
    lin = nn.Linear(128, 48).to(torch.bfloat16)
    q = Linear4bit.from_linear(lin, compute_dtype=torch.float32)
    m = LoRALinear(q, r=8, alpha=16)
    randomize_adapters(m, std=0.1)
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    y = m(x).float()
    base_err = (q(x).float() - lin(x).float()).norm() / lin(x).float().norm()  # what 4 bits cost in the first place
    m.merge(requantize=True)
    new = m.base_layer
    assert type(new) is Linear4bit and m.requantized
    assert (new.quant_type, new.blocksize, new.compute_dtype, new.weight_dtype) == \
        ("nf4", 64, torch.float32, torch.bfloat16) and new.weight_nested_absmax is not None
    # W + ΔW rounded to the nearest NF4 codes: within absmax · max_error_bound per 64-block (a little more for
    # double quantization's 8-bit absmax), i.e. lossy by about one quantization step.
    target = (q.dequantize(torch.float32) + m.delta_weight()).to(torch.bfloat16).float()
    blocks = target.reshape(-1, 64)
    err = (new.dequantize(torch.float32).reshape(-1, 64) - blocks).abs()
    assert torch.all(err <= blocks.abs().amax(1, keepdim=True) * quant.max_error_bound("nf4") * 1.05)
    assert err.max() > 0
    rel = (m(x).float() - y).norm() / y.norm()
    assert 0 < rel < 2 * base_err
    with pytest.raises(RuntimeError, match="requantize=True"):
        m.unmerge()


# -- add_lora / merge_lora / counts against peft --------------------------------------------------------------------

def _peft_lora_names(pm) -> set:
    return {n.removeprefix("base_model.model.") for n, m in pm.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}


@pytest.mark.parametrize("targets", [PROJ, ("q_proj", "v_proj"), ("self_attn.o_proj", "lm_head"),
                                     ("layers.1.mlp.down_proj",), r".*\.(q|k)_proj"])
def test_add_lora_matches_peft(targets):
    ours = add_lora(tree(), r=4, alpha=8, targets=targets)
    pm = peft.get_peft_model(tree(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    assert set(lora.lora_modules(ours)) == _peft_lora_names(pm)
    assert lora.count_parameters(ours) == pm.get_nb_trainable_parameters()
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in ours.named_parameters() if ".lora_" in n}


def test_trainable_summary_line_matches_peft(capsys):
    ours = add_lora(tree(), r=8, alpha=16)
    line = lora.trainable_summary(ours)
    assert capsys.readouterr().out.strip() == line
    peft.get_peft_model(tree(), peft.LoraConfig(r=8, lora_alpha=16, target_modules=list(PROJ))) \
        .print_trainable_parameters()
    assert capsys.readouterr().out.strip() == line
    assert line.startswith("trainable params: 3,968 || all params: 8,768 || trainable%: 45.2555")


def test_llama_counts_match_peft():
    cfg = tiny_config()
    hf = hf_llama(cfg)
    ours = add_lora(our_llama(hf, cfg), r=8, alpha=16)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=8, lora_alpha=16, target_modules=list(PROJ)))
    assert set(lora.lora_modules(ours)) == _peft_lora_names(pm)
    assert lora.count_parameters(ours) == pm.get_nb_trainable_parameters()


def test_qlora_counts_match_peft_on_bitsandbytes():
    """4-bit weights count as out·in parameters, as peft counts bitsandbytes' Params4bit."""
    cfg = tiny_config()
    hf = hf_llama(cfg)
    ours = add_lora(quantize_projections(our_llama(hf, cfg)), r=8, alpha=16)
    for name, m in list(hf.named_modules()):
        if name.rsplit(".", 1)[-1] in PROJ:
            q = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=False, compute_dtype=torch.float32,
                                  quant_type="nf4")
            q.load_state_dict(m.state_dict())
            hf.set_submodule(name, q.to("cpu"))
    hf.is_loaded_in_4bit = True  # what transformers sets for a bnb model; peft's bnb dispatch looks for it
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=8, lora_alpha=16, target_modules=list(PROJ)))
    assert type(pm.base_model.model.model.layers[0].mlp.up_proj) is peft.tuners.lora.bnb.Linear4bit
    assert lora.count_parameters(ours) == pm.get_nb_trainable_parameters()


def test_add_lora_errors():
    with pytest.raises(ValueError, match=r"\['qkv_proj'\] match no module.*'q_proj'"):
        add_lora(tree(), targets=("q_proj", "qkv_proj"))
    with pytest.raises(ValueError, match="'layers.0.norm' is a LayerNorm"):
        add_lora(tree(), targets=("norm",))
    with pytest.raises(ValueError, match="match no module"):
        add_lora(tree(), targets=r"nothing\..*")
    with pytest.raises(ValueError, match="non-empty"):
        add_lora(tree(), targets=())
    model = add_lora(tree())
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(model)
    before = {n for n, _ in tree().named_modules()}
    bad = tree()
    with pytest.raises(ValueError):
        add_lora(bad, targets=("q_proj", "nope"))
    assert {n for n, _ in bad.named_modules()} == before  # nothing was swapped


def test_add_lora_keeps_train_eval_mode():
    model = tree().eval()
    model["layers"][0]["self_attn"]["q_proj"].train()  # e.g. a module swapped in after model.eval()
    add_lora(model, dropout=0.5)
    assert not any(m.training for n, m in model.named_modules() if "lora" in n or n.endswith("proj"))
    x = torch.randn(3, 16)
    layer = model["layers"][0]["self_attn"]["q_proj"]
    assert torch.equal(layer(x), layer(x))  # dropout off in eval mode


@pytest.mark.parametrize("quantized", [False, True])
def test_merge_lora_llama(quantized):
    cfg = tiny_config()
    ours = our_llama(hf_llama(cfg), cfg)
    if quantized:
        quantize_projections(ours)
    add_lora(ours, r=4, alpha=8)
    randomize_adapters(ours)
    before = logits(ours)
    merged = merge_lora(ours)
    assert merged is ours and not lora.lora_modules(ours)
    assert all(type(ours.get_submodule(n)) is nn.Linear for n, _ in ours.named_modules() if n.endswith("q_proj"))
    torch.testing.assert_close(logits(ours), before, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="no LoRA"):
        merge_lora(ours)


def test_merge_lora_requantize_llama():
    cfg = tiny_config()
    hf = hf_llama(cfg)
    full = logits(our_llama(hf, cfg))
    ours = add_lora(quantize_projections(our_llama(hf, cfg)), r=4, alpha=8)
    base_err = (logits(ours) - full).norm() / full.norm()  # what 4 bits cost in the first place
    randomize_adapters(ours, std=0.05)
    before = logits(ours)
    merge_lora(ours, requantize=True)
    assert type(ours.model.layers[0].self_attn.q_proj) is Linear4bit and not lora.lora_modules(ours)
    after = logits(ours)
    assert 0 < (after - before).norm() / before.norm() < base_err  # lossy (documented), about as lossy as 4 bits


def test_merge_lora_on_a_single_layer():
    m = LoRALinear(nn.Linear(8, 8), r=2, alpha=4)
    assert type(merge_lora(m)) is nn.Linear


def test_llama_training_step_matches_peft():
    """Train mode with dropout: same seed, same masks (dropout runs in the same order on the same shapes), so the
    logits and every adapter gradient agree with transformers + peft."""
    cfg = tiny_config()
    hf = hf_llama(cfg)
    ours = add_lora(our_llama(hf, cfg), r=4, alpha=8, dropout=0.1).train()
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=list(PROJ)))
    pm.train()
    randomize_adapters(ours)
    randomize_adapters(pm)
    target = torch.randint(0, cfg.vocab_size, IDS.shape, generator=torch.Generator().manual_seed(9))
    losses = []
    for model in (ours, pm):
        torch.manual_seed(123)
        out = model(IDS)
        out = out if isinstance(out, torch.Tensor) else out.logits
        loss = nn.functional.cross_entropy(out.flatten(0, 1), target.flatten())
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    theirs = {n.removeprefix("base_model.model.").replace(".default", ""): p.grad
              for n, p in pm.named_parameters() if p.requires_grad}
    ours_g = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert ours_g.keys() == theirs.keys() and len(ours_g) == 2 * 7 * cfg.num_hidden_layers
    for n in ours_g:
        torch.testing.assert_close(ours_g[n], theirs[n], rtol=1e-4, atol=1e-5)


# -- adapter files: minqlora <-> peft ------------------------------------------------------------------------------

def test_saved_adapter_loads_in_peft(tmp_path):
    cfg = tiny_config()
    hf = hf_llama(cfg)
    ours = add_lora(our_llama(hf, cfg), r=4, alpha=8, dropout=0.1, targets=("q_proj", "v_proj", "down_proj"),
                    use_rslora=True)
    randomize_adapters(ours)
    save_adapter(ours, tmp_path, base_model_name_or_path="tiny/llama")
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]  # no temp files

    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(written) <= set(peft.LoraConfig.__dataclass_fields__)
    assert written["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    want = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["down_proj", "q_proj", "v_proj"],
                           use_rslora=True, task_type="CAUSAL_LM", base_model_name_or_path="tiny/llama",
                           inference_mode=True)
    got = peft.LoraConfig.from_pretrained(str(tmp_path))
    assert got.to_dict() == want.to_dict()

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    assert all(t.dtype == torch.float32 for t in tensors.values())
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path)).eval()
    torch.testing.assert_close(logits(pm), logits(ours), rtol=1e-5, atol=1e-5)
    assert (logits(pm) - logits(hf_llama(cfg))).abs().max() > 1e-2  # the adapter does something


@pytest.mark.parametrize("preloaded", [False, True])
def test_peft_adapter_loads_in_minqlora(tmp_path, preloaded):
    cfg = tiny_config()
    hf = hf_llama(cfg)
    ours = our_llama(hf, cfg)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["k_proj", "o_proj", "up_proj"],
                                                 lora_dropout=0.05, task_type="CAUSAL_LM")).eval()
    randomize_adapters(pm)
    pm.save_pretrained(str(tmp_path))
    if preloaded:
        add_lora(ours, r=8, alpha=16, targets=("up_proj", "o_proj", "k_proj"))
    load_adapter(ours, str(tmp_path))
    mods = lora.lora_modules(ours)
    assert len(mods) == 3 * cfg.num_hidden_layers
    assert all((m.r, m.alpha, m.use_rslora) == (8, 16, False) for m in mods.values())
    assert not ours.training and not any(m.training for m in mods.values())
    torch.testing.assert_close(logits(ours), logits(pm), rtol=1e-5, atol=1e-5)


def test_peft_adapter_on_4bit_base(tmp_path):
    """QLoRA: our 4-bit Llama + a peft adapter = transformers + peft on the dequantized weights."""
    cfg = tiny_config()
    hf = hf_llama(cfg)
    ours = quantize_projections(our_llama(hf, cfg), compute_dtype=torch.float32)
    pm = peft.get_peft_model(dequantized_copy(hf, ours),
                             peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(PROJ), use_rslora=True)).eval()
    randomize_adapters(pm)
    pm.save_pretrained(str(tmp_path))
    load_adapter(ours, str(tmp_path))
    assert isinstance(ours.model.layers[1].mlp.down_proj.base_layer, Linear4bit)
    torch.testing.assert_close(logits(ours), logits(pm), rtol=1e-4, atol=1e-4)


def test_round_trip(tmp_path):
    cfg = tiny_config()
    hf = hf_llama(cfg)
    a = add_lora(our_llama(hf, cfg), r=4, alpha=12, dropout=0.0)
    randomize_adapters(a)
    save_adapter(a, tmp_path)
    save_adapter(a, tmp_path)  # overwriting is fine
    b = load_adapter(our_llama(hf, cfg), tmp_path)
    sa, sb = lora.adapter_state_dict(a), lora.adapter_state_dict(b)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(logits(a), logits(b))
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    # The temporary-then-rename write keeps the umask's permissions (safetensors itself creates its files 0600).
    (tmp_path.parent / "plain.txt").write_text("x")
    assert (tmp_path / "adapter_config.json").stat().st_mode == (tmp_path.parent / "plain.txt").stat().st_mode


def test_save_is_atomic(tmp_path, monkeypatch):
    cfg = tiny_config()
    model = add_lora(our_llama(hf_llama(cfg), cfg), r=4, alpha=8)
    save_adapter(model, tmp_path)
    old = (tmp_path / "adapter_model.safetensors").read_bytes()
    randomize_adapters(model)

    def crash(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(lora, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == old
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]


def test_save_errors(tmp_path):
    with pytest.raises(ValueError, match="no LoRA"):
        save_adapter(tree(), tmp_path)
    model = add_lora(tree(), r=4, alpha=8)
    model["layers"][0]["self_attn"]["q_proj"] = LoRALinear(nn.Linear(16, 16), r=2, alpha=8)
    with pytest.raises(ValueError, match="one of each"):
        save_adapter(model, tmp_path)


# -- bad adapters --------------------------------------------------------------------------------------------------

@pytest.fixture()
def saved(tmp_path):
    """A saved adapter (r=4, alpha=8, q_proj + v_proj) and a fresh model to load it into."""
    cfg = tiny_config()
    hf = hf_llama(cfg)
    model = add_lora(our_llama(hf, cfg), r=4, alpha=8, targets=("q_proj", "v_proj"))
    randomize_adapters(model)
    save_adapter(model, tmp_path)
    return tmp_path, lambda: our_llama(hf, cfg)


def edit_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def test_missing_files(saved, tmp_path_factory):
    path, fresh = saved
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(fresh(), empty)
    os.remove(path / "adapter_model.safetensors")
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        load_adapter(fresh(), path)
    (path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="adapter_model.bin, a pickle"):
        load_adapter(fresh(), path)


def test_corrupt_config(saved):
    path, fresh = saved
    (path / "adapter_config.json").write_text('{"r": 4, ')
    with pytest.raises(ValueError, match="adapter_config.json is not valid JSON"):
        load_adapter(fresh(), path)
    (path / "adapter_config.json").write_text("[4]")
    with pytest.raises(ValueError, match="JSON object"):
        load_adapter(fresh(), path)


@pytest.mark.parametrize("changes, message", [
    (dict(peft_type="IA3"), "peft_type"),
    (dict(r=0), "r must be a positive integer"),
    (dict(r="4"), "r must be a positive integer"),
    (dict(lora_alpha=None), "lora_alpha"),
    (dict(lora_dropout=1.5), "lora_dropout"),
    (dict(target_modules=[]), "target_modules"),
    (dict(target_modules=[3]), "target_modules"),
    (dict(use_dora=True), "use_dora"),
    (dict(fan_in_fan_out=True), "fan_in_fan_out"),
    (dict(bias="all"), "bias"),
    (dict(rank_pattern={"q_proj": 8}), "rank_pattern"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(layers_to_transform=[0]), "layers_to_transform"),
])
def test_bad_config_fields(saved, changes, message):
    path, fresh = saved
    edit_config(path, **changes)
    model = fresh()
    with pytest.raises(ValueError, match=message) as e:
        load_adapter(model, path)
    assert "adapter_config.json" in str(e.value)
    assert not lora.lora_modules(model)  # refused before the model changed


def test_r_mismatch(saved):
    path, fresh = saved
    # The model already has LoRA with another r: the config's r is named.
    model = add_lora(fresh(), r=8, alpha=8, targets=("q_proj", "v_proj"))
    with pytest.raises(ValueError, match=r"adapter_config.json: r is 4 but the model's LoRA module .* has 8"):
        load_adapter(model, path)
    model = add_lora(fresh(), r=4, alpha=16, targets=("q_proj", "v_proj"))
    with pytest.raises(ValueError, match="lora_alpha is 8"):
        load_adapter(model, path)
    # The config says r=8 but the tensors have r=4: the key and the file are named.
    edit_config(path, r=8)
    model = fresh()
    with pytest.raises(ValueError, match=r"safetensors: '.*lora_A.weight' has shape \[4, 32\].*\[8, 32\]"):
        load_adapter(model, path)
    assert not lora.lora_modules(model)


def test_targets_mismatch(saved):
    path, fresh = saved
    model = add_lora(fresh(), r=4, alpha=8, targets=("q_proj", "k_proj"))
    with pytest.raises(ValueError, match=r"target_modules .* do not select the model's LoRA modules"):
        load_adapter(model, path)
    edit_config(path, target_modules=["q_proj", "wq"])
    with pytest.raises(ValueError, match=r"adapter_config.json: LoRA targets \['wq'\] match no module"):
        load_adapter(fresh(), path)
    edit_config(path, target_modules=["q_proj"])  # the file still holds v_proj's tensors
    with pytest.raises(ValueError, match=r"unexpected keys \['base_model.model.model.layers.0.self_attn.v_proj"):
        load_adapter(fresh(), path)


def test_missing_and_extra_keys(saved):
    path, fresh = saved
    tensors = load_file(path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    save_file({k: v for k, v in tensors.items() if k != key}, path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"adapter_model.safetensors does not fit the model: 1 missing keys \['" + key):
        load_adapter(fresh(), path)
    save_file({**tensors, "base_model.model.lm_head.lora_A.weight": torch.zeros(4, 32)},
              path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"1 unexpected keys \['base_model.model.lm_head.lora_A.weight'\]"):
        load_adapter(fresh(), path)
    # A key without peft's prefix is both unexpected and leaves its module missing.
    renamed = {k.removeprefix("base_model.model."): v for k, v in tensors.items()}
    save_file(renamed, path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="missing keys"):
        load_adapter(fresh(), path)


def test_corrupt_weights(saved):
    path, fresh = saved
    (path / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    with pytest.raises(ValueError, match="adapter_model.safetensors is not a readable safetensors file"):
        load_adapter(fresh(), path)


def test_load_into_merged_model(saved):
    path, fresh = saved
    model = add_lora(fresh(), r=4, alpha=8, targets=("q_proj", "v_proj"))
    for m in lora.lora_modules(model).values():
        m.merge()
    with pytest.raises(ValueError, match="merged"):
        load_adapter(model, path)
