"""Plain Llama: config, RMSNorm, rotary embeddings, GQA attention, SwiGLU MLP, a KV cache (and static_cache.py's).

Covers the forward pass of Hugging Face's `LlamaForCausalLM` with the same module and parameter names, so a HF
state dict loads by name and other code can swap any projection (`q_proj`, ..., `down_proj`, `lm_head`) for a
quantized or LoRA module: every projection is called as a plain `module(x)`.

Leaves out: checkpoint loading (checkpoint.py builds a `Llama` on the meta device, materializes it with `to_empty`
and loads weights), quantization and LoRA (module swaps from linear4bit.py and lora.py), the loss (sft.py, loss.py),
activation checkpointing's and host layers' mechanics (checkpointing.py, host_layers.py) and decoding loops
(generate.py). Rope types other than default / linear / llama3 are refused rather than approximated.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import fused
from .checkpointing import HostOffloader, checkpoint_layer, checkpoint_mode
from .host_layers import PREFETCH_LAYERS, HostParking, host_layer_range
from .fused import rms_norm, rope_qk, swiglu  # the elementwise spec; fused.call runs their fused GPU path
from .static_cache import StaticKVCache

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "LlamaModel")


@dataclass
class LlamaConfig:
    vocab_size: int = 32000  # rows of embed_tokens and lm_head
    hidden_size: int = 4096  # model width H
    intermediate_size: int = 11008  # SwiGLU inner width
    num_hidden_layers: int = 32  # decoder blocks
    num_attention_heads: int = 32  # query heads
    num_key_value_heads: int | None = None  # key/value heads (GQA); None means one per query head
    head_dim: int | None = None  # per-head width; None means hidden_size // num_attention_heads
    hidden_act: str = "silu"  # only SiLU (the Llama SwiGLU) is implemented
    rms_norm_eps: float = 1e-6  # epsilon inside RMSNorm's rsqrt
    rope_theta: float = 10000.0  # rotary base; Llama-3 uses 500000
    rope_scaling: dict | None = None  # None, {"rope_type": "linear", "factor"} or llama3's four keys (LLAMA3_ROPE_KEYS)
    max_position_embeddings: int = 2048  # longest context the checkpoint was trained for (informational)
    tie_word_embeddings: bool = False  # lm_head shares embed_tokens' weight
    attention_bias: bool = False  # bias on q/k/v/o projections
    mlp_bias: bool = False  # bias on gate/up/down projections
    attention_dropout: float = 0.0  # dropout on attention probabilities, training only
    bos_token_id: int | None = 1  # beginning-of-sequence id
    eos_token_id: int | list[int] | None = 2  # end-of-sequence id, or several (Llama-3 instruct stops on two)
    pad_token_id: int | None = None  # padding id; not used by the forward pass (padding is the attention mask's job)
    torch_dtype: str | None = None  # dtype the checkpoint is stored in ("bfloat16", ...); construction ignores it

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        self.rope_scaling = _normalize_rope_scaling(self.rope_scaling)

    @classmethod
    def from_hf(cls, d: dict) -> LlamaConfig:
        """Read a HF `config.json` dict (transformers 4.x `rope_scaling` or 5.x `rope_parameters` style)."""
        model_type = d.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(f"model_type {model_type!r} is not supported (only 'llama')")
        for arch in d.get("architectures") or []:
            if arch not in SUPPORTED_ARCHITECTURES:
                raise ValueError(f"architectures entry {arch!r} is not supported (only {SUPPORTED_ARCHITECTURES})")
        # transformers 5 nests rope_theta and the scaling keys in one "rope_parameters" dict.
        source = "rope_parameters" if d.get("rope_parameters") else "rope_scaling"
        rope = dict(d.get(source) or {})
        theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
        _normalize_rope_scaling(rope, source)  # validate here so errors name the key the file actually uses
        fields = {k: d[k] for k in cls.__dataclass_fields__ if k in d and k not in ("rope_theta", "rope_scaling")}
        if "torch_dtype" not in fields and d.get("dtype") is not None:
            fields["torch_dtype"] = d["dtype"]
        return cls(**fields, rope_theta=float(theta), rope_scaling=rope or None)

    def to_hf(self) -> dict:
        """A `config.json` dict that transformers 4.x and 5.x both read as `LlamaForCausalLM`."""
        d = asdict(self)
        if d["rope_scaling"] is None:
            del d["rope_scaling"]
        if d["torch_dtype"] is None:
            del d["torch_dtype"]
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **d}


def _normalize_rope_scaling(scaling: dict | None, field: str = "rope_scaling") -> dict | None:
    """Validate a rope_scaling dict; return None for plain RoPE or a copy keyed by "rope_type"."""
    if not scaling:
        return None
    scaling = dict(scaling)
    rope_type = scaling.pop("type", None)  # transformers < 4.45 spelled it "type"
    rope_type = scaling.setdefault("rope_type", rope_type or "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"{field}.rope_type {rope_type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})")
    needed = {"default": (), "linear": ("factor",), "llama3": LLAMA3_ROPE_KEYS}[rope_type]
    for key in needed:
        if key not in scaling:
            raise ValueError(f"{field}.{key} is required for rope_type {rope_type!r}")
    return None if rope_type == "default" else scaling


def rope_inv_freq(config: LlamaConfig, device=None) -> torch.Tensor:
    """Rotary inverse frequencies, fp32, shape (head_dim // 2,), with linear or llama3 scaling applied."""
    dim = config.head_dim
    exponent = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    inv_freq = 1.0 / (config.rope_theta**exponent)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # llama3 (Llama 3.1 report, "RoPE scaling"): wavelengths longer than the original context divide by factor,
    # shorter than context / high_freq_factor stay, and the band between interpolates smoothly.
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions, in HF's rotate-half layout (frequencies repeated twice along head_dim)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        # Non-persistent: not in state_dict, so keys match HF; recomputed by reset() / init_rope().
        self.register_buffer("inv_freq", rope_inv_freq(config, device=None), persistent=False)

    def reset(self, device=None):
        self.inv_freq = rope_inv_freq(self.config, device=device or self.inv_freq.device)

    def _apply(self, fn, recurse=True):
        # .to(bfloat16) would round inv_freq (relative error 2^-9: ~8 rad of phase at position 4096) and
        # to_empty() leaves it uninitialized; either way recompute the fp32 values wherever the buffer now lives.
        super()._apply(fn, recurse)
        self.reset(self.inv_freq.device)
        return self

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids (B, T) -> cos, sin (B, T, head_dim), computed in fp32 then cast like HF.
        freqs = position_ids[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalized in fp32 and cast back to the input dtype before the weight (as HF does)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused.call(rms_norm, x, self.weight, self.eps)  # one kernel on the GPU (fused.py)


class KVCache:
    """Preallocated keys and values for every layer: (B, kv_heads, max_len, head_dim) each, plus a fill length.

    Preallocated rather than grown by concatenation so a decode step copies one position instead of the whole
    past, and tensor addresses stay fixed. Buffers are allocated on the first write, taking batch size, dtype and
    device from the keys, so callers only choose `max_len` (prompt length + tokens to generate).
    `length` is advanced by `Llama`'s forward once all layers have written.
    """

    def __init__(self, num_layers: int, max_len: int):
        self.max_len = max_len
        self.length = 0
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v (B, kv_heads, T, head_dim) written at [length, length + T); returns views over [0, length + T).
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KVCache overflow: {end} positions > max_len {self.max_len}")
        if self.keys[layer] is None:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.keys[layer] = k.new_zeros(shape)
            self.values[layer] = v.new_zeros(shape)
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def rope_update(self, layer: int, q, k, v, cos, sin) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rotated q, *update(layer, rotated k, v)): what Attention runs with a cache."""
        q, k = fused.call(rope_qk, q, k, cos, sin)
        return (q, *self.update(layer, k, v))


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.dropout = config.attention_dropout
        h, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=bias)

    def forward(self, x, cos, sin, mask, cache: KVCache | StaticKVCache | None):
        # x (B, T, H) -> q (B, heads, T, hd), k/v (B, kv_heads, T, hd)
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        if cache is None:
            q, k = fused.call(rope_qk, q, k, cos, sin)
        else:  # rotary on q and k, then k and v into the cache: (B, kv_heads, S, hd), S = past + T or max_len if static
            q, k, v = cache.rope_update(self.layer_idx, q, k, v, cos, sin)
        # mask None means plain causal over q and k of equal length (lets SDPA pick flash/efficient kernels).
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and t > 1,
            dropout_p=self.dropout if self.training else 0.0, scale=self.head_dim**-0.5,
            enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)

    def forward(self, x):
        return self.down_proj(fused.call(swiglu, self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache: KVCache | StaticKVCache | None = None):
        return self.mlp_block(self.attention_block(x, cos, sin, mask, cache))

    # The two residual halves, callable apart so checkpointing.py can recompute (and offload) them one at a time.
    def attention_block(self, x, cos, sin, mask, cache: KVCache | StaticKVCache | None = None):
        return x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)

    def output_projections(self) -> tuple[nn.Module, nn.Module]:
        """(o_proj, down_proj): the last op of each residual half, whose outputs go only into the residual sums above,
        so a recomputation for backward needs their inputs and not their outputs (checkpointing.py)."""
        return self.self_attn.o_proj, self.mlp.down_proj

    def mlp_block(self, x):
        # Position-wise: any split of the tokens gives the same result (checkpointing.py tiles long sequences).
        return x + self.mlp(self.post_attention_layernorm(x))


def attention_mask_4d(attention_mask: torch.Tensor | None, past: int, t: int, device) -> torch.Tensor | None:
    """Boolean (B or 1, 1, T, past + T) mask, True = attend; None when plain causal SDPA suffices.

    attention_mask (B, past + T) of 1/0 marks real tokens (left or right padding). Each query also attends to
    itself even when it is padding: a fully masked row would make SDPA return NaN, and NaN values at padded
    keys would then leak through the zero attention weights of later layers.
    A 4-D boolean (B, 1, T, past + T) mask is used as given: packed rows, where several sequences share a row and
    attend only within themselves (data.packed_attention_mask).
    """
    if attention_mask is None and (past == 0 or t == 1):
        return None
    s = past + t
    if attention_mask is not None and attention_mask.dim() == 4:
        if attention_mask.dtype != torch.bool or tuple(attention_mask.shape[1:]) != (1, t, s):
            raise ValueError(f"a 4-D attention_mask must be boolean (B, 1, {t}, {s}), got {attention_mask.dtype} "
                             f"{tuple(attention_mask.shape)}")
        return attention_mask
    q_pos = torch.arange(past, s, device=device)[:, None]
    k_pos = torch.arange(s, device=device)[None, :]
    allowed = (k_pos <= q_pos)[None, None]  # (1, 1, T, S)
    if attention_mask is not None:
        if attention_mask.shape[-1] != s:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions, expected past + T = {s}")
        allowed = allowed & attention_mask.bool()[:, None, None, :]
    return allowed | (k_pos == q_pos)


class LlamaModel(nn.Module):
    """Embeddings, decoder stack and final norm: input_ids (B, T) -> hidden states (B, T, H)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        # No padding_idx: it only zeroes one row's gradient, and the embedding is frozen in QLoRA.
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.gradient_checkpointing = False  # or "full" / "selective" / "none" (checkpointing.py); True = "full"
        self.offload_checkpoints = False  # checkpointed layer inputs to pinned host memory (checkpointing.py)
        self.keep_last_layers = 0  # with checkpointing, the last N layers keep their activations (no recomputation)
        self.host_layers = 0  # N layers keep their activations in pinned host memory (host_layers.py): 0, s, 2s, ...
        self.host_stride = 1  # s: 1 parks the first N layers, more spaces them out so their copies do not queue
        self.host_prefetch = PREFETCH_LAYERS  # a host layer i comes back when the backward of layer i + this starts
        self.host_stats = None  # host_layers.HostStats of the last forward that parked layers

    def host_layer_range(self) -> range:
        """The layers a training forward parks in host memory, 0, host_stride, ... (host_layers of them);
        ValueError when host_layers is negative, host_stride < 1, or they run past the model's layers or into the
        last keep_last_layers (with checkpointing)."""
        keep = self.keep_last_layers if checkpoint_mode(self.gradient_checkpointing) != "none" else 0
        return host_layer_range(len(self.layers), self.host_layers, keep, self.host_stride)

    def forward(self, input_ids, attention_mask=None, position_ids=None,
                cache: KVCache | StaticKVCache | None = None):
        b, t = input_ids.shape
        if isinstance(cache, StaticKVCache):
            # Positions and the (B, 1, T, max_len) mask come from the cache's device-side state (static_cache.py);
            # attention_mask, if given, covers the T new tokens only.
            if position_ids is not None:
                raise ValueError("a StaticKVCache computes position_ids itself; pass attention_mask instead")
            position_ids, mask = cache.begin(attention_mask, t)
        else:
            past = cache.length if cache is not None else 0
            if position_ids is None:
                if attention_mask is not None and attention_mask.dim() == 4:
                    raise ValueError("a 4-D attention_mask needs explicit position_ids (they restart per packed "
                                     "sequence)")
                if attention_mask is not None:
                    # Count only real tokens, so left-padded rows start at position 0 like unpadded ones.
                    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
                else:
                    position_ids = torch.arange(past, past + t, device=input_ids.device).expand(b, t)
            mask = attention_mask_4d(attention_mask, past, t, input_ids.device)
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(position_ids, x.dtype)
        mode = checkpoint_mode(self.gradient_checkpointing)
        training = self.training and cache is None and torch.is_grad_enabled()
        recompute = mode != "none" and training
        offloader = HostOffloader(x.device) if recompute and self.offload_checkpoints else None
        # Layers in host (0, s, 2s, ...) parked in host memory; with checkpointing the others before `checkpointed`
        # recomputed; the rest kept on the GPU.
        host = self.host_layer_range() if training else range(0)
        parking = HostParking(x.device, host, len(self.layers) - 1, self.host_prefetch) if host else None
        checkpointed = len(self.layers) - self.keep_last_layers
        for i, layer in enumerate(self.layers):
            if i in host:
                x = parking.run(i, layer, x, cos, sin, mask)
            elif recompute and i < checkpointed:
                # Recompute each block in backward: keeps one (B, T, H) activation per layer instead of ~20.
                x = checkpoint_layer(layer, x, cos, sin, mask, mode=mode, offloader=offloader)
            else:
                x = layer(x, cos, sin, mask, cache)
            if parking is not None:
                parking.after_layer(i, x)  # releases parked layers' GPU copies; hangs their prefetch on x
        if parking is not None:
            parking.finish_forward()
            self.host_stats = parking.stats
        if isinstance(cache, KVCache):
            cache.length += t
        return self.norm(x)


class Llama(nn.Module):
    """Llama causal LM with HF `LlamaForCausalLM` names: `.model.*` and `.lm_head`.

    `Llama(config)` works under `torch.device("meta")`; after `to_empty(device=...)`, call `init_rope(device)`
    (to_empty already recomputes the rope buffer; the call makes it explicit) and `tie_weights()`, or load a state
    dict, which re-ties. A tied checkpoint without `lm_head.weight` loads: the embedding fills in for it.
    """

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self.register_load_state_dict_pre_hook(_fill_tied_lm_head)
        self.register_load_state_dict_post_hook(_retie_after_load)

    @property
    def gradient_checkpointing(self) -> bool | str:
        return self.model.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, mode: bool | str):
        checkpoint_mode(mode)  # refuse a bad mode here, not at the next forward
        self.model.gradient_checkpointing = mode

    def tie_weights(self):
        """Make lm_head use embed_tokens' weight when the config ties them (no-op otherwise)."""
        if self.config.tie_word_embeddings and isinstance(self.lm_head, nn.Linear):
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_rope(self, device=None):
        """Recompute the non-persistent rope buffer (after `to_empty` from the meta device)."""
        self.model.rotary_emb.reset(device)

    def forward(self, input_ids, attention_mask=None, position_ids=None,
                cache: KVCache | StaticKVCache | None = None):
        """input_ids (B, T) -> logits (B, T, vocab).

        attention_mask (B, past + T) of 1/0 covers cached positions too; position_ids (B, T) default to counts
        of real tokens (or past + arange(T) without a mask); cache is filled and advanced by T. With a
        StaticKVCache, attention_mask covers the T new tokens only and positions come from the cache.
        """
        return self.lm_head(self.model(input_ids, attention_mask, position_ids, cache))


def _retie_after_load(module, incompatible_keys):
    # load_state_dict(assign=True) gives lm_head and embed_tokens separate Parameters; make them one again.
    module.tie_weights()


def _fill_tied_lm_head(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
    # HF drops lm_head.weight from tied checkpoints; reuse the embedding so strict loading accepts them.
    head, embed = prefix + "lm_head.weight", prefix + "model.embed_tokens.weight"
    if module.config.tie_word_embeddings and head not in state_dict and embed in state_dict:
        state_dict[head] = state_dict[embed]
