"""host_layers.py on a GPU, in bf16: parked layers (side-stream copies out and back, events, stream-ordered
release) compute the same loss and LoRA gradients as keeping them, every parked byte comes back through the
prefetch hooks, the peak of torch's allocator drops by about the parked bytes, and later steps reuse the pinned
blocks of the first instead of allocating new ones. The CPU twin is tests/test_host_layers.py."""

import pytest
import torch

from minqlora import fused
from minqlora.lora import add_lora, lora_modules
from minqlora.loss import linear_cross_entropy
from minqlora.shapes import random_model, shape_config

DEV = torch.device("cuda")


def _lora_model(layers):
    torch.manual_seed(0)
    # head_dim 128 as in Llama; at 2 x 1024 tokens a (B, T, H) bf16 tensor is 2 MiB, k and v 1 MiB: all parked.
    config = shape_config("tiny", hidden_size=512, intermediate_size=1536, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)
    model = random_model(config, device=DEV)
    add_lora(model, r=8, alpha=16, dropout=0.05)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.02)
    return model.train()


def _step(model, ids, host, mode="none", keep_last=0, offload=False):
    model.gradient_checkpointing, model.model.keep_last_layers = mode, keep_last
    model.model.offload_checkpoints, model.model.host_layers, model.model.host_stats = offload, host, None
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        hidden = model.model(ids)
    loss = linear_cross_entropy(hidden[:, :-1], model.lm_head, ids[:, 1:], chunk=256) / ids.numel()
    loss.backward()
    torch.cuda.synchronize()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, torch.cuda.max_memory_allocated() - base


@pytest.mark.parametrize("mode,keep_last,offload", [("none", 0, False), ("full", 2, False), ("full", 2, True),
                                                    ("selective", 0, False)])
def test_parked_layers_compute_the_same_on_cuda(mode, keep_last, offload, monkeypatch):
    if mode == "selective":
        # Under selective checkpointing's dispatch mode fused.call runs the eager ops (fused.py), while a parked
        # layer runs outside it on the fused kernels: two roundings. With fusion off both sides run the same ops.
        monkeypatch.setattr(fused, "_devices", ())
    model = _lora_model(layers=8)
    ids = torch.randint(0, 1000, (2, 1024), device=DEV)
    ref_loss, ref, _ = _step(model, ids, 0, mode, keep_last, offload)
    _, again, _ = _step(model, ids, 0, mode, keep_last, offload)
    loss, grads, _ = _step(model, ids, 3, mode, keep_last, offload)
    stats = model.model.host_stats
    # About 5.6k bf16 values a token a layer here (norm inputs, q/k/v, attention out, gate, up): 22 MiB at 2 x 1024.
    assert stats.layers == 3 and stats.bytes > 3 * 16 * 2**20, stats
    assert stats.prefetched == stats.bytes and stats.on_demand == 0, stats
    # The forward runs the same kernels on the same bytes: the same loss. Backward kernels with atomics (attention's)
    # may differ from run to run; where two runs without parking agree bit for bit, parking must too.
    assert torch.equal(loss, ref_loss)
    exact = all(torch.equal(again[n], g) for n, g in ref.items())
    for name, g in ref.items():
        assert g.abs().sum() > 0, name
        if exact:
            assert torch.equal(grads[name], g), name
        else:
            torch.testing.assert_close(grads[name], g, rtol=1e-2, atol=1e-5, msg=name)


def test_parking_lowers_the_peak_by_the_parked_bytes():
    # No checkpointing, 16 layers: the peak is at the end of the forward, when the 4 parked layers' GPU copies were
    # released (before layers 3, 6, 9 and 12 at the latest, host_layers.COPY_LAYERS) and none is back yet (layer 3
    # returns when layer 5's backward starts, after layers 15..6 freed theirs).
    model = _lora_model(layers=16)
    ids = torch.randint(0, 1000, (2, 2048), device=DEV)
    _step(model, ids, 0)  # warm-up: kernels, workspaces
    _, _, kept = _step(model, ids, 0)
    _, _, parked = _step(model, ids, 4)
    stats = model.model.host_stats
    assert stats.layers == 4 and stats.prefetched == stats.bytes
    saved = kept - parked
    assert 0.8 * stats.bytes <= saved <= 1.05 * stats.bytes + 8 * 2**20, (kept, parked, stats.bytes)


def test_later_steps_reuse_the_pinned_blocks():
    model = _lora_model(layers=8)
    ids = torch.randint(0, 1000, (2, 1024), device=DEV)
    _step(model, ids, 3)
    pool = torch.cuda.host_memory_stats()
    assert pool["allocated_bytes.current"] >= model.model.host_stats.bytes  # pinned blocks, cached after the step
    for _ in range(2):
        _step(model, ids, 3)
    assert torch.cuda.host_memory_stats()["num_host_alloc"] == pool["num_host_alloc"]  # no cudaHostAlloc after step 1
