"""gguf_io.py and gguf_vocab.py: GGUF export and import of tiny random Llamas and their tokenizers.

Covers export F16/BF16/Q8_0 then import (logits equal to the model with its weights rounded the same way), GGUF files
built here with gguf.GGUFWriter the way llama.cpp's converter writes them (Q4_0/Q4_1/Q8_0 from gguf.quants.quantize,
K-quants from raw blocks), transformers' own GGUF loader as an independent oracle for the Q/K permutation and
metadata, tied embeddings, rope scaling, sentencepiece and byte-level BPE tokenizers both ways, and the errors.
Leaves out running llama.cpp itself (not installed here).
"""

import json

import gguf
import numpy as np
import pytest
import sentencepiece
import tokenizers
import torch
import transformers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from minqlora import gguf_io, gguf_vocab, ops
from minqlora.checkpoint import load_pretrained
from minqlora.linear4bit import Linear4bit
from minqlora.model import LlamaConfig, rope_inv_freq
from minqlora.tokenizer import Tokenizer

VOCAB = 400
TINY = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
IDS = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello world! 123 4567 89", "minqlora writes GGUF files.",
         "Ünïcödé text ✓ 日本語", "  leading spaces\nand\ttabs  ", "numbers 3.14159 and 1,000,000"]
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def random_hf(seed=0, **overrides) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(1.0, 0.2) if name.endswith("norm.weight") else p.normal_(0.0, p.shape[1] ** -0.5)
    return hf


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    """A sentencepiece BPE tokenizer.model with byte fallback, as Llama-2's, plus a tokenizer_config.json."""
    out = tmp_path_factory.mktemp("spm")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXTS * 40), model_prefix=str(out / "tokenizer"), vocab_size=VOCAB - 10,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, remove_extra_whitespaces=False,
        normalization_rule_name="identity", user_defined_symbols=["<tool>"], minloglevel=2)
    (out / "tokenizer.vocab").unlink()
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                           "chat_template": TEMPLATE}))
    return out


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """A byte-level BPE tokenizer.json with Llama-3's pre-tokenizer and BOS post-processor."""
    out = tmp_path_factory.mktemp("bpe")
    tok = tokenizers.Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(gguf_vocab.LLAMA3_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 20, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXTS * 40, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 0)])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>", "add_bos_token": True,
                                                           "eos_token": "<|end_of_text|>"}))
    return out


@pytest.fixture(scope="module")
def models_(tmp_path_factory):
    """{variant: (our fp32 model, HF directory)} for gqa and tied."""
    out = {}
    for variant, overrides in (("gqa", {}), ("tied", {"tie_word_embeddings": True})):
        path = tmp_path_factory.mktemp(variant)
        random_hf(**overrides).save_pretrained(path)
        out[variant] = (load_pretrained(path, quantize=None, dtype=torch.float32).eval(), path)
    return out


def rounded_copy(model_dir, rounding):
    """Our model from model_dir with every 2-D weight replaced by rounding(weight) (1-D tensors stay float32)."""
    ref = load_pretrained(model_dir, quantize=None, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim == 2:
                p.copy_(rounding(p))
    return ref


def ggml_roundtrip(qtype):
    return lambda w: torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), qtype), qtype))


@pytest.mark.parametrize("dtype, rounding", [
    ("f16", lambda w: w.half().float()), ("bf16", lambda w: w.bfloat16().float()),
    ("q8_0", ggml_roundtrip(gguf.GGMLQuantizationType.Q8_0))])
@pytest.mark.parametrize("variant", ["gqa", "tied"])
def test_export_import_roundtrip(models_, spm_dir, tmp_path, variant, dtype, rounding):
    model, path = models_[variant]
    out = gguf_io.export_gguf(model, spm_dir, tmp_path / "m.gguf", dtype=dtype)
    assert not list(tmp_path.glob("*.tmp*"))
    reader = gguf.GGUFReader(out)
    names = {t.name for t in reader.tensors}
    assert ("output.weight" in names) == (variant == "gqa")
    assert reader.get_field("general.architecture").contents() == "llama"
    assert reader.get_field("llama.attention.head_count_kv").contents() == 2
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.1.ffn_down.weight"] == dtype.upper()
    back = load_pretrained(out, quantize=None, dtype=torch.float32).eval()
    assert back.config.tie_word_embeddings == (variant == "tied")
    with torch.no_grad():
        assert rel(back(IDS), rounded_copy(path, rounding)(IDS)) <= 1e-5  # exactly the rounding, nothing else
        assert rel(back(IDS), model(IDS)) <= {"f16": 2e-3, "bf16": 0.02, "q8_0": 0.05}[dtype]  # and close


