"""host_layers.py and host_embedding.py on a GPU, in bf16: parked layers (side-stream copies out and back, events,
stream-ordered release; contiguous and strided sets) compute the same loss and LoRA gradients as keeping them,
every parked byte comes back through the prefetch hooks, the peak of torch's allocator drops by about the parked
bytes, and later steps reuse the pinned blocks of the first instead of allocating new ones. A host embedding keeps
its table in pinned host memory (also after .cuda() and casts), frees at least the table's bytes on the GPU and
gathers the same rows as nn.Embedding on the GPU, also when copies from several calls are in flight at once; a
model with it computes the same loss and gradients. The CPU twins are tests/test_host_layers.py and
tests/test_host_embedding.py."""

import pytest
import torch

from minqlora import fused
from minqlora.host_embedding import embed_on_host
from minqlora.lora import add_lora, lora_modules
from minqlora.loss import linear_cross_entropy
from minqlora.shapes import random_model, shape_config
# hidden 512, head_dim 128 as in Llama: at 2 x 1024 tokens a (B, T, H) bf16 tensor is 2 MiB, k and v 1 MiB, all parked
from test_training_memory_cuda import _lora_model

DEV = torch.device("cuda")


def _step(model, ids, host, mode="none", keep_last=0, offload=False, stride=1, prefetch=4):
    model.gradient_checkpointing, model.model.keep_last_layers = mode, keep_last
    model.model.offload_checkpoints, model.model.host_layers, model.model.host_stats = offload, host, None
    model.model.host_stride, model.model.host_prefetch = stride, prefetch
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


def _same_grads(ref, again, grads):
    # Backward kernels with atomics (attention's) may differ from run to run; where two runs without the change
    # agree bit for bit, the run with it must too.
    exact = all(torch.equal(again[n], g) for n, g in ref.items())
    for name, g in ref.items():
        assert g.abs().sum() > 0, name
        if exact:
            assert torch.equal(grads[name], g), name
        else:
            torch.testing.assert_close(grads[name], g, rtol=1e-2, atol=1e-5, msg=name)


@pytest.mark.parametrize("mode,keep_last,offload,stride,prefetch", [
    ("none", 0, False, 1, 4), ("full", 2, False, 1, 4), ("full", 2, True, 1, 4), ("selective", 0, False, 1, 4),
    ("none", 0, False, 2, 1), ("full", 0, True, 3, 2), ("full", 1, True, 2, 4)])
def test_parked_layers_compute_the_same_on_cuda(mode, keep_last, offload, stride, prefetch, monkeypatch):
    if mode == "selective":
        # Under selective checkpointing's dispatch mode fused.call runs the eager ops (fused.py), while a parked
        # layer runs outside it on the fused kernels: two roundings. With fusion off both sides run the same ops.
        monkeypatch.setattr(fused, "_devices", ())
    model = _lora_model(layers=8)
    ids = torch.randint(0, 1000, (2, 1024), device=DEV)
    ref_loss, ref, _ = _step(model, ids, 0, mode, keep_last, offload)
    _, again, _ = _step(model, ids, 0, mode, keep_last, offload)
    loss, grads, _ = _step(model, ids, 3, mode, keep_last, offload, stride, prefetch)  # layers 0, s, 2s of 8
    stats = model.model.host_stats
    # About 5.6k bf16 values a token a layer here (norm inputs, q/k/v, attention out, gate, up): 22 MiB at 2 x 1024.
    assert stats.layers == 3 and stats.bytes > 3 * 16 * 2**20, stats
    assert stats.prefetched == stats.bytes and stats.on_demand == 0, stats
    assert torch.equal(loss, ref_loss)  # the forward runs the same kernels on the same bytes
    _same_grads(ref, again, grads)


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


def test_host_embedding_keeps_the_table_off_the_gpu():
    torch.manual_seed(0)
    # 32000 x 512 bf16: a 31 MiB table, against 4 MiB of rows gathered per call at 4 x 1024.
    config = shape_config("tiny", hidden_size=512, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=32000)
    model = random_model(config, device=DEV)
    add_lora(model, r=8, alpha=16, dropout=0.05)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.02)
    model.train()
    gen = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, 32000, (4, 1024), generator=gen) for _ in range(4)]
    emb = model.model.embed_tokens
    nbytes = emb.weight.numel() * emb.weight.element_size()
    ref = [emb(i.to(DEV)) for i in ids]
    ref_loss, ref_grads, _ = _step(model, ids[0].to(DEV), 0)
    _, again, _ = _step(model, ids[0].to(DEV), 0)
    del emb
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    host = embed_on_host(model)
    assert before - torch.cuda.memory_allocated() >= nbytes  # the GPU table is gone
    assert host.weight.device.type == "cpu" and host.weight.is_pinned() and host.device.type == "cuda"
    model.cuda()  # moves the output's device, leaves the table where it is
    host.float()
    host.to(DEV, torch.bfloat16)  # bf16 -> fp32 -> bf16: the same values
    assert host.weight.device.type == "cpu" and host.weight.is_pinned() and host.weight.dtype == torch.bfloat16
    assert host.device.type == "cuda" and before - torch.cuda.memory_allocated() >= nbytes
    outs = [host(i.to(DEV)) for i in ids]  # GPU ids: each call waits for the GPU (the ids' copy to the host)
    torch.cuda._sleep(50_000_000)  # hold the stream, so the copies of the calls below are all queued at once
    outs += [host(i) for i in ids]  # CPU ids: no wait; a pinned buffer reused too early would corrupt earlier rows
    torch.cuda.synchronize()
    for out, r in zip(outs, ref + ref):
        assert out.is_cuda and out.dtype == torch.bfloat16 and torch.equal(out, r)
    loss, grads, _ = _step(model, ids[0].to(DEV), 0)
    assert torch.equal(loss, ref_loss)
    _same_grads(ref_grads, again, grads)
