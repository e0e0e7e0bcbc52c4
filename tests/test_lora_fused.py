"""lora_fused.py against the reference LoRALinear.forward: the same outputs and gradients on tiny Llamas (fp32 within
rounding, bf16 autocast within bf16 rounding, with and without gradient checkpointing), one down-projection matmul
per distinct input, the dropout masks of both modes reconstructed by hand, the dropout Function's gradients, grouping rules,
copies, merged members, and 20 training steps of sft.train whose losses match the reference path. The decode ops
(ops.lora_down, ops.lora_up_add_): their CPU forms equal the torch math bit for bit, opcheck, torch.compile, argument
checks, when the branch dispatches to them, and the branch's decode flow run through them on the CPU.

Covers CPU. Leaves out CUDA (tests/cuda/test_lora_cuda.py) and speed (benchmarks/bench_train.py).
"""

import copy
import json

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from minqlora.linear4bit import Linear4bit
from minqlora.lora import LoRALinear, add_lora, lora_modules, merge_lora
from minqlora import dropout, lora_fused, ops, recompute
from minqlora.fused import swiglu
from minqlora.lora_fused import DECODE_MAX_ROWS, LoRAGroup, _DroppedDown, decode_kernels_apply, set_lora_path
from minqlora.model import Llama, LlamaConfig
from minqlora.proj_group import ProjectionGroup, group_projections
from minqlora.sft import TrainConfig, train
from minqlora.tokenizer import Tokenizer
from test_sft_helpers import one_thread  # noqa: F401  (autouse fixture)
from test_sft_helpers import counting_records, sentencepiece_dir, tiny_model, write_jsonl

IDS = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(5))


def tiny_llama(dtype=torch.float32, quantize=False, seed=0) -> Llama:
    """2 layers with nonzero, O(1)-scaled adapters (B starts at zero, which would hide every mistake in B's path)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
    model = Llama(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 1 / p.shape[-1] ** 0.5 if p.dim() > 1 else 1)
    model = model.to(dtype)
    if quantize:
        for name, m in list(model.named_modules()):
            if name.endswith("_proj"):
                model.set_submodule(name, Linear4bit.from_linear(m, compute_dtype=dtype))
    add_lora(model, r=4, alpha=8, dropout=0.1)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * 0.3)
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.3)
    return model


def loss_and_grads(model, ids=IDS, autocast=False, seed=0):
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(ids)
    loss = nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# -- the fused branch computes what the reference computes ---------------------------------------------------------

@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("quantize", [False, True])
def test_fused_matches_reference_fp32(checkpointing, quantize):
    """Dropout 0 (eval-mode masks are off too): the loss and every LoRA gradient agree within fp32 rounding."""
    ref = tiny_llama(quantize=quantize)
    for m in lora_modules(ref).values():
        m.lora_dropout, m.dropout = nn.Identity(), 0.0
    fused = set_lora_path(copy.deepcopy(ref), "fused")
    for model in (ref, fused):
        model.gradient_checkpointing = checkpointing
        model.train()
    loss_r, grads_r = loss_and_grads(ref)
    loss_f, grads_f = loss_and_grads(fused)
    assert len(grads_r) == 2 * 7 * 2 and grads_r.keys() == grads_f.keys()
    torch.testing.assert_close(loss_f, loss_r, rtol=1e-6, atol=1e-6)
    for name in grads_r:
        assert relative_error(grads_f[name], grads_r[name]) < 2e-5, name  # fp32: other summation orders
    assert all(g.abs().sum() > 0 for g in grads_f.values())  # every adapter took part


def fp32_twin(model: Llama) -> Llama:
    """The same bf16 model computed in fp32: the truth both bf16 paths are measured against."""
    twin = copy.deepcopy(model).float()
    for m in twin.modules():
        if isinstance(m, Linear4bit):
            m.compute_dtype = torch.float32
    return twin


def test_fused_matches_reference_bf16_autocast():
    """bf16 weights under bf16 autocast, the QLoRA setting on the CPU. The reference casts x to fp32 and runs its
    matmuls in bf16 under autocast; the fused branch stays in bf16. Against the same model in fp32, both carry bf16
    rounding, which these tiny O(1)-activation models amplify to a few percent of a gradient: averaged over four
    models, the fused gradients are as close to the fp32 ones as the reference's are."""
    errors = {"reference": [], "fused": []}
    for seed in range(4):
        ref = tiny_llama(torch.bfloat16, quantize=True, seed=seed)
        for m in lora_modules(ref).values():
            m.lora_dropout, m.dropout = nn.Identity(), 0.0
        loss_t, grads_t = loss_and_grads(fp32_twin(ref))
        truth = torch.cat([g.flatten() for g in grads_t.values()])
        for path in ("reference", "fused"):
            loss, grads = loss_and_grads(set_lora_path(ref, path), autocast=True)
            assert all(g.dtype == torch.float32 for g in grads.values())  # fp32 master weights, fp32 gradients
            torch.testing.assert_close(loss, loss_t, rtol=1e-2, atol=1e-2)
            errors[path].append(relative_error(torch.cat([g.flatten() for g in grads.values()]), truth))
    mean = {path: sum(e) / len(e) for path, e in errors.items()}
    assert mean["reference"] < 0.15 and mean["fused"] < 1.3 * mean["reference"], errors


