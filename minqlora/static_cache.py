"""StaticKVCache: keys and values in fixed buffers, written at positions held in device tensors.

model.py's KVCache keeps its fill length in a Python int, so every decode step runs different Python values (slice
bounds, mask widths). Here all per-step state lives on the device and is updated in place: a decode step issues
the same kernels on the same addresses every time, which is what a CUDA graph (decode.py) needs. Attention then
runs over all max_len slots, with a mask that hides slots not yet written and left padding.

    keys[i], values[i]   (B, kv_heads, max_len, head_dim) per layer
    next_slot            (1,) long: the first slot not yet written, the same for every row
    written              (B, max_len) bool: slots holding a real token (False: left padding, or not yet written)
    next_position        (B,) long: each row's count of real tokens, the rotary position of its next one

Leaves out: the decoding loop (decode.py) and the readable cache (model.KVCache). Positions past max_len are not
checked here (that would be a host sync); decode.py checks lengths before it starts.
"""

from __future__ import annotations

import torch


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
        mask = causal & self.written[:, None, None, :]  # (B, 1, T, S)
        return position_ids, mask | (self.slot_ids[None, :] == self.slots[:, None])

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v (B, kv_heads, T, head_dim) written in place at the claimed slots; returns the whole (B, kv, S, hd).
        if k.dtype != self.dtype:
            raise ValueError(f"StaticKVCache holds {self.dtype} but layer {layer} produced {k.dtype} keys")
        self.keys[layer].index_copy_(2, self.slots, k)
        self.values[layer].index_copy_(2, self.slots, v)
        return self.keys[layer], self.values[layer]