def test_transformers_reads_our_gguf(models_, bpe_dir, tmp_path):
    """transformers' GGUF loader undoes llama.cpp's Q/K permutation and maps the metadata on its own."""
    model, _ = models_["gqa"]
    gguf_io.export_gguf(model, bpe_dir, tmp_path / "m.gguf", dtype="f32")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf",
                                                               dtype=torch.float32).eval()
    with torch.no_grad():
        assert rel(theirs(IDS).logits, model(IDS)) <= 1e-5


def llama_cpp_style_gguf(hf: transformers.LlamaForCausalLM, path, qtypes: dict, tokenizer_dir=None):
    """A GGUF written the way llama.cpp's convert_hf_to_gguf.py does it, independently of gguf_io: qtypes maps
    a GGUF name suffix (e.g. "attn_q.weight") to its type; 2-D default Q8_0, 1-D F32."""
    cfg = hf.config
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}
    expected = {}  # HF name -> the float32 weight the file encodes
    for hf_name, t in hf.state_dict().items():
        x = t.float().numpy()
        parts = hf_name.split(".")
        if hf_name.startswith("model.layers."):
            name = f"blk.{parts[2]}.{names[parts[4] if parts[3] in ('self_attn', 'mlp') else parts[3]]}.weight"
        else:
            name = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                    "lm_head.weight": "output.weight"}[hf_name]
        heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}.get(name.split(".")[-2])
        if heads:  # llama.cpp's permute(): rotate-half pairs become adjacent rows
            x = x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)
        qtype = gguf.GGMLQuantizationType.F32 if x.ndim == 1 else qtypes.get(name.split(".", 2)[-1],
                                                                              gguf.GGMLQuantizationType.Q8_0)
        data = gguf.quants.quantize(x, qtype)
        w.add_tensor(name, data, raw_dtype=qtype)
        expected[hf_name] = torch.from_numpy(gguf.quants.dequantize(data, qtype).reshape(t.shape))
        if heads:
            e = expected[hf_name]
            expected[hf_name] = e.reshape(heads, e.shape[0] // heads // 2, 2, -1).transpose(1, 2).reshape(e.shape)
    if tokenizer_dir is not None:
        gguf_vocab.add_to_writer(w, gguf_vocab.vocab_from_tokenizer(tokenizer_dir, cfg.vocab_size))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def rewrite_gguf(src, dst, replace=None, drop=()):
    """Copy a GGUF's metadata and tensors to dst, replacing some tensors {name: (uint8 blocks, qtype)}, dropping
    others."""
    reader, replace = gguf.GGUFReader(src), replace or {}
    w = gguf.GGUFWriter(dst, reader.get_field("general.architecture").contents())
    for f in reader.fields.values():
        if not f.name.startswith(("GGUF.", "general.architecture")):
            w.add_key_value(f.name, f.contents(), f.types[0], f.types[-1] if len(f.types) > 1 else None)
    for t in reader.tensors:
        if t.name in drop:
            continue
        data, qtype = replace.get(t.name, (np.array(t.data), t.tensor_type))
        w.add_tensor(t.name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("qtypes", [{}, {"attn_q.weight": gguf.GGMLQuantizationType.Q4_0,
                                         "attn_k.weight": gguf.GGMLQuantizationType.Q4_1,
                                         "ffn_down.weight": gguf.GGMLQuantizationType.Q4_0,
                                         "token_embd.weight": gguf.GGMLQuantizationType.F16}], ids=["q8_0", "q4"])
def test_import_quantized_gguf_written_like_llama_cpp(tmp_path, qtypes):
    hf = random_hf()
    expected = llama_cpp_style_gguf(hf, tmp_path / "q.gguf", qtypes)
    model = load_pretrained(tmp_path / "q.gguf", quantize=None, dtype=torch.float32).eval()
    sd = model.state_dict()
    for name, e in expected.items():
        assert torch.equal(sd[name], e), name
    ref = random_hf()
    ref.load_state_dict(expected)
    with torch.no_grad():
        assert rel(model(IDS), ref(IDS).logits) <= 1e-5
    # quantize="nf4" quantizes the dequantized GGUF weights, Q/K rows already back in HF order.
    nf4 = load_pretrained(tmp_path / "q.gguf", quantize="nf4", dtype=torch.float32)
    q_proj = nf4.model.layers[1].self_attn.q_proj
    assert isinstance(q_proj, Linear4bit)
    w = expected["model.layers.1.self_attn.q_proj.weight"]
    assert torch.equal(q_proj.dequantize(), ops.dequantize_4bit(*ops.quantize_4bit(w)))


def test_import_k_quants(tmp_path):
    """Q4_K and Q6_K (256-value super-blocks) go through gguf.quants.dequantize like the other types: ffn_down
    (256 inputs per row, one super-block) of each layer becomes random blocks with sane fp16 scales."""
    llama_cpp_style_gguf(random_hf(), tmp_path / "q8.gguf", {})
    rng, replace, expected = np.random.default_rng(0), {}, {}
    for i, qtype in enumerate((gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K)):
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        data = rng.integers(0, 256, (128, 256 // block * size), dtype=np.uint8)
        scales = np.full((128, 2), 0.01, dtype=np.float16).view(np.uint8)  # (128, 4): d and dmin
        if qtype == gguf.GGMLQuantizationType.Q4_K:
            data[:, :4] = scales  # block_q4_K starts with d, dmin
        else:
            data[:, -2:] = scales[:, :2]  # block_q6_K ends with d
        replace[f"blk.{i}.ffn_down.weight"] = (data, qtype)
        expected[i] = torch.from_numpy(gguf.quants.dequantize(data, qtype))
    rewrite_gguf(tmp_path / "q8.gguf", tmp_path / "k.gguf", replace)
    model = load_pretrained(tmp_path / "k.gguf", quantize=None, dtype=torch.float32)
    for i in range(2):
        got = model.model.layers[i].mlp.down_proj.weight
        assert got.shape == (128, 256) and torch.isfinite(got).all()
        assert torch.equal(got, expected[i])


def test_rope_scaling_survives_export(spm_dir, tmp_path):
    for scaling in ({"rope_type": "linear", "factor": 4.0},
                    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 32}):
        path = tmp_path / scaling["rope_type"]
        random_hf(rope_scaling=scaling, rope_theta=500000.0).save_pretrained(path)
        model = load_pretrained(path, quantize=None, dtype=torch.float32).eval()
        back = load_pretrained(gguf_io.export_gguf(model, spm_dir, path / "m.gguf", dtype="f32"),
                               quantize=None, dtype=torch.float32).eval()
        assert back.config.rope_scaling == model.config.rope_scaling and back.config.rope_theta == 500000.0
        with torch.no_grad():
            assert rel(back(IDS), model(IDS)) <= 1e-5


def test_llama3_rope_recovered_from_rope_freqs_alone():
    """A llama.cpp GGUF of Llama 3.1 stores only per-frequency divisors (rope_freqs): the fit recovers scaling
    parameters giving the same frequencies."""
    cfg = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192})
    factors = gguf_io.llama3_rope_factors(cfg)
    plain = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_theta=500000.0)
    fitted = gguf_io._fit_llama3_rope(factors, plain, "test.gguf")
    assert fitted["factor"] == 8.0 and fitted["original_max_position_embeddings"] == 8192
    assert abs(fitted["high_freq_factor"] - 4.0) < 1e-6
    torch.testing.assert_close(rope_inv_freq(LlamaConfig(**{**plain.__dict__, "rope_scaling": fitted})),
                               rope_inv_freq(cfg))
    with pytest.raises(ValueError, match="not llama3 rope scaling"):
        gguf_io._fit_llama3_rope(torch.linspace(1, 3, 64), plain, "test.gguf")