def test_group_matches_reference_bf16():
    """One q/k/v group under bf16 autocast, outside any model: outputs and every gradient within bf16 rounding of
    fp32, and no further from it than the reference path."""
    torch.manual_seed(0)
    layers = [LoRALinear(nn.Linear(32, w).bfloat16(), r=4, alpha=8) for w in (32, 16, 16)]
    for m in layers:
        nn.init.normal_(m.lora_B.weight)
    x = torch.randn(14, 32, dtype=torch.bfloat16)
    gs = [torch.randn(14, m.out_features) for m in layers]
    results = {}
    for path in ("reference", "fused", "truth"):
        mods = copy.deepcopy(layers)
        if path == "truth":
            mods = [m.float() for m in mods]
        group = nn.ModuleDict(dict(zip(("q_proj", "k_proj", "v_proj"), mods)))
        set_lora_path(group, "reference" if path == "truth" else path)
        xx = (x.float() if path == "truth" else x).clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=path != "truth"):
            ys = [group[k](xx) for k in ("q_proj", "k_proj", "v_proj")]
        sum((y.float() * g).sum() for y, g in zip(ys, gs)).backward()
        results[path] = [*ys, xx.grad] + [p.grad for p in group.parameters() if p.requires_grad]
    for path in ("reference", "fused"):
        errs = [relative_error(a, b) for a, b in zip(results[path], results["truth"])]
        assert max(errs) < 1e-2, (path, errs)
        results[path] = errs
    assert all(f <= 1.1 * r + 1e-4 for f, r in zip(results["fused"], results["reference"])), results


def test_reference_path_restores_lora_forward_exactly():
    model = tiny_llama().train()
    want = loss_and_grads(model, seed=3)
    set_lora_path(model, "shared-dropout")
    set_lora_path(model, "reference")
    assert all(m.group is None for m in lora_modules(model).values())
    got = loss_and_grads(model, seed=3)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


class CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_, torch.ops.aten.bmm):
            self.calls.append((func.overloadpacket.__name__, tuple(args[-2].shape), tuple(args[-1].shape)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("path, training", [("fused", False), ("shared-dropout", True)])
def test_one_down_projection_per_distinct_input(path, training):
    """Per decoder layer: one (N, 32) x (32, 12) matmul for q/k/v, one (N, 32) x (32, 8) for gate/up, one each for
    o_proj and down_proj; then one addmm per adapter. (Base layers are nn.Linear: aten.mm/addmm too, filtered out by
    their (in, out) shapes; lm_head is (32, 61).)"""
    model = tiny_llama().train(training)
    set_lora_path(model, path)
    with torch.no_grad(), CountMatmuls() as counter:
        model(IDS)
    # Σr = 12 (q/k/v), 8 (gate/up), 4 (o, down); no base layer of this model has 4, 8 or 12 outputs.
    down = sorted(b for op, a, b in counter.calls if op == "mm" and b[1] in (4, 8, 12))
    assert down == sorted([(32, 12), (32, 8), (32, 4), (48, 4)] * 2)  # 2 decoder layers
    assert sum(op in ("addmm", "addmm_") and a[1] == 4 for op, a, b in counter.calls) == 7 * 2  # in place: no grad


def masked_inputs(path, p, seed):
    """The fused model's dropped inputs, reconstructed: one seed per group, drawn in the order the forward draws them,
    and the counter-based mask of each (copies = members in "fused", one in "shared-dropout")."""
    torch.manual_seed(seed)
    n, d, f = IDS.numel(), 32, 48
    groups = ((3, d), (1, d), (2, d), (1, f))  # per layer: q/k/v, o_proj, gate/up, down_proj inputs
    return [dropout.keep_mask(dropout.draw_seed(), (1 if path == "shared-dropout" else k, n, w), [p])
            for _ in range(2) for k, w in groups]


@pytest.mark.parametrize("path", ["fused", "shared-dropout"])
def test_dropout_masks_per_module_or_per_input(path):
    """Training mode, p = 0.3: each adapter's output equals s/(1-p)·(x⊙m)·AᵀBᵀ with the mask drawn by keep_mask; in
    "fused" q, k and v each have their own mask, in "shared-dropout" they share one."""
    p = 0.3
    model = tiny_llama().train()
    for m in lora_modules(model).values():
        m.dropout = p
    set_lora_path(model, path)
    seen = {}  # module name -> (input, output) of its forward

    def record(name):
        return lambda mod, args, out: seen.__setitem__(name, (args[0].detach(), out.detach()))

    handles = [m.register_forward_hook(record(n)) for n, m in lora_modules(model).items()]
    torch.manual_seed(11)
    with torch.no_grad():
        model(IDS)
    for h in handles:
        h.remove()
    masks = masked_inputs(path, p, seed=11)
    if path == "fused":
        assert not torch.equal(masks[0][0], masks[0][1])  # q and k of layer 0 drew different masks
    for layer in range(2):
        groups = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))
        for names in groups:
            keep = masks.pop(0)
            for i, leaf in enumerate(names):
                block = "self_attn" if leaf in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                name = f"model.layers.{layer}.{block}.{leaf}"
                m = lora_modules(model)[name]
                x, y = seen[name]
                x2 = x.reshape(-1, x.shape[-1])
                k = keep[0] if path == "shared-dropout" else keep[i]
                want = m.base_layer(x2) + m.scaling / (1 - p) * (x2 * k) @ m.lora_A.weight.t() @ m.lora_B.weight.t()
                torch.testing.assert_close(y.reshape(want.shape), want, rtol=1e-5, atol=1e-5, msg=name)


# -- the dropout Function -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("copies, ps", [(3, [0.3]), (3, [0.0, 0.5, 0.2]), (1, [0.4])])
def test_dropped_down_gradients_equal_autograd_of_the_masked_product(copies, ps):
    """_DroppedDown keeps only x and A and draws its masks again in the backward: its h and the gradients of x and
    A equal autograd's through (x ⊙ keep_c)·A_cᵀ with the spec's masks."""
    rs = [2, 3, 4][:copies] if copies > 1 else [2, 3]
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(10, 16, generator=gen, requires_grad=True)
    a = torch.randn(sum(rs), 16, generator=gen, requires_grad=True)
    seed = 12345
    h = _DroppedDown.apply(x, a, seed, ps, rs, copies)
    keep = dropout.keep_mask(seed, (copies, 10, 16), ps).float()
    xr, ar = x.detach().clone().requires_grad_(), a.detach().clone().requires_grad_()
    if copies == 1:
        want = (xr * keep[0]) @ ar.t()
    else:
        want = torch.cat([(xr * keep[c]) @ ac.t() for c, ac in enumerate(ar.split(rs))], 1)
    torch.testing.assert_close(h, want, rtol=0, atol=0)
    g = torch.randn(h.shape, generator=gen)
    h.backward(g)
    want.backward(g)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a.grad, ar.grad, rtol=1e-6, atol=1e-6)


