"""GGUF files (llama.cpp's format) for Llama models: import as a checkpoint, export a 16-bit model.

Covers
- reading: `GGUFCheckpoint(path)` maps a GGUF of architecture "llama" to a `LlamaConfig` and serves its tensors
  under Hugging Face names, dequantized (F32/F16/BF16 directly, Q8_0/Q4_0/Q4_1/K-quants/... through
  `gguf.quants.dequantize`) and with llama.cpp's Q/K row permutation undone; checkpoint.py loads it layer by layer;
- writing: `export_gguf(model, tokenizer, out_file, dtype)` writes a merged Llama (16-bit, or Linear4bit weights
  dequantized) as F16/BF16/Q8_0 with the metadata and tokenizer keys llama.cpp reads, one tensor in memory at a time.
Leaves out: the tokenizer conversions (gguf_vocab.py), LoRA merging (lora.py), and architectures other than llama
(refused by name: their tensors and hyper-parameters mean different things).

The Q/K permutation: HF applies rotary embeddings to pairs (i, i + head_dim/2) of each head ("rotate half"),
llama.cpp to adjacent pairs (2i, 2i+1). llama.cpp's converter therefore reorders the rows of q_proj / k_proj (and
their biases) within each head; `_to_gguf_rows` is that reordering and `_from_gguf_rows` its inverse.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from . import gguf_vocab
from .linear4bit import Linear4bit
from .model import Llama, LlamaConfig, RMSNorm, rope_inv_freq
from .tokenizer import Tokenizer

ARCH = "llama"
Q = gguf.GGMLQuantizationType
# HF module name inside a decoder layer -> GGUF name inside "blk.N"; and the modules outside the layers.
LAYER_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's per-frequency divisors, how it stores llama3 rope scaling
ROPE_SCALING_KEY = "minqlora.rope_scaling"  # our exact llama3 parameters (JSON); llama.cpp ignores unknown keys
EXPORT_TYPES = {"f32": (Q.F32, gguf.LlamaFileType.ALL_F32), "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
                "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16), "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}


def gguf_name(hf_name: str) -> str:
    """'model.layers.3.self_attn.q_proj.weight' -> 'blk.3.attn_q.weight'; 'lm_head.weight' -> 'output.weight'."""
    module, kind = hf_name.rsplit(".", 1)
    if module.startswith("model.layers."):
        _, _, i, rest = module.split(".", 3)
        return f"blk.{i}.{LAYER_NAMES[rest]}.{kind}"
    return f"{GLOBAL_NAMES[module]}.{kind}"


def hf_names(config: LlamaConfig) -> list[str]:
    """Every parameter name of a Llama with this config, in checkpoint order (lm_head omitted when tied)."""
    names = ["model.embed_tokens.weight"]
    for i in range(config.num_hidden_layers):
        for module in LAYER_NAMES:
            names.append(f"model.layers.{i}.{module}.weight")
            bias = config.attention_bias if module.startswith("self_attn") else config.mlp_bias
            if bias and module.endswith("proj"):
                names.append(f"model.layers.{i}.{module}.bias")
    names.append("model.norm.weight")
    if not config.tie_word_embeddings:
        names.append("lm_head.weight")
    return names


def _qk_heads(hf_name: str, config: LlamaConfig) -> int | None:
    """How many heads the rows of this tensor split into if llama.cpp permutes it (q/k weight and bias), else None."""
    if ".self_attn.q_proj." in hf_name:
        return config.num_attention_heads
    if ".self_attn.k_proj." in hf_name:
        return config.num_key_value_heads
    return None


def _to_gguf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    # (heads·hd, ...) viewed as (heads, 2, hd/2, ...): halves [x0..x_{hd/2-1}], [y0..] -> interleaved x0 y0 x1 y1 ...
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _from_gguf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def llama3_rope_factors(config: LlamaConfig) -> torch.Tensor:
    """llama.cpp's rope_freqs for a llama3-scaled config: unscaled inv_freq / scaled inv_freq, (head_dim/2,) fp32."""
    plain = rope_inv_freq(dataclasses.replace(config, rope_scaling=None))
    return plain / rope_inv_freq(config)


