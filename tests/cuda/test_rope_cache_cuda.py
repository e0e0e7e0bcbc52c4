"""ops.rope_kv_cache (csrc/cuda/layer_kernels.cuh: rope_kv_cache_kernel) against its spec,
static_cache.rope_kv_cache_ref (two RoPE launches and two index_copy_), bit for bit; its argument checks; and that a
static-cache decode on the GPU takes it (the decode's tokens themselves: test_generate_cuda.py, test_lora_cuda.py).
"""

import pytest
import torch

from minqlora import ops, static_cache
from minqlora.static_cache import rope_kv_cache_ref
from test_generate_cuda import model_on_gpu, prompts, run

DEV = torch.device("cuda")


def rand(*shape, dtype, gen):
    return torch.randn(*shape, generator=gen, device=DEV).to(dtype)


def case(b, hq, hkv, t, d, s, dtype, cos_batch, seed=0):
    """q/k/v as Attention makes them ((B, T, H, D) projections viewed as (B, H, T, D)), cos/sin, zeroed caches of
    length s and t distinct slots out of order."""
    gen = torch.Generator(device=DEV).manual_seed(seed)
    q = rand(b, t, hq, d, dtype=dtype, gen=gen).transpose(1, 2)
    k = rand(b, t, hkv, d, dtype=dtype, gen=gen).transpose(1, 2)
    v = rand(b, t, hkv, d, dtype=dtype, gen=gen).transpose(1, 2)
    ang = torch.rand(cos_batch, t, d // 2, generator=gen, device=DEV) * 6.0
    ang = torch.cat([ang, ang], -1)
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    caches = [torch.zeros(b, hkv, s, d, dtype=dtype, device=DEV) for _ in range(2)]
    slots = torch.randperm(s, generator=gen, device=DEV)[:t]
    return q, k, v, cos, sin, caches, slots


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b, hq, hkv, t, d, s, cos_batch", [
    (1, 32, 8, 1, 128, 80, 1),   # the 8B shape's decode step
    (3, 8, 4, 5, 64, 16, 3),     # a batch, a prefill of 5, per-row positions
    (2, 4, 4, 7, 6, 9, 1),       # no GQA, a head dim that is no multiple of the 16-byte width
])
def test_rope_kv_cache_equals_its_reference(dtype, b, hq, hkv, t, d, s, cos_batch):
    q, k, v, cos, sin, (kc, vc), slots = case(b, hq, hkv, t, d, s, dtype, cos_batch)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    kc.normal_()  # slots not written keep what they held
    kc_ref.copy_(kc)
    with torch.no_grad():
        want = rope_kv_cache_ref(q, k, v, cos, sin, kc_ref, vc_ref, slots)
        got = ops.rope_kv_cache(q, k, v, cos, sin, kc, vc, slots)
    assert got.shape == want.shape and got.stride() == want.stride()
    assert torch.equal(got, want) and torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
    assert not torch.equal(want, q)  # the rotation did something


def test_rope_kv_cache_checks_its_arguments():
    q, k, v, cos, sin, (kc, vc), slots = case(1, 8, 4, 2, 64, 8, torch.bfloat16, 1)
    with pytest.raises(RuntimeError, match="slots must be"):
        ops.rope_kv_cache(q, k, v, cos, sin, kc, vc, slots.int())
    with pytest.raises(RuntimeError, match="the caches must be"):
        ops.rope_kv_cache(q, k, v, cos, sin, kc[:, :2], vc, slots)
    with pytest.raises(RuntimeError, match="k and v must both be"):
        ops.rope_kv_cache(q, k, v[:, :, :1], cos, sin, kc, vc, slots)
    with pytest.raises(RuntimeError, match="cos and sin must be"):
        ops.rope_kv_cache(q, k, v, cos[:, :1], sin, kc, vc, slots)
    with pytest.raises(RuntimeError, match="v_cache must have q's dtype"):
        ops.rope_kv_cache(q, k, v, cos, sin, kc, vc.half(), slots)


def test_static_decode_takes_the_kernel(monkeypatch):
    """A static-cache decode of a bf16 model on the GPU calls ops.rope_kv_cache once per layer and step (not under
    autograd, where the reference runs), and its tokens equal those of the same decode through the reference."""
    calls = []
    real, applies = ops.rope_kv_cache, static_cache.rope_kv_cache_applies

    def counting(*args):
        calls.append(1)
        return real(*args)

    model = model_on_gpu("nf4", torch.bfloat16, lora=False)
    ids, mask = prompts(2)
    monkeypatch.setattr(ops, "rope_kv_cache", counting)
    fast = run(model, ids, mask, "static")
    assert len(calls) >= len(model.model.layers) * 2
    monkeypatch.setattr(static_cache, "rope_kv_cache_applies", lambda *a: False)
    calls.clear()
    slow = run(model, ids, mask, "static")
    assert not calls and torch.equal(fast, slow)
    x = torch.zeros(1, 1, 1, 2, dtype=torch.bfloat16, device=DEV)
    assert not applies(x, x, x, x, x, torch.bfloat16)  # autograd on
    with torch.no_grad():
        assert applies(x, x, x, x, x, torch.bfloat16)
        assert not applies(x, x, x, x.float(), x, torch.bfloat16)