def test_dropped_down_saves_no_mask():
    """What autograd keeps between forward and backward: x and A (views of them), nothing the size of a mask."""
    x = torch.randn(64, 32, requires_grad=True)
    a = torch.randn(12, 32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        _DroppedDown.apply(x, a, 7, [0.1], [4, 4, 4], 3)
    assert sorted(t.numel() for t in saved) == [a.numel(), x.numel()]


@pytest.mark.parametrize("copies, ps", [(0, [0.0]), (1, [0.4]), (3, [0.0, 0.5, 0.2])])
def test_dropped_down_with_a_recipe_saves_its_inputs_not_x(copies, ps):
    """Given x's recipe (recompute.py: here x = swiglu(g, u)), _DroppedDown saves A, g and u instead of x, and its h
    and gradients are the bits of the Function that keeps x (copies 0: no dropout, the plain x·Aᵀ)."""
    rs = [2, 3, 4]
    gen = torch.Generator().manual_seed(4)
    g, u = torch.randn(10, 16, generator=gen, requires_grad=True), torch.randn(10, 16, generator=gen)
    a = torch.randn(sum(rs), 16, generator=gen, requires_grad=True)
    cot = torch.randn(10, sum(rs), generator=gen)
    results = []
    for use_recipe in (False, True):
        x = recompute.tag(swiglu(g, u), swiglu, (g, u))
        recipe = recompute.recipe_of(x) if use_recipe else None
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            h = _DroppedDown.apply(x, a, 7, ps, rs, copies, recipe)
        keeps = {t.untyped_storage().data_ptr() for t in saved}
        assert (x.untyped_storage().data_ptr() in keeps) != use_recipe
        if use_recipe:
            assert keeps == {t.untyped_storage().data_ptr() for t in (a, g, u)}
        h.backward(cot)
        results.append((h.detach(), g.grad.clone(), a.grad.clone()))
        g.grad = a.grad = None
    if copies == 0:
        xr, ar = swiglu(g, u), a.detach().clone().requires_grad_()
        (xr @ ar.t()).backward(cot)
        assert torch.equal(results[0][1], g.grad) and torch.equal(results[0][2], ar.grad)
    for want, got in zip(*results):
        assert torch.equal(got, want)


# -- grouping, copies, merges ----------------------------------------------------------------------------------------

def test_groups_follow_shared_inputs():
    model = set_lora_path(tiny_llama(), "fused")
    mods = lora_modules(model)
    attn, mlp = "model.layers.1.self_attn.", "model.layers.1.mlp."
    assert mods[attn + "q_proj"].group is mods[attn + "k_proj"].group is mods[attn + "v_proj"].group
    assert mods[attn + "o_proj"].group.members == [mods[attn + "o_proj"]]
    assert mods[mlp + "gate_proj"].group is mods[mlp + "up_proj"].group
    assert mods[mlp + "down_proj"].group is not mods[mlp + "up_proj"].group
    assert mods[attn + "q_proj"].group is not mods["model.layers.0.self_attn.q_proj"].group
    assert "group" not in json.dumps(list(model.state_dict()))  # not a module: no state-dict keys


def test_bad_arguments():
    model = tiny_llama()
    with pytest.raises(ValueError, match="LoRA path must be one of"):
        set_lora_path(model, "fast")
    with pytest.raises(ValueError, match="has no LoRA adapters"):
        set_lora_path(nn.Sequential(nn.Linear(2, 2)), "fused")
    a = LoRALinear(nn.Linear(8, 4), r=2, alpha=4, dropout=0.1)
    with pytest.raises(ValueError, match="share in_features"):
        LoRAGroup([a, LoRALinear(nn.Linear(6, 4), r=2, alpha=4)])
    with pytest.raises(ValueError, match="one dropout probability per group"):
        LoRAGroup([a, LoRALinear(nn.Linear(8, 4), r=2, alpha=4, dropout=0.2)], shared_dropout=True)


def test_same_input_twice_and_partial_calls():
    """A member called twice on one x, a member of a group never called, then a copy of the model: all correct."""
    model = tiny_llama().eval()
    ref = set_lora_path(copy.deepcopy(model), "reference")
    set_lora_path(model, "fused")
    attn, attn_ref = model.model.layers[0].self_attn, ref.model.layers[0].self_attn
    x = torch.randn(2, 3, 32, requires_grad=True)
    for name in ("q_proj", "q_proj", "k_proj"):  # v_proj never takes its h
        torch.testing.assert_close(getattr(attn, name)(x), getattr(attn_ref, name)(x), rtol=1e-5, atol=1e-5)
    twin = copy.deepcopy(model)  # the half-taken h stays behind (it belongs to x's graph)
    assert twin.model.layers[0].self_attn.q_proj.group.members[0] is twin.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(twin(IDS), ref(IDS), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        x.mul_(2)  # in place: the kept h is stale
    torch.testing.assert_close(attn.v_proj(x), attn_ref.v_proj(x), rtol=1e-5, atol=1e-5)


def test_inference_mode():
    """Decoding runs under torch.inference_mode, whose tensors have no version counter: same logits as reference."""
    model = tiny_llama().eval()
    ref = set_lora_path(copy.deepcopy(model), "reference")
    set_lora_path(model, "fused")
    with torch.inference_mode():
        torch.testing.assert_close(model(IDS), ref(IDS), rtol=1e-5, atol=1e-5)


class CountCasts(TorchDispatchMode):
    """cat / cast ops that read one of `weights`: what a kept A / B saves."""

    def __init__(self, weights):
        super().__init__()
        self.ptrs, self.calls = {w.data_ptr() for w in weights}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.cat, torch.ops.aten._to_copy):
            ins = args[0] if isinstance(args[0], (list, tuple)) else [args[0]]
            self.calls += any(t.data_ptr() in self.ptrs for t in ins)
        return func(*args, **(kwargs or {}))


def test_casts_kept_without_autograd_and_renewed_on_change():
    """bf16 activations, float32 adapters: without autograd the concatenated, cast A and each cast B are made once
    and reused (no cat / cast on a second forward), give the logits of a fresh computation exactly, and are made
    again after an in-place update of an adapter or a load of new parameters; with autograd on nothing is kept."""
    model = tiny_llama().eval()
    model.model.embed_tokens.bfloat16()  # bf16 hidden states; the adapters stay float32
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            m.base_layer.bfloat16()
    model.lm_head.bfloat16()
    for layer in model.model.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.bfloat16()
    model.model.norm.bfloat16()
    set_lora_path(model, "fused")
    with torch.no_grad():
        adapters = [p for n, p in model.named_parameters() if "lora_" in n]
        with CountCasts(adapters) as counter:
            first = model(IDS)
        # per layer: the cat of q/k/v's and of gate/up's A, the casts of o's and down's A, 7 casts of B (the casts of the
        # concatenated A read no adapter itself)
        assert counter.calls == 2 * (2 + 2 + 7)
        with CountCasts(adapters) as counter:
            again = model(IDS)
        assert counter.calls == 0
        torch.testing.assert_close(again, first, rtol=0, atol=0)
        q = model.model.layers[0].self_attn.q_proj
        q.lora_B.weight.add_(1.0)  # in place: the kept B of q_proj is stale
        changed = model(IDS)
    fresh = copy.deepcopy(model)  # no kept casts: computes them anew
    with torch.no_grad():
        torch.testing.assert_close(changed, fresh(IDS), rtol=0, atol=0)
    assert not torch.equal(changed, first)
    q.lora_A.weight = nn.Parameter(q.lora_A.weight.detach() * 2)  # a new parameter object (load_adapter may do this)
    with torch.no_grad():
        swapped = model(IDS)
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        torch.testing.assert_close(swapped, fresh(IDS), rtol=0, atol=0)
    model(IDS)  # autograd on: the kept copies go
    assert q.group._cast is None


def test_merged_member_is_left_out():
    model = tiny_llama().eval()
    ref = set_lora_path(copy.deepcopy(model), "reference")
    set_lora_path(model, "fused")
    for m in (model, ref):
        m.model.layers[0].self_attn.k_proj.merge()
    torch.testing.assert_close(model(IDS), ref(IDS), rtol=1e-5, atol=1e-5)
    merged = merge_lora(model)
    assert not lora_modules(merged)
    torch.testing.assert_close(merged(IDS), merge_lora(ref)(IDS), rtol=1e-5, atol=1e-5)


# -- the decode ops (csrc/lora_decode.cpp on the CPU; the CUDA kernels in tests/cuda/test_lora_cuda.py) -------------

def up_add_case(dtype, rs=(4, 8, 3), ns=(7, 5, 9), m=3, seed=0):
    """(ys, h, bs, scales, offsets): members of r = rs and N = ns sharing one h (m, Σr)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(m, sum(rs), generator=g).to(dtype)
    ys = [torch.randn(m, n, generator=g).to(dtype) for n in ns]
    bs = [torch.randn(n, r, generator=g).to(dtype) for n, r in zip(ns, rs)]
    offsets = [sum(rs[:i]) for i in range(len(rs))]
    return ys, h, bs, [0.5, 2.0, -1.25][:len(rs)], offsets


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decode_ops_equal_the_torch_math_bit_for_bit(dtype):
    """lora_down is x @ a.t() and lora_up_add_ is each member's addmm_ on its column slice of h: what LoRAGroup
    computed before the ops existed, the same bits."""
    g = torch.Generator().manual_seed(1)
    x, a = torch.randn(2, 3, 40, generator=g).to(dtype), torch.randn(12, 40, generator=g).to(dtype)
    assert torch.equal(ops.lora_down(x, a), x @ a.t())
    ys, h, bs, scales, offsets = up_add_case(dtype)
    want = [y.clone() for y in ys]
    for y, b, s, o in zip(want, bs, scales, offsets):
        y.addmm_(h[:, o:o + b.shape[1]], b.t(), alpha=s)
    ptrs = [y.data_ptr() for y in ys]
    ops.lora_up_add_(ys, h, bs, scales, offsets)
    assert [y.data_ptr() for y in ys] == ptrs  # in place
    for got, w in zip(ys, want):
        assert torch.equal(got, w)


def test_decode_ops_opcheck_and_compile():
    ys, h, bs, scales, offsets = up_add_case(torch.float32)
    x, a = torch.randn(3, 16), torch.randn(5, 16)
    torch.library.opcheck(torch.ops.minqlora.lora_down.default, (x, a))
    torch.library.opcheck(torch.ops.minqlora.lora_up_add_.default, (ys, h, bs, scales, offsets))

    def step(x, a, ys, bs):
        hh = ops.lora_down(x, a)  # (3, 5)
        ops.lora_up_add_(ys, torch.cat([hh, hh[:, :2]], 1), bs, [0.5, 2.0], [0, 5])
        return hh

    bs2 = [torch.randn(7, 5), torch.randn(4, 2)]
    eager_ys, compiled_ys = [torch.randn(3, 7), torch.randn(3, 4)], None
    compiled_ys = [y.clone() for y in eager_ys]
    want = step(x, a, eager_ys, bs2)
    got = torch.compile(step, fullgraph=True)(x, a, compiled_ys, bs2)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for g, w in zip(compiled_ys, eager_ys):  # the mutation of ys reaches the caller's tensors
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_decode_ops_check_their_arguments():
    x, a = torch.randn(3, 16), torch.randn(5, 16)
    with pytest.raises(RuntimeError, match=r"lora_down: a must be \(R, K\) with K = x's last dimension \(16\)"):
        ops.lora_down(x, torch.randn(5, 8))
    with pytest.raises(RuntimeError, match="lora_down: a must have x's dtype"):
        ops.lora_down(x, a.bfloat16())
    with pytest.raises(RuntimeError, match="lora_down: x must be float32, float16 or bfloat16"):
        ops.lora_down(x.long(), a.long())
    ys, h, bs, scales, offsets = up_add_case(torch.float32)
    with pytest.raises(RuntimeError, match="one entry per member"):
        ops.lora_up_add_(ys, h, bs[:2], scales, offsets)
    with pytest.raises(RuntimeError, match=r"offsets\[2\] = 13 with r = 3 reaches past h's 15 columns"):
        ops.lora_up_add_(ys, h, bs, scales, [0, 4, 13])
    with pytest.raises(RuntimeError, match=r"bs\[1\] must be \(5, r\)"):
        ops.lora_up_add_(ys, h, [bs[0], bs[0], bs[2]], scales, offsets)
    with pytest.raises(RuntimeError, match=r"ys\[0\] must be \(3, N\)"):
        ops.lora_up_add_([ys[0][:2], *ys[1:]], h, bs, scales, offsets)
    with pytest.raises(RuntimeError, match=r"ys\[1\] and bs\[1\] must have h's dtype"):
        ops.lora_up_add_([ys[0], ys[1].double(), ys[2]], h, bs, scales, offsets)


def test_decode_kernels_apply_only_to_few_rows_on_cuda_without_grad_or_dropout(monkeypatch):
    """The dispatch condition itself, on fake CUDA tensors (no GPU needed); a real CPU tensor never qualifies, nor
    anything while DECODE_KERNELS is off."""
    monkeypatch.setattr(lora_fused, "DECODE_KERNELS", False)
    with FakeTensorMode():
        off = torch.empty(1, 4096, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        assert not decode_kernels_apply(off, [0.0])
    monkeypatch.setattr(lora_fused, "DECODE_KERNELS", True)
    with FakeTensorMode():
        x = torch.empty(1, 4096, dtype=torch.bfloat16, device="cuda")
        rows = torch.empty(DECODE_MAX_ROWS, 4096, dtype=torch.float16, device="cuda")
        too_many = torch.empty(DECODE_MAX_ROWS + 1, 4096, dtype=torch.bfloat16, device="cuda")
        odd_k = torch.empty(1, 4100, dtype=torch.bfloat16, device="cuda")
        fp32 = torch.empty(1, 4096, device="cuda")
    with torch.no_grad():
        assert decode_kernels_apply(x, [0.0, 0.0]) and decode_kernels_apply(rows, [0.0])
        assert not decode_kernels_apply(x, [0.0, 0.1])  # dropout in effect (training)
        assert not any(decode_kernels_apply(t, [0.0]) for t in (too_many, odd_k, fp32))
        assert not decode_kernels_apply(torch.empty(1, 4096, dtype=torch.bfloat16), [0.0])  # the CPU
    assert not decode_kernels_apply(x, [0.0])  # autograd on


class CountDecodeOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = {"lora_down": 0, "lora_up_add_": 0}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.calls:
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))


def test_cpu_decode_does_not_take_the_decode_ops():
    model = set_lora_path(tiny_llama().eval(), "fused")
    with torch.no_grad(), CountDecodeOps() as counter:
        model(IDS[:1, :4])
    assert counter.calls == {"lora_down": 0, "lora_up_add_": 0}


@pytest.mark.parametrize("merged_k", [False, True])
def test_decode_flow_through_the_ops_equals_the_fused_path(monkeypatch, merged_k):
    """With the dispatch condition forced on, the CPU runs the decode flow (one lora_down per group, one
    lora_up_add_ per member, its column offset into the group's h) through the ops' ATen forms: the logits of the
    fused path without them, bit for bit, also with a merged member left out of its group."""
    model = set_lora_path(tiny_llama().eval(), "fused")
    if merged_k:
        model.model.layers[0].self_attn.k_proj.merge()
    ids = IDS[:1, :5]
    with torch.no_grad():
        want = model(ids)
        monkeypatch.setattr(lora_fused, "decode_kernels_apply", lambda x2, ps: not any(ps))
        with CountDecodeOps() as counter:
            got = model(ids)
    assert counter.calls == {"lora_down": 4 * 2, "lora_up_add_": 7 * 2 - merged_k}
    assert torch.equal(got, want)
    assert all(m.group._decode is None for m in lora_modules(model).values() if not m.merged)  # nothing kept


@pytest.mark.parametrize("merged_k", [False, True])
def test_decode_adds_sibling_terms_in_one_launch(monkeypatch, merged_k):
    """With projection groups (proj_group.py) computing q/k/v's and gate/up's base outputs at the first member's
    call, that member's lora_up_add_ adds its siblings' terms too: 4 launches a layer instead of 7, the logits bit
    for bit those of one launch per member (the decode flow forced on the CPU, as above), with or without a merged
    member elsewhere in the model, and nothing left behind."""
    model = set_lora_path(tiny_llama(quantize=True).eval(), "fused")
    if merged_k:
        model.model.layers[0].self_attn.k_proj.merge()
    ids = IDS[:1, :5]
    monkeypatch.setattr(lora_fused, "decode_kernels_apply", lambda x2, ps: not any(ps))
    with torch.no_grad():
        with CountDecodeOps() as counter:
            want = model(ids)
        assert counter.calls["lora_up_add_"] == 7 * 2 - merged_k
        group_projections(model)
        monkeypatch.setattr(ProjectionGroup, "applies", lambda self, x: True)
        with CountDecodeOps() as counter:
            got = model(ids)
    # A merged 4-bit member's base becomes a float nn.Linear, so its block has no projection group: q and v add
    # their terms one launch each there.
    assert counter.calls == {"lora_down": 4 * 2, "lora_up_add_": 4 * 2 + merged_k}
    assert torch.equal(got, want)
    groups = {id(m.group): m.group for m in lora_modules(model).values() if not m.merged}.values()
    assert all(not g._added and not g._h and g._decode is None for g in groups)


# -- training: the first 20 steps -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return sentencepiece_dir(tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_twenty_training_steps_match_reference(tmp_path, tok_dir, checkpointing):
    """sft.train, fp32 on the CPU, same seed, dropout 0: the fused path's losses and gradient norms equal the
    reference path's within fp32 tolerance, step by step."""
    tok = Tokenizer.from_pretrained(tok_dir)
    data = write_jsonl(tmp_path / "train.jsonl", counting_records(80))
    curves = {}
    for path in ("reference", "fused"):
        model = tiny_model(tok.vocab_size, seed=4)  # the same weights for both; train() adds LoRA
        cfg = TrainConfig(data=str(data), output_dir=str(tmp_path / path), seq_len=48, batch_size=4, grad_accum=1,
                          max_steps=20, lr=3e-3, lora_r=4, lora_dropout=0.0, eval_fraction=0.0, checkpoint_every=0,
                          gradient_checkpointing=checkpointing, precision="fp32", progress=False, lora_path=path)
        train(model, tok, cfg)
        rows = [json.loads(line) for line in (tmp_path / path / "metrics.jsonl").read_text().splitlines()]
        curves[path] = [(r["loss"], r["grad_norm"]) for r in rows if "loss" in r]
    assert len(curves["fused"]) == 20
    torch.testing.assert_close(torch.tensor(curves["fused"]), torch.tensor(curves["reference"]), rtol=1e-5,
                               atol=1e-6)
    assert curves["fused"][-1][0] < curves["fused"][0][0]  # it trains