def _fit_llama3_rope(factors: torch.Tensor, config: LlamaConfig, path) -> dict:
    """Recover llama3 rope_scaling parameters from llama.cpp's rope_freqs divisors.

    Between the two plateaus (divisor 1 at high frequencies, `factor` at low ones) llama3 interpolates 1/divisor
    linearly in smooth = (L / wavelength - low) / (high - low), so two or more interpolated frequencies determine
    L/(high-low) and low/(high-low); fixing low_freq_factor = 1 then fixes the rest. Verified by recomputing.
    """
    factor = float(factors.max())
    inv = rope_inv_freq(config).double()  # config has no scaling yet: the plain frequencies
    smooth = (1 / factors.double() - 1 / factor) / (1 - 1 / factor)
    mid = (smooth > 1e-4) & (smooth < 1 - 1e-4)
    if factor > 1 and int(mid.sum()) >= 2:
        x = inv[mid] / (2 * torch.pi)  # 1 / wavelength
        a, b = torch.linalg.lstsq(torch.stack([x, torch.ones_like(x)], 1), smooth[mid, None]).solution.flatten()
        high = 1 - 1 / float(b)
        scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": high,
                   "original_max_position_embeddings": round(-float(a) / float(b))}
        fitted = llama3_rope_factors(dataclasses.replace(config, rope_scaling=scaling))
        if torch.allclose(fitted, factors, rtol=1e-3):
            return scaling
    raise ValueError(f"{path}: '{ROPE_FREQS}' holds rope frequency factors that are not llama3 rope scaling; "
                     "minqlora's Llama cannot represent them")


def open_reader(path) -> gguf.GGUFReader:
    """The one way GGUF files are opened (checkpoints, tokenizers, export's tokenizer copy): a file that is not a
    GGUF, or is truncated or corrupt, raises one ValueError naming it instead of numpy's reshape/dtype messages."""
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError, TypeError) as e:  # a truncated file runs off its memmap
        raise ValueError(f"{path}: not a readable GGUF file (truncated or corrupt?): {' '.join(str(e).split())}") \
            from None


