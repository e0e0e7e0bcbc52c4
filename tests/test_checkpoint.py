"""checkpoint.py against transformers and bitsandbytes on tiny random Llamas written with save_pretrained.

Covers loading 16-bit HF directories (GQA, tied, sharded) and quantizing them to NF4 (against bitsandbytes'
quantize -> dequantize of every projection, and against transformers + bitsandbytes' own 4-bit forward), bnb-4bit
checkpoints in both directions (minqlora -> transformers, transformers -> minqlora with identical bytes, packed bytes
stored in a float dtype), 16-bit sharded saving, peak host memory of a layer-by-layer load, and the errors.
Leaves out GGUF (test_gguf_io.py). Weights are O(1) (as in test_model.py) so quantization error shows in the logits.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import bitsandbytes.functional as bnbf
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from hf_helpers import unit_scale_
from minqlora.checkpoint import PROJECTIONS, load_pretrained, parse_size, save_pretrained
from minqlora.linear4bit import Linear4bit
from minqlora.model import Llama, LlamaConfig

# in_features are multiples of 64: bitsandbytes' CPU dequantize is wrong otherwise (bnb-format.md §5).
TINY = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
IDS = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(1))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def random_hf(seed=0, **overrides) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**{**TINY, **overrides})
    return unit_scale_(transformers.LlamaForCausalLM(cfg).eval())


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """{variant: (transformers model, directory)}: gqa, tied, and gqa saved in shards."""
    out = {}
    for variant, overrides, shard in (("gqa", {}, "5GB"), ("tied", {"tie_word_embeddings": True}, "5GB"),
                                      ("sharded", {}, "100KB")):
        hf = random_hf(**overrides)
        path = tmp_path_factory.mktemp(variant)
        hf.save_pretrained(path, max_shard_size=shard)
        out[variant] = (hf, path)
    assert (out["sharded"][1] / "model.safetensors.index.json").is_file()
    return out


@pytest.mark.parametrize("variant", ["gqa", "tied", "sharded"])
def test_16bit_logits_match_transformers(hf_models, variant):
    hf, path = hf_models[variant]
    model = Llama.from_pretrained(path, quantize=None, dtype=torch.float32).eval()
    assert not any(isinstance(m, Linear4bit) for m in model.modules())
    with torch.no_grad():
        assert rel(model(IDS), hf(IDS).logits) <= 1e-4
    if variant == "tied":
        assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("variant", ["gqa", "tied"])
def test_nf4_matches_bitsandbytes_quantize_dequantize(hf_models, variant, double_quant):
    """Every projection quantized as bitsandbytes.functional.quantize_4bit does it, and the logits of transformers
    with each projection replaced by bitsandbytes' quantize -> dequantize of it."""
    hf, path = hf_models[variant]
    model = load_pretrained(path, quantize="nf4", double_quant=double_quant, dtype=torch.float32).eval()
    quantized = {n for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert len(quantized) == 7 * TINY["num_hidden_layers"] and "lm_head" not in quantized
    ref = random_hf(**({"tie_word_embeddings": True} if variant == "tied" else {}))
    steps = []
    with torch.no_grad():
        for name, m in ref.named_modules():
            if name.rsplit(".", 1)[-1] in PROJECTIONS:
                packed, state = bnbf.quantize_4bit(m.weight, blocksize=64, compress_statistics=double_quant,
                                                   quant_type="nf4")
                ours = model.get_submodule(name)
                assert torch.equal(ours.weight, packed.reshape(-1, 1)), name  # the 4-bit codes: identical
                if double_quant:
                    assert state.offset.item() == ours.nested_offset
                    steps.append((ours.weight_absmax.int() - state.absmax.int()).abs())
                else:
                    assert torch.equal(ours.weight_absmax, state.absmax)
                m.weight.copy_(bnbf.dequantize_4bit(packed, state).reshape(m.weight.shape))
        ours_logits, ref_logits = model(IDS), ref(IDS).logits
        assert rel(ours_logits, hf(IDS).logits) > 1e-3  # quantization did change something
    if double_quant:
        # bitsandbytes' CPU backend finds the 8-bit absmax code through a 65,536-bin table and is one step off
        # on a few values (bnb-format.md §3); minqlora uses the exact nearest code. One step of one block's scale
        # moves the logits by ~1e-4, hence the looser bound.
        steps = torch.cat(steps)
        assert steps.max() <= 1 and steps.float().mean() < 0.02
        assert rel(ours_logits, ref_logits) <= 1e-3
    else:
        assert rel(ours_logits, ref_logits) <= 1e-4


@pytest.fixture(scope="module")
def bnb_model(hf_models, tmp_path_factory):
    """transformers + bitsandbytes NF4 (double quant) loaded from the gqa directory, saved before any forward
    (a forward on AVX512-BF16 CPUs corrupts the saved absmax, bnb-format.md §5)."""
    _, path = hf_models["gqa"]
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.float32)
    saved = tmp_path_factory.mktemp("bnb_saved")
    model.save_pretrained(saved)
    return model.eval(), saved