def test_export_of_quantized_model_dequantizes(models_, spm_dir, tmp_path):
    nf4 = load_pretrained(models_["gqa"][1], quantize="nf4", dtype=torch.float32).eval()
    back = load_pretrained(gguf_io.export_gguf(nf4, spm_dir, tmp_path / "m.gguf", dtype="f32"), quantize=None,
                           dtype=torch.float32).eval()
    with torch.no_grad():
        assert rel(back(IDS), nf4(IDS)) <= 1e-5


# -- tokenizers ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["spm", "bpe"])
def test_tokenizer_roundtrip(models_, spm_dir, bpe_dir, tmp_path, which):
    tok_dir = spm_dir if which == "spm" else bpe_dir
    original = Tokenizer.from_pretrained(tok_dir)
    for source in (tok_dir, original):  # a directory or a loaded Tokenizer
        out = gguf_io.export_gguf(models_["gqa"][0], source, tmp_path / "m.gguf")
        tok = gguf_io.load_tokenizer(out)
        assert (tmp_path / "m.gguf.tokenizer" / ("tokenizer.model" if which == "spm" else "tokenizer.json")).is_file()
        specials = " <tool> </s>" if which == "spm" else " <|end_of_text|>"
        for text in [*TEXTS, TEXTS[0] + specials]:
            assert tok.encode(text) == original.encode(text), text
            assert tok.decode(tok.encode(text)) == original.decode(original.encode(text))
        assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.add_eos) == (original.bos_id, original.eos_id,
                                                                     original.add_bos, original.add_eos)
    reader = gguf.GGUFReader(out)
    assert reader.get_field("tokenizer.ggml.model").contents() == ("llama" if which == "spm" else "gpt2")
    assert len(reader.get_field("tokenizer.ggml.tokens").contents()) == VOCAB  # padded to the embedding rows
    if which == "bpe":
        assert reader.get_field("tokenizer.ggml.pre").contents() == "llama-bpe"
    else:
        assert reader.get_field("tokenizer.chat_template").contents() == TEMPLATE
        assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<user>hi"