class GGUFCheckpoint:
    """A GGUF file of a Llama, read through `gguf.GGUFReader` (memory-mapped: tensors are read on demand).

    config: the LlamaConfig from the llama.* metadata; shapes: HF name -> shape (out, in) in HF order;
    read(names, convert): {name: convert(name, tensor)} with tensor dequantized (F32/F16/BF16 kept, others float32)
    and Q/K rows back in HF order.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.reader = open_reader(self.path)
        arch = self.field("general.architecture")
        if arch != ARCH:
            raise ValueError(f"{self.path}: general.architecture is {arch!r}; minqlora reads only 'llama' GGUF files")
        by_name = {t.name: t for t in self.reader.tensors}
        self.config = self._config(by_name)
        self.tensors = {}
        for name in hf_names(self.config):
            if gguf_name(name) in by_name:
                self.tensors[name] = by_name.pop(gguf_name(name))
        by_name.pop(ROPE_FREQS, None)  # consumed by _config
        if by_name:
            raise ValueError(f"{self.path}: tensors this Llama has no place for: {sorted(by_name)[:8]}")
        self.shapes = {n: tuple(int(d) for d in reversed(t.shape.tolist())) for n, t in self.tensors.items()}
        self.dtypes = {n: t.tensor_type.name for n, t in self.tensors.items()}

    def field(self, key: str, default=None):
        f = self.reader.get_field(key)
        if f is None:
            return default
        value = f.contents()
        return value.item() if isinstance(value, np.generic) else value

    def _need(self, key: str):
        value = self.field(key)
        if value is None:
            raise ValueError(f"{self.path}: missing metadata key '{key}'")
        if isinstance(value, list):  # some writers store per-layer head counts; a Llama has one value
            if len(set(value)) != 1:
                raise ValueError(f"{self.path}: '{key}' varies per layer ({value}); not a plain Llama")
            value = value[0]
        return value

    def _config(self, tensors) -> LlamaConfig:
        a = ARCH
        if (self.field(f"{a}.expert_count") or 0) > 0:
            raise ValueError(f"{self.path}: a mixture-of-experts model ({a}.expert_count > 0) is not a plain Llama")
        hidden, heads = int(self._need(f"{a}.embedding_length")), int(self._need(f"{a}.attention.head_count"))
        kv_heads = self.field(f"{a}.attention.head_count_kv")
        head_dim = int(self.field(f"{a}.attention.key_length") or hidden // heads)
        rope_dims = int(self.field(f"{a}.rope.dimension_count") or head_dim)
        if rope_dims != head_dim:
            raise ValueError(f"{self.path}: partial rotary ({a}.rope.dimension_count={rope_dims} < head dim "
                             f"{head_dim}) is not supported")
        tokens = self.field("tokenizer.ggml.tokens") or []
        vocab = self.field(f"{a}.vocab_size") or len(tokens)
        if not vocab and "token_embd.weight" in tensors:
            vocab = int(tensors["token_embd.weight"].shape[1])
        cfg = LlamaConfig(
            vocab_size=int(vocab), hidden_size=hidden, intermediate_size=int(self._need(f"{a}.feed_forward_length")),
            num_hidden_layers=int(self._need(f"{a}.block_count")), num_attention_heads=heads,
            num_key_value_heads=int(kv_heads[0] if isinstance(kv_heads, list) else kv_heads or heads),
            head_dim=head_dim, rms_norm_eps=float(self.field(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(self.field(f"{a}.rope.freq_base", 10000.0)),
            max_position_embeddings=int(self.field(f"{a}.context_length", 2048)),
            tie_word_embeddings="output.weight" not in tensors,
            attention_bias="blk.0.attn_q.bias" in tensors, mlp_bias="blk.0.ffn_gate.bias" in tensors,
            bos_token_id=self.field("tokenizer.ggml.bos_token_id"),
            eos_token_id=self.field("tokenizer.ggml.eos_token_id"),
            pad_token_id=self.field("tokenizer.ggml.padding_token_id"))
        scaling_type = self.field(f"{a}.rope.scaling.type", "none")
        if scaling_type == "linear":
            factor = float(self._need(f"{a}.rope.scaling.factor"))
            cfg = dataclasses.replace(cfg, rope_scaling={"rope_type": "linear", "factor": factor})
        elif scaling_type != "none":
            raise ValueError(f"{self.path}: rope scaling type {scaling_type!r} is not supported (none, linear, llama3)")
        if ROPE_FREQS in tensors:
            factors = torch.from_numpy(np.array(tensors[ROPE_FREQS].data, dtype=np.float32)).flatten()
            stored = self.field(ROPE_SCALING_KEY)
            scaling = json.loads(stored) if stored else None
            if scaling is None or not torch.allclose(
                    llama3_rope_factors(dataclasses.replace(cfg, rope_scaling=scaling)), factors, rtol=1e-5):
                scaling = _fit_llama3_rope(factors, cfg, self.path)
            cfg = dataclasses.replace(cfg, rope_scaling=scaling)
        return cfg

    def read(self, names, convert) -> dict[str, torch.Tensor]:
        out = {}
        for name in names:
            t = self.tensors[name]
            x = _dequantize(t, self.shapes[name], self.path)
            heads = _qk_heads(name, self.config)
            if heads is not None:
                x = _from_gguf_rows(x, heads)
            out[name] = convert(name, x)
        return out


def _dequantize(t, shape, path) -> torch.Tensor:
    """One GGUF tensor as a torch tensor of HF shape, copied out of the memory map."""
    if t.tensor_type in (Q.F32, Q.F16):
        return torch.from_numpy(np.array(t.data)).reshape(shape)
    if t.tensor_type == Q.BF16:  # stored as uint8 (rows, 2·cols): reinterpret the bytes, no float32 detour
        return torch.from_numpy(np.array(t.data).view(np.int16)).view(torch.bfloat16).reshape(shape)
    try:
        return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(shape)
    except NotImplementedError:
        raise ValueError(f"{path}: tensor '{t.name}' has type {t.tensor_type.name}, which the gguf package cannot "
                         "dequantize") from None


# -- export ---------------------------------------------------------------------------------------------------------

def _export_module(model: Llama, hf_name: str) -> tuple[nn.Module, str]:
    """(module, "weight" | "bias") holding a parameter to export; LoRA and other wrappers must be merged first."""
    module_name, kind = hf_name.rsplit(".", 1)
    module = model.get_submodule(module_name)
    if not isinstance(module, (nn.Linear, nn.Embedding, RMSNorm, Linear4bit)):
        raise ValueError(f"{module_name} is a {type(module).__name__}, not a plain or 4-bit Linear: merge LoRA "
                         "adapters into the weights (merge_lora) before exporting to GGUF")
    return module, kind


def _export_shape(model: Llama, hf_name: str) -> list[int]:
    module, kind = _export_module(model, hf_name)
    if isinstance(module, Linear4bit) and kind == "weight":
        return [module.out_features, module.in_features]
    return list(getattr(module, kind).shape)


def _export_weight(model: Llama, hf_name: str) -> torch.Tensor:
    """A parameter as float32 on the CPU; 4-bit weights are dequantized."""
    module, kind = _export_module(model, hf_name)
    if isinstance(module, Linear4bit) and kind == "weight":
        return module.dequantize(torch.float32).cpu()
    return getattr(module, kind).detach().to("cpu", torch.float32)


def _export_type(shape, qtype):
    """Type of one tensor: 1-D tensors (norms, biases) stay F32 as in llama.cpp; Q8_0 needs rows of 32k values."""
    if len(shape) == 1:
        return Q.F32
    if qtype == Q.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
        return Q.F16
    return qtype


def _encode(x: torch.Tensor, qtype) -> np.ndarray:
    """float32 tensor -> the array GGUFWriter writes: F32/F16 values, or uint8 bytes (rows, bytes per row)."""
    if qtype == Q.F32:
        return x.numpy()
    if qtype == Q.F16:
        return x.half().numpy()
    if qtype == Q.BF16:
        return x.bfloat16().view(torch.uint8).numpy()  # bf16 rounds to nearest even, as llama.cpp's converter
    return gguf.quants.quantize(x.numpy(), qtype)


def export_gguf(model: Llama, tokenizer, out_file, dtype: str = "f16", name: str | None = None) -> Path:
    """Write a Llama (16-bit, or with Linear4bit weights dequantized; LoRA merged) and its tokenizer as GGUF.

    tokenizer: a directory with tokenizer.model or tokenizer.json (+ tokenizer_config.json), or a loaded
    minqlora Tokenizer. dtype: "f16", "bf16", "q8_0" (2-D weights; norms stay F32) or "f32". Written to a
    temporary name and renamed; returns the path.
    """
    if dtype not in EXPORT_TYPES:
        raise ValueError(f"dtype must be one of {sorted(EXPORT_TYPES)}, got {dtype!r}")
    qtype, file_type = EXPORT_TYPES[dtype]
    cfg, out_file = model.config, Path(out_file)
    # Everything that can refuse happens before a file is opened.
    vocab = gguf_vocab.vocab_from_tokenizer(tokenizer, cfg.vocab_size)
    plan = [(n, _export_shape(model, n)) for n in hf_names(cfg)]
    tmp = out_file.with_name(out_file.name + f".tmp{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, ARCH)
    try:
        writer.add_name(name or "minqlora-llama")
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_context_length(cfg.max_position_embeddings)
        writer.add_embedding_length(cfg.hidden_size)
        writer.add_feed_forward_length(cfg.intermediate_size)
        writer.add_block_count(cfg.num_hidden_layers)
        writer.add_head_count(cfg.num_attention_heads)
        writer.add_head_count_kv(cfg.num_key_value_heads)
        writer.add_rope_dimension_count(cfg.head_dim)
        if cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
            writer.add_key_length(cfg.head_dim)
            writer.add_value_length(cfg.head_dim)
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        extra = {}
        if cfg.rope_scaling and cfg.rope_scaling["rope_type"] == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(cfg.rope_scaling["factor"])
        elif cfg.rope_scaling:  # llama3: llama.cpp divides each frequency by rope_freqs
            extra[ROPE_FREQS] = llama3_rope_factors(cfg)
            writer.add_string(ROPE_SCALING_KEY, json.dumps(cfg.rope_scaling))
        gguf_vocab.add_to_writer(writer, vocab)

        # Two passes so only one tensor is ever materialized: the header needs every shape and size up front.
        # Tensor infos first (shape in numpy order; uint8 byte shapes for block types), then the data in order.
        for gname, x in extra.items():
            writer.add_tensor_info(gname, list(x.shape), np.dtype(np.float32), x.numel() * 4)
        for n, shape in plan:
            t = _export_type(shape, qtype)
            byte_shape = gguf.quant_shape_to_byte_shape(shape, t) if t not in (Q.F32, Q.F16) else shape
            np_dtype = {Q.F32: np.float32, Q.F16: np.float16}.get(t, np.uint8)
            nbytes = int(np.prod(byte_shape)) * np.dtype(np_dtype).itemsize
            writer.add_tensor_info(gguf_name(n), byte_shape, np.dtype(np_dtype), nbytes,
                                   raw_dtype=None if t in (Q.F32, Q.F16) else t)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for x in extra.values():
            writer.write_tensor_data(x.numpy())
        for n, shape in plan:
            x = _export_weight(model, n)
            heads = _qk_heads(n, cfg)
            if heads is not None:
                x = _to_gguf_rows(x, heads)
            writer.write_tensor_data(_encode(x.contiguous(), _export_type(shape, qtype)))
        writer.close()
        os.replace(tmp, out_file)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out_file


def export_tokenizer(gguf_path, out_dir) -> Path:
    """Write the tokenizer embedded in a GGUF as files `Tokenizer.from_pretrained(out_dir)` loads."""
    return gguf_vocab.write_tokenizer_files(open_reader(gguf_path), out_dir, source=gguf_path)


def load_tokenizer(gguf_path, cache_dir=None):
    """The GGUF's tokenizer as a minqlora Tokenizer, converted into `cache_dir` (default: '<file>.tokenizer' next
    to the GGUF)."""
    gguf_path = Path(gguf_path)
    out = Path(cache_dir) if cache_dir is not None else gguf_path.with_name(gguf_path.name + ".tokenizer")
    export_tokenizer(gguf_path, out)
    return Tokenizer.from_pretrained(out)
