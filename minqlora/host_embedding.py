"""Host embedding: the frozen input embedding's table in (pinned) host memory instead of on the GPU.

Why. QLoRA never trains the embedding, and its forward is a row gather: B · T rows of the table, no arithmetic.
On the Llama-3-8B shape the table is 128256 × 4096 bf16, 1.05 GB of the ~5.7 GB the model holds on the GPU in
4 bits, while one batch at 4 × 2048 reads 8192 of its rows (64 MiB). Kept on the host, the gather runs on the CPU
(torch's index_select over rows is multi-threaded) into a pinned buffer that is copied to the device, ~1.5 ms at
~45 GB/s: the GPU gets the same bytes as nn.Embedding's gather, so every later result is the same bit for bit.

HostEmbedding keeps the table as its `weight` Parameter (frozen), so state_dict() still holds
`model.embed_tokens.weight` as before and checkpoints, adapters and exports do not change; `device` is where its
output goes. Module.to() / .cuda() / .bfloat16() move `device` and cast the table's dtype, but the table stays on
the host (_apply). embed_on_host(model) swaps it in for a Llama's embedding, embed_on_device(model) swaps back (to
decode on the GPU, or to measure both in one process). On a CPU it is the same gather without the pinned buffer.

Leaves out: a trainable embedding (its gradient would be a scatter into a host table) and a table tied to lm_head
(the head multiplies by the whole table on the GPU every step); both are refused. Decoding works either way
(decode.py and static_cache.py take the device from HostEmbedding.device), at the cost of one host gather a step.
"""

from __future__ import annotations

import torch
from torch import nn


def _hosted(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t on the CPU, pinned when its user is a CUDA device (pinned blocks copy asynchronously and at full speed)."""
    t = t.detach()
    if device.type != "cuda":
        return t.to("cpu")
    if t.device.type == "cpu" and t.is_pinned():
        return t
    # Straight into a pinned block (torch's caching host allocator): one host copy of the table, not a pageable one
    # and then a pinned one (2 x 1.05 GB for Llama-3-8B).
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t)


class HostEmbedding(nn.Module):
    """nn.Embedding's forward with the table on the host: input_ids (B, T) on `device` -> (B, T, H) on `device`,
    in the table's dtype."""

    def __init__(self, weight: torch.Tensor, device: torch.device | str):
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"HostEmbedding needs a (num_embeddings, embedding_dim) table, got {tuple(weight.shape)}")
        self.device = torch.device(device)
        self.num_embeddings, self.embedding_dim = weight.shape
        self.weight = nn.Parameter(_hosted(weight, self.device), requires_grad=False)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, device: torch.device | str | None = None) -> HostEmbedding:
        """A HostEmbedding of emb's table, its output on `device` (default: where emb's table is now)."""
        if emb.weight.requires_grad:
            raise ValueError("embed_on_host (TrainConfig.embed_on_host, --embed-on-host) needs a frozen embedding: "
                             "embed_tokens.weight requires grad, and a table in host memory is not trained here")
        if emb.padding_idx is not None or emb.max_norm is not None:
            raise ValueError("embed_on_host: the embedding uses padding_idx or max_norm, which HostEmbedding does "
                             "not implement")
        return cls(emb.weight, emb.weight.device if device is None else device)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, table on {self.weight.device}"
                f"{' (pinned)' if self.weight.is_pinned() else ''}, output on {self.device}")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad:  # model.requires_grad_(True) after the swap
            raise ValueError("HostEmbedding's table is frozen (TrainConfig.embed_on_host): its weight requires grad")
        # SYNC: the ids come to the host, (B, T) int64 (64 KB at 4 x 2048); the host waits for the GPU to reach
        # this point. Once per forward, at its start, where the training loop has synchronised anyway.
        ids = input_ids.reshape(-1).to("cpu")
        if self.device.type != "cuda":
            rows = torch.index_select(self.weight, 0, ids).to(self.device)
        else:
            # A fresh pinned buffer per call, from torch's caching host allocator: the non_blocking copy below
            # records its stream's use of the block, and the allocator hands the block out again only after that
            # copy is done. Reusing one buffer of our own would need an event and a wait on the host instead.
            rows = torch.empty((ids.numel(), self.embedding_dim), dtype=self.weight.dtype, pin_memory=True)
            torch.index_select(self.weight, 0, ids, out=rows)  # (B·T, H) on the CPU, multi-threaded
            rows = rows.to(self.device, non_blocking=True)  # on the current stream, as nn.Embedding's gather
        return rows.view(*input_ids.shape, self.embedding_dim)

    # -- moving and casting -----------------------------------------------------------------------------------

    def _apply(self, fn, recurse=True):
        """Module.to()/.cuda()/.cpu() move where the output goes; dtype casts cast the table; the table itself
        stays in host memory (pinned while the output goes to a CUDA device)."""
        table = self._parameters["weight"]
        self._parameters["weight"] = None
        super()._apply(fn, recurse)
        self._parameters["weight"] = table
        probe = fn(torch.empty(0, dtype=table.dtype, device=self.device))  # where fn sends a tensor of ours
        if probe.device.type == "meta":
            raise ValueError("HostEmbedding cannot move to the meta device: its table lives in host memory")
        self.device = probe.device
        if probe.dtype != table.dtype or (self.device.type == "cuda" and not table.is_pinned()):
            self.weight = nn.Parameter(_hosted(table.to(probe.dtype), self.device), requires_grad=False)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        w = self.weight
        if w.device.type != "cpu" or (self.device.type == "cuda" and not w.is_pinned()) or w.requires_grad:
            self.weight = nn.Parameter(_hosted(w, self.device), requires_grad=False)  # load_state_dict(assign=True)


def embed_on_host(model: nn.Module) -> HostEmbedding:
    """Swap a Llama's model.embed_tokens for a HostEmbedding of the same table, in place; returns it (already one:
    unchanged). Call after add_lora (which freezes the base) and before building the optimizer: the GPU table is
    freed when nothing else holds it."""
    inner = model.model
    emb = inner.embed_tokens
    if isinstance(emb, HostEmbedding):
        return emb
    head = getattr(getattr(model, "lm_head", None), "weight", None)
    if head is emb.weight or getattr(model.config, "tie_word_embeddings", False):
        raise ValueError("embed_on_host (TrainConfig.embed_on_host, --embed-on-host) does not combine with "
                         "lm_head tied to the embedding (tie_word_embeddings): the head needs the table on the GPU")
    host = HostEmbedding.from_embedding(emb)
    # Registered again at the end, not in the embedding's first place: code that asks a model for its device with
    # next(model.parameters()).device (sft.train, generate) then finds a layer's parameter, not the host table.
    # state_dict() keys stay the same; only their order moves.
    del inner.embed_tokens
    inner.embed_tokens = host
    return host


def embed_on_device(model: nn.Module) -> nn.Embedding:
    """The inverse of embed_on_host: model.model.embed_tokens back to an nn.Embedding on its output device, in
    place; returns it (already one: unchanged)."""
    inner = model.model
    host = inner.embed_tokens
    if not isinstance(host, HostEmbedding):
        return host
    emb = nn.Embedding(host.num_embeddings, host.embedding_dim, device="meta")
    emb.weight = nn.Parameter(host.weight.detach().to(host.device), requires_grad=False)
    # Back in the first place, where LlamaModel registers it: parameter order as before embed_on_host.
    others = [(k, m) for k, m in inner._modules.items() if k != "embed_tokens"]
    inner._modules.clear()
    inner._modules.update([("embed_tokens", emb), *others])
    return emb