def test_nf4_close_to_transformers_bitsandbytes_forward(hf_models, bnb_model):
    model = load_pretrained(hf_models["gqa"][1], quantize="nf4", dtype=torch.float32).eval()
    with torch.no_grad():
        assert rel(model(IDS), bnb_model[0](IDS).logits) <= 0.02


def test_transformers_bnb_checkpoint_loads_with_identical_bytes(bnb_model):
    _, saved = bnb_model
    model = load_pretrained(saved, dtype=torch.float32)
    stored = load_file(saved / "model.safetensors")
    ours = model.state_dict()
    bnb_keys = [k for k in stored if ".weight." in k or stored[k].dtype == torch.uint8]
    assert len(bnb_keys) == 6 * 7 * TINY["num_hidden_layers"]
    for k in stored:
        assert torch.equal(ours[k], stored[k]), k
    dense = load_pretrained(saved, quantize=None, dtype=torch.float32)  # quantize=None dequantizes
    assert isinstance(dense.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    with torch.no_grad():
        assert rel(dense(IDS), model(IDS)) <= 1e-5


def test_minqlora_4bit_checkpoint_loads_in_transformers(hf_models, tmp_path):
    model = load_pretrained(hf_models["gqa"][1], quantize="nf4", dtype=torch.float32).eval()
    save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "bitsandbytes" and q["load_in_4bit"] and q["bnb_4bit_quant_type"] == "nf4"
    assert q["bnb_4bit_use_double_quant"] and q["bnb_4bit_quant_storage"] == "uint8"
    assert q["bnb_4bit_compute_dtype"] == "float32"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    stored = load_file(tmp_path / "model.safetensors")
    sd = theirs.state_dict()
    assert all(torch.equal(sd[k].cpu(), stored[k]) for k in stored if stored[k].dtype == torch.uint8)
    with torch.no_grad():
        # Before any forward: on AVX512-BF16 CPUs bitsandbytes repacks the weight on its first forward.
        for name, m in theirs.named_modules():
            if name.rsplit(".", 1)[-1] in PROJECTIONS:
                w = bnbf.dequantize_4bit(m.weight.data, m.weight.quant_state)
                assert torch.allclose(w, model.get_submodule(name).dequantize(torch.float32), rtol=1e-6, atol=0)
        # bitsandbytes' CPU forward may compute in bf16 (its AVX512-BF16 gemv), so only the loose bound holds.
        assert rel(theirs(IDS).logits, model(IDS)) <= 0.02
    again = load_pretrained(tmp_path, dtype=torch.float32).eval()  # and back into minqlora
    with torch.no_grad():
        assert torch.equal(again(IDS), model(IDS))


def test_packed_bytes_in_float_storage(hf_models, tmp_path):
    """bnb_4bit_quant_storage=bfloat16 writers store the packed bytes as bf16 values: the bytes are what counts."""
    model = load_pretrained(hf_models["gqa"][1], quantize="nf4", dtype=torch.float32).eval()
    save_pretrained(model, tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    for k in [k for k in sd if k.endswith("proj.weight")]:
        sd[k] = sd[k].view(-1).view(torch.bfloat16).reshape(-1, 1)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["bnb_4bit_quant_storage"] = "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps(config))
    again = load_pretrained(tmp_path, dtype=torch.float32).eval()
    up = again.model.layers[1].mlp.up_proj.weight  # kept in its stored dtype, the bytes untouched
    assert up.dtype == torch.bfloat16 and torch.equal(up.view(-1).view(torch.uint8),
                                                       model.model.layers[1].mlp.up_proj.weight.view(-1))
    with torch.no_grad():
        assert torch.equal(again(IDS), model(IDS))


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


def test_state_dict_goes_straight_to_safetensors(hf_models, tmp_path):
    """A 4-bit Llama's plain state_dict() (no save_pretrained, no clones) saves with safetensors and loads back:
    every Linear4bit owns its buffers, the double-quant map included, so no two tensors share memory."""
    model = load_pretrained(hf_models["gqa"][1], quantize="nf4", double_quant=True, dtype=torch.float32).eval()
    save_file(model.state_dict(), tmp_path / "sd.safetensors")
    again = load_pretrained(hf_models["gqa"][1], quantize="nf4", double_quant=False, dtype=torch.float32).eval()
    again.load_state_dict(load_file(tmp_path / "sd.safetensors"))  # Linear4bit takes the stored (nested) state
    assert again.model.layers[1].mlp.down_proj.weight_nested_absmax is not None
    with torch.no_grad():
        assert torch.equal(again(IDS), model(IDS))


@pytest.fixture(scope="module")
def bnb_bf16_storage(hf_models, tmp_path_factory):
    """An FSDP-style checkpoint: transformers + bitsandbytes NF4 + double quant with bnb_4bit_quant_storage=bf16,
    saved before any forward (bnb-format.md §5)."""
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32,
                                             bnb_4bit_quant_storage=torch.bfloat16)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_models["gqa"][1], quantization_config=config,
                                                              dtype=torch.float32)
    saved = tmp_path_factory.mktemp("bnb_bf16_storage")
    model.save_pretrained(saved)
    return saved


