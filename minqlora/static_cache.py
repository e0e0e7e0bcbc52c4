"""StaticKVCache: keys and values in fixed buffers, written at positions held in device tensors.

model.py's KVCache keeps its fill length in a Python int, so every decode step runs different Python values (slice
bounds, mask widths). Here all per-step state lives on the device and is updated in place: a decode step issues
the same kernels on the same addresses every time, which is what a CUDA graph (decode.py) needs. Attention then
runs over all max_len slots, with a mask that hides slots not yet written and left padding.

    keys[i], values[i]   (B, kv_heads, max_len, head_dim) per layer
    next_slot            (1,) long: the first slot not yet written, the same for every row
    written              (B, max_len) bool: slots holding a real token (False: left padding, or not yet written)
    next_position        (B,) long: each row's count of real tokens, the rotary position of its next one

rope_update is what Attention calls with a cache: the rotary embedding of q and k, then the writes of k and v. On a
GPU (the fused ops on, the extension's kernels built, autograd off, one dtype) that is one kernel,
ops.rope_kv_cache, where it was four: two RoPE launches and two index_copy_ (about 8.6 µs of each decoder layer's
28 µs outside the matmuls when decoding the 8B shape at batch 1 on an H200, benchmarks/README.md).
rope_kv_cache_ref below is its spec.

Leaves out: the decoding loop (decode.py) and the readable cache (model.KVCache). Positions past max_len are not
checked here (that would be a host sync); decode.py checks lengths before it starts.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from minqlora import fused, ops
from minqlora.fused import rope_qk


def rope_kv_cache_ref(q, k, v, cos, sin, k_cache, v_cache, slots) -> torch.Tensor:
    """q, k (B, heads, T, D) rotated (fused.rope_qk); the rotated k and v written into k_cache / v_cache
    (B, kv_heads, S, D) at slots (T,) along dim 2; returns the rotated q. What ops.rope_kv_cache computes."""
    q, k = fused.call(rope_qk, q, k, cos, sin)
    k_cache.index_copy_(2, slots, k)
    v_cache.index_copy_(2, slots, v)
    return q


def rope_kv_cache_applies(q, k, v, cos, sin, cache_dtype) -> bool:
    """Whether ops.rope_kv_cache may stand in for rope_kv_cache_ref: CUDA tensors on the fused path's extension
    backend (where fused.call would run ops.rope), autograd off, every tensor of one dtype, outside torch.compile
    (which traces the reference) and dispatch modes (which must see each aten op)."""
    # is_compiling first: under torch.compile the rest is not traced (current_backend's first call imports)
    return (not torch.compiler.is_compiling() and q.is_cuda and "cuda" in fused.fused_devices()
            and fused.current_backend() == "extension"
            and not torch.is_grad_enabled() and _get_current_dispatch_mode() is None
            and all(t.dtype == cache_dtype for t in (q, k, v, cos, sin)))


class StaticKVCache:
    def __init__(self, num_layers: int, batch_size: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.batch_size, self.max_len, self.dtype = batch_size, max_len, dtype
        shape = (batch_size, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.next_slot = torch.zeros(1, dtype=torch.long, device=device)
        self.written = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.slot_ids = torch.arange(max_len, device=device)  # (S,) 0..max_len-1, compared against query slots
        self.slots = self.next_slot  # (T,) slots of the forward in progress, set by begin()

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int) -> StaticKVCache:
        """A cache shaped for `model` (a Llama), in the dtype of its embeddings, on the device they are output to."""
        cfg, emb = model.config, model.model.embed_tokens
        device = getattr(emb, "device", emb.weight.device)  # a HostEmbedding's output device (its table is on the host)
        return cls(cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim,
                   emb.weight.dtype, device)

    def reset(self) -> None:
        """Empty the cache in place (a captured graph keeps pointing at these same tensors)."""
        for t in (*self.keys, *self.values, self.next_slot, self.written, self.next_position):
            t.zero_()

    def begin(self, attention_mask: torch.Tensor | None, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Claim slots for T new tokens; return their position_ids (B, T) and the attention mask (B, 1, T, max_len).

        attention_mask (B, T) of 1/0 covers the new tokens only (the cache remembers which earlier slots were real);
        None means all real. Called by LlamaModel.forward once per forward, before the layers write.
        The mask follows model.attention_mask_4d: a query sees real keys at or before its slot, and always itself.
        It is additive, in the cache's dtype: 0 where a query may attend, -inf elsewhere. That is what SDPA turns a
        boolean mask into before it picks a kernel, so the same values and kernel, but once per forward instead of
        in every layer: 3 kernels a decoder layer (a fill, a logical_not, a masked_fill_), about 3.5 µs each layer
        when decoding the 8B shape at batch 1 on an H200 (profile_decode.py).
        """
        b = self.batch_size
        if attention_mask is None:
            new = torch.ones(b, t, dtype=torch.bool, device=self.written.device)
        elif attention_mask.dim() != 2 or tuple(attention_mask.shape) != (b, t):
            raise ValueError(f"with a StaticKVCache, attention_mask must be ({b}, {t}) over the new tokens, got "
                             f"{tuple(attention_mask.shape)}")
        else:
            new = attention_mask.bool()
        self.slots = self.next_slot + torch.arange(t, device=self.written.device)  # (T,)
        self.written.index_copy_(1, self.slots, new)
        counts = new.long()
        # Count only real tokens, so left-padded rows start at position 0 like unpadded ones (as in model.py).
        position_ids = (self.next_position[:, None] + counts.cumsum(-1) - 1).clamp(min=0)  # (B, T)
        self.next_position += counts.sum(-1)
        self.next_slot += t
        causal = self.slot_ids[None, :] <= self.slots[:, None]  # (T, S)
        allowed = causal & self.written[:, None, None, :] | (self.slot_ids[None, :] == self.slots[:, None])
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=allowed.device)  # (B, 1, T, S)
        return position_ids, mask.masked_fill_(~allowed, float("-inf"))

    def rope_update(self, layer: int, q, k, v, cos, sin) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rotated q, keys, values) of layer after writing the rotated k and v in place at the claimed slots
        (module docstring): q, k, v (B, heads, T, hd), cos / sin (B or 1, T, hd); keys and values the whole
        (B, kv_heads, max_len, hd)."""
        if k.dtype != self.dtype:
            raise ValueError(f"StaticKVCache holds {self.dtype} but layer {layer} produced {k.dtype} keys")
        kc, vc = self.keys[layer], self.values[layer]
        if rope_kv_cache_applies(q, k, v, cos, sin, self.dtype):
            q = ops.rope_kv_cache(q, k, v, cos, sin, kc, vc, self.slots)
        else:
            q = rope_kv_cache_ref(q, k, v, cos, sin, kc, vc, self.slots)
        return q, kc, vc