def test_transformers_reads_our_gguf_tokenizer(models_, bpe_dir, tmp_path):
    gguf_io.export_gguf(models_["gqa"][0], bpe_dir, tmp_path / "m.gguf")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    original = Tokenizer.from_pretrained(bpe_dir)
    for text in TEXTS:
        assert theirs.encode(text) == original.encode(text), text


def test_tokenizer_errors(models_, spm_dir, tmp_path):
    small = LlamaConfig(**{**TINY, "vocab_size": 100})
    with pytest.raises(ValueError, match=r"390 tokens but the model's vocab_size is 100"):
        gguf_vocab.vocab_from_tokenizer(spm_dir, small.vocab_size)
    hf = random_hf()
    llama_cpp_style_gguf(hf, tmp_path / "notok.gguf", {})
    with pytest.raises(ValueError, match=r"notok\.gguf: holds no tokenizer"):
        gguf_io.load_tokenizer(tmp_path / "notok.gguf")


# -- errors -------------------------------------------------------------------------------------------------------

def test_other_architecture_refused(tmp_path):
    w = gguf.GGUFWriter(tmp_path / "qwen.gguf", "qwen2")
    w.add_embedding_length(128)
    w.add_tensor("token_embd.weight", np.zeros((16, 128), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"qwen\.gguf: general\.architecture is 'qwen2'; minqlora reads only 'llama'"):
        load_pretrained(tmp_path / "qwen.gguf")


def test_truncated_and_incomplete_gguf(tmp_path):
    llama_cpp_style_gguf(random_hf(), tmp_path / "ok.gguf", {})
    data = (tmp_path / "ok.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.gguf: not a readable GGUF file"):
        load_pretrained(tmp_path / "cut.gguf")
    # A file missing one tensor: named with its GGUF name.
    rewrite_gguf(tmp_path / "ok.gguf", tmp_path / "missing.gguf", drop={"blk.1.ffn_up.weight"})
    with pytest.raises(ValueError, match=r"missing\.gguf \(tensor 'blk\.1\.ffn_up\.weight'\): missing tensor "
                                         r"'model\.layers\.1\.mlp\.up_proj\.weight'"):
        load_pretrained(tmp_path / "missing.gguf")


def test_export_refuses_unmerged_lora_and_bad_dtype(models_, spm_dir, tmp_path):
    model = load_pretrained(models_["gqa"][1], quantize=None, dtype=torch.float32)
    with pytest.raises(ValueError, match="dtype must be one of"):
        gguf_io.export_gguf(model, spm_dir, tmp_path / "m.gguf", dtype="q4_k")
    model.model.layers[0].self_attn.q_proj = torch.nn.Sequential(model.model.layers[0].self_attn.q_proj)
    with pytest.raises(ValueError, match=r"self_attn\.q_proj is a Sequential.*merge_lora"):
        gguf_io.export_gguf(model, spm_dir, tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())