def test_fsdp_style_bf16_storage_checkpoint_loads_with_identical_bytes(bnb_bf16_storage, bnb_model):
    stored = load_file(bnb_bf16_storage / "model.safetensors")
    packed = [k for k in stored if k.endswith("proj.weight")]
    assert len(packed) == 7 * TINY["num_hidden_layers"] and all(stored[k].dtype == torch.bfloat16 for k in packed)
    model = load_pretrained(bnb_bf16_storage, dtype=torch.float32).eval()
    ours = model.state_dict()
    for k in stored:  # same keys, dtypes and bytes (bf16 views of packed nibbles compared as bytes)
        assert ours[k].dtype == stored[k].dtype and torch.equal(as_bytes(ours[k]), as_bytes(stored[k])), k
    assert model.model.layers[0].self_attn.q_proj.quant_storage == torch.bfloat16
    # the same weights in uint8 storage (transformers' default) give identical logits
    uint8 = load_pretrained(bnb_model[1], dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(model(IDS), uint8(IDS))


@pytest.mark.parametrize("storage", [torch.uint8, torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_quant_storage_round_trips_through_save_pretrained(hf_models, tmp_path, storage):
    reference = load_pretrained(hf_models["gqa"][1], quantize="nf4", dtype=torch.float32).eval()
    model = load_pretrained(hf_models["gqa"][1], quantize="nf4", dtype=torch.float32, quant_storage=storage).eval()
    save_pretrained(model, tmp_path)
    q = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert q["bnb_4bit_quant_storage"] == str(storage).removeprefix("torch.")
    stored = load_file(tmp_path / "model.safetensors")
    lin = "model.layers.1.mlp.up_proj.weight"
    assert stored[lin].dtype == storage
    assert torch.equal(as_bytes(stored[lin]), reference.model.layers[1].mlp.up_proj.weight.view(-1))
    again = load_pretrained(tmp_path, dtype=torch.float32).eval()
    assert again.model.layers[1].mlp.up_proj.quant_storage == storage
    with torch.no_grad():
        assert torch.equal(again(IDS), reference(IDS))


def test_minqlora_bf16_storage_checkpoint_loads_in_transformers(hf_models, tmp_path):
    model = load_pretrained(hf_models["gqa"][1], quantize="nf4", dtype=torch.float32,
                            quant_storage=torch.bfloat16).eval()
    save_pretrained(model, tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    stored = load_file(tmp_path / "model.safetensors")
    with torch.no_grad():
        for name, m in theirs.named_modules():  # before any forward (bnb-format.md §5)
            if name.rsplit(".", 1)[-1] in PROJECTIONS:
                assert m.weight.dtype == torch.bfloat16 and m.weight.quant_storage == torch.bfloat16, name
                assert torch.equal(as_bytes(m.weight.data), as_bytes(stored[name + ".weight"])), name
                w = bnbf.dequantize_4bit(m.weight.data, m.weight.quant_state)
                assert torch.allclose(w, model.get_submodule(name).dequantize(torch.float32), rtol=1e-6, atol=0)
        assert rel(theirs(IDS).logits, model(IDS)) <= 0.02  # bnb's CPU forward may compute in bf16


def test_16bit_save_sharded_and_atomic(hf_models, tmp_path):
    hf, path = hf_models["tied"]
    model = load_pretrained(path, quantize=None, dtype=torch.float32).eval()
    save_pretrained(model, tmp_path, max_shard_size="60KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and "lm_head.weight" not in index["weight_map"]
    for shard in shards:  # at most 60 kB of tensors, unless one tensor alone is bigger
        sizes = [t.numel() * t.element_size() for t in load_file(tmp_path / shard).values()]
        assert len(sizes) == 1 or sum(sizes) <= 60_000
    assert not list(tmp_path.glob(".*tmp*"))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        assert rel(theirs(IDS).logits, hf(IDS).logits) <= 1e-6
    save_pretrained(model, tmp_path)  # re-saving unsharded removes the old shards and index
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert torch.equal(load_pretrained(tmp_path, quantize=None, dtype=torch.float32)(IDS), model(IDS))


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size(123) == 123
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("five gigs")


MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from minqlora import ops
    from minqlora.checkpoint import load_pretrained
    from minqlora.model import Llama, LlamaConfig

    def status(key):
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))

    # Warm up what is paid once per process (lazy imports behind meta-device init, kernel setup), then reset the
    # peak (VmHWM) to the current RSS.
    with torch.device("meta"):
        Llama(LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1))
    ops.quantize_4bit(torch.randn(64, 64, dtype=torch.bfloat16))
    open("/proc/self/clear_refs", "w").write("5")
    base = status("VmRSS:")
    model = load_pretrained(sys.argv[1], quantize="nf4", dtype=torch.bfloat16)
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    print(json.dumps({"base": base, "peak": status("VmHWM:"), "held": held}))
""")


def test_peak_memory_is_4bit_model_plus_one_layer(tmp_path):
    """An 8-layer model (~190 MB in bf16) loads in a fresh process while RSS grows by the 4-bit model (~55 MB) plus
    about one 16-bit layer (22 MB), well below the 16-bit total. Shards hold one layer each, like a big checkpoint."""
    cfg = LlamaConfig(vocab_size=2048, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=2, torch_dtype="bfloat16")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Llama(cfg).state_dict().items()}
    groups: dict[str, list[str]] = {}
    for k in shapes:
        groups.setdefault(".".join(k.split(".")[:3]) if k.startswith("model.layers.") else "rest", []).append(k)
    weight_map, gen = {}, torch.Generator().manual_seed(0)
    for i, keys in enumerate(groups.values()):
        name = f"model-{i:05d}.safetensors"
        save_file({k: torch.randn(shapes[k], generator=gen, dtype=torch.bfloat16) for k in keys}, tmp_path / name)
        weight_map.update(dict.fromkeys(keys, name))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf()))
    total16 = sum(s.numel() for s in shapes.values()) * 2
    layer16 = sum(shapes[k].numel() for k in groups["model.layers.0"]) * 2

    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).parent.parent)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    growth = r["peak"] - r["base"]
    assert total16 > 180e6 and r["held"] < total16 / 3
    assert growth < r["held"] + 2 * layer16 + 16e6, (growth / 1e6, r["held"] / 1e6, layer16 / 1e6)
    assert growth < 0.6 * total16


# -- errors ---------------------------------------------------------------------------------------------------------

@pytest.fixture
def hf_copy(hf_models, tmp_path):
    """A writable copy of the gqa checkpoint directory."""
    for f in hf_models["gqa"][1].iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    return tmp_path


def edit_config(path: Path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_missing_config_and_weights(hf_copy):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_pretrained(hf_copy / "nope")
    (hf_copy / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_pretrained(hf_copy)
    (hf_copy / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(hf_copy)


def test_pickle_weights_refused_without_unpickling(hf_copy):
    (hf_copy / "model.safetensors").unlink()
    # A file that would run code if unpickled: loading must refuse before touching its contents.
    (hf_copy / "pytorch_model.bin").write_bytes(b"cos\nsystem\n(S'touch /tmp/minqlora_pwned'\ntR.")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*never unpickles"):
        load_pretrained(hf_copy)
    with pytest.raises(ValueError, match="never unpickles"):
        load_pretrained(hf_copy / "pytorch_model.bin")
    assert not Path("/tmp/minqlora_pwned").exists()


def test_missing_tensor_and_wrong_shape(hf_copy):
    sd = load_file(hf_copy / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, hf_copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.safetensors: missing tensor 'model\.layers\.1\.mlp\.up_proj\."):
        load_pretrained(hf_copy, quantize=None)
    edit_config(hf_copy, intermediate_size=192)
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.gate_proj\.weight' has shape \[256, 128\], the "
                                         r"config implies \[192, 128\]"):
        load_pretrained(hf_copy)


def test_extra_tensor_refused(hf_copy):
    sd = load_file(hf_copy / "model.safetensors")
    sd["model.layers.2.mlp.up_proj.weight"] = torch.zeros(256, 128)  # config says 2 layers
    save_file(sd, hf_copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"no place for: \['model\.layers\.2\.mlp\.up_proj\.weight'\]"):
        load_pretrained(hf_copy)


def test_unsupported_model_type_and_quantization(hf_copy):
    edit_config(hf_copy, model_type="mistral")
    with pytest.raises(ValueError, match=r"config\.json: model_type 'mistral' is not supported"):
        load_pretrained(hf_copy)
    edit_config(hf_copy, model_type="llama", architectures=["LlamaForSequenceClassification"])
    with pytest.raises(ValueError, match="LlamaForSequenceClassification"):
        load_pretrained(hf_copy)
    edit_config(hf_copy, architectures=["LlamaForCausalLM"], quantization_config={"quant_method": "gptq"})
    with pytest.raises(ValueError, match="quant_method 'gptq'"):
        load_pretrained(hf_copy)
    edit_config(hf_copy, quantization_config={"quant_method": "bitsandbytes", "load_in_8bit": True})
    with pytest.raises(ValueError, match="8-bit"):
        load_pretrained(hf_copy)


def test_truncated_safetensors(hf_copy, hf_models):
    data = (hf_copy / "model.safetensors").read_bytes()
    (hf_copy / "model.safetensors").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ValueError, match=r"model\.safetensors: not a valid safetensors file \(truncated"):
        load_pretrained(hf_copy)


def test_sharded_index_naming_a_missing_file(hf_models, tmp_path):
    for f in hf_models["sharded"][1].iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=f"{victim.name}: listed in model.safetensors.index.json"):
        load_pretrained(tmp_path)


def test_nonfinite_weight_refused(hf_copy):
    sd = load_file(hf_copy / "model.safetensors")
    sd["model.layers.0.self_attn.k_proj.weight"][3, 5] = float("nan")
    save_file(sd, hf_copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight'"):
        load_pretrained(hf_copy, quantize="nf4")


def test_save_refuses_lora_and_mixed_settings(hf_models, tmp_path):
    model = load_pretrained(hf_models["gqa"][1], quantize="nf4", dtype=torch.float32)
    model.model.layers[0].mlp.up_proj = Linear4bit.from_linear(
        torch.nn.Linear(128, 256, bias=False), quant_type="fp4", compute_dtype=torch.float32)
    with pytest.raises(ValueError, match="mix settings"):
        save_pretrained(model, tmp_path)
    assert not list(tmp_path.iterdir())



def test_imports_without_the_optional_gguf_package(hf_models, tmp_path):
    """gguf is an optional extra: HF directories load without it, and a GGUF file says what is missing."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules["gguf"] = None  # makes `import gguf` fail as if it were not installed
        import torch
        from minqlora.checkpoint import load_pretrained
        load_pretrained({str(hf_models["gqa"][1])!r}, quantize=None, dtype=torch.float32)
        try:
            load_pretrained(sys.argv[1])
        except ImportError as e:
            print("refused:", e)
    """)
    gguf_file = tmp_path / "fake.gguf"
    gguf_file.write_bytes(b"GGUF" + bytes(28))
    out = subprocess.run([sys.executable, "-c", script, str(gguf_file)], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parent.parent)
    assert "refused:" in out.stdout and "needs the gguf package" in out.stdout
