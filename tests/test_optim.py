"""PagedAdamW and its CPU kernels: 32-bit against torch.optim.AdamW, the kernels against the pure-PyTorch reference
(bit for bit, NaN/Inf gradients included), 8-bit against bitsandbytes' AdamW8bit, the 32-bit fallback of small
parameters, state_dict round trips and their errors, opcheck and torch.compile of the ops.

Leaves out the CUDA kernels and the two paging modes on a GPU (tests/cuda/test_optim_cuda.py); on a CPU paging
only has to leave state as ordinary tensors, which is checked here.
"""

import io

import bitsandbytes as bnb
import bitsandbytes.functional as bnb_functional
import pytest
import torch

from minqlora import ops, quant
from minqlora.optim import (MIN_8BIT_NUMEL, SIGNED_ZERO_CODE, STATE_BLOCKSIZE, PagedAdamW, adamw_step_8bit_ref,
                            adamw_step_ref)

HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grads_with_nonfinite(n, dtype, seed):
    g = torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(dtype)
    g[3::97] = float("nan")
    g[5::101] = float("inf")
    g[7::103] = -float("inf")
    return g


def fresh_8bit_state(n):
    nb = -(-n // STATE_BLOCKSIZE)
    return (torch.full((n,), SIGNED_ZERO_CODE, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8),
            torch.zeros(nb), torch.zeros(nb))


def make_params(shapes, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def set_grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


def test_zero_codes():
    assert quant.DYNAMIC_SIGNED[SIGNED_ZERO_CODE] == 0 and quant.DYNAMIC_UNSIGNED[0] == 0


# ---- the kernels against the reference, bit for bit ----

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 255, 4097, 70001])
def test_32bit_kernel_equals_reference(dtype, n):
    p = torch.randn(n).to(dtype)
    m, v = torch.zeros(n), torch.zeros(n)
    rp, rm, rv = p.clone(), m.clone(), v.clone()
    for t in range(1, 8):
        g = grads_with_nonfinite(n, dtype, t)
        ops.adamw_step_32bit(p, g, m, v, step=t, **HYPER)
        rp, rm, rv = adamw_step_ref(rp, g, rm, rv, step=t, **HYPER)
        assert torch.equal(p, rp) and torch.equal(m, rm) and torch.equal(v, rv)


def test_32bit_list_op_equals_the_single_op():
    """adamw_step_32bit_list over mixed dtypes and sizes (NaN/Inf gradients included) = adamw_step_32bit on each."""
    sizes, dtypes = (1, 255, 4097, 70001, 33), (torch.float32, torch.bfloat16, torch.float16, torch.float32,
                                                torch.bfloat16)
    ps = [torch.randn(n).to(dt) for n, dt in zip(sizes, dtypes)]
    ms, vs = [torch.rand(n) for n in sizes], [torch.rand(n) * 1e-3 for n in sizes]
    ref = [[t.clone() for t in ts] for ts in (ps, ms, vs)]
    for t in range(1, 4):
        gs = [grads_with_nonfinite(n, dt, 10 * t + i) for i, (n, dt) in enumerate(zip(sizes, dtypes))]
        ops.adamw_step_32bit_list(ps, gs, ms, vs, step=t, **HYPER)
        for p, g, m, v in zip(*ref[:1], gs, *ref[1:]):
            ops.adamw_step_32bit(p, g, m, v, step=t, **HYPER)
        for got, want in zip(ps + ms + vs, ref[0] + ref[1] + ref[2]):
            assert torch.equal(got, want)
    bad_m = ms[:2] + [torch.zeros(3)] + ms[3:]
    with pytest.raises(RuntimeError, match="element 2: exp_avg has 3 elements, expected 4097"):
        ops.adamw_step_32bit_list(ps, gs, bad_m, vs, step=4, **HYPER)
    with pytest.raises(RuntimeError, match="lists of one length"):
        ops.adamw_step_32bit_list(ps, gs[:2], ms, vs, step=4, **HYPER)
    with pytest.raises(ValueError, match="step must be >= 1"):
        ops.adamw_step_32bit_list(ps, gs, ms, vs, step=0, **HYPER)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [4096, 5000, 70001])
def test_8bit_kernel_equals_reference(dtype, n):
    p = torch.randn(n).to(dtype)
    state = fresh_8bit_state(n)
    ref = (p.clone(),) + tuple(t.clone() for t in state)
    for t in range(1, 8):
        g = grads_with_nonfinite(n, dtype, t)
        ops.adamw_step_8bit(p, g, *state, quant.DYNAMIC_SIGNED, quant.DYNAMIC_UNSIGNED, step=t, **HYPER)
        ref = adamw_step_8bit_ref(*ref[:1], g, *ref[1:], step=t, **HYPER)
        for got, want in zip((p,) + state, ref):
            assert torch.equal(got, want)


def test_optimizer_8bit_equals_reference():
    params = make_params([(40, 130)])
    opt = PagedAdamW(params, optim_bits=8, lr=HYPER["lr"], weight_decay=HYPER["weight_decay"], paging=None)
    p = params[0]
    ref = (p.detach().clone(),) + fresh_8bit_state(p.numel())
    for t in range(1, 6):
        set_grads(params, t)
        opt.step()
        ref = adamw_step_8bit_ref(ref[0], p.grad, *ref[1:], step=t, **HYPER)
        st = opt.state[p]
        got = (p, st["exp_avg"], st["exp_avg_sq"], st["exp_avg_absmax"], st["exp_avg_sq_absmax"])
        for a, b in zip(got, ref):
            assert torch.equal(a.detach().reshape(-1), b.reshape(-1))


# ---- the optimizer against torch.optim.AdamW and bitsandbytes ----

@pytest.mark.parametrize("paging", [None, "managed", "host"])
def test_32bit_matches_torch_adamw(paging):
    ours = make_params([(64, 100), (300,), (50, 50)])
    theirs = make_params([(64, 100), (300,), (50, 50)])
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": 3e-3, "betas": (0.8, 0.99),
                                               "weight_decay": 0.0}]
    opt = PagedAdamW(groups(ours), lr=1e-2, weight_decay=0.1, paging=paging)
    ref = torch.optim.AdamW(groups(theirs), lr=1e-2, weight_decay=0.1)
    for step in range(100):
        if step == 50:  # a schedule changing lr mid-run
            for o in (opt, ref):
                o.param_groups[0]["lr"] = 5e-3
        set_grads(ours, step)
        set_grads(theirs, step)
        opt.step()
        ref.step()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    for p in ours:  # on a CPU every paging mode keeps ordinary CPU tensors
        assert all(not t.is_pinned() and t.device.type == "cpu" for t in opt.state[p].values()
                   if isinstance(t, torch.Tensor))


def random_8bit_state(n, seed):
    """Codes and absmax of m, v after a few fp32 Adam steps, as a trained state would look."""
    gen = torch.Generator().manual_seed(seed)
    m, v = torch.zeros(n), torch.zeros(n)
    for _ in range(3):
        g = torch.randn(n, generator=gen) * torch.rand(n, generator=gen)
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
    c1, a1 = quant.quantize_blockwise_8bit_ref(m, quant.DYNAMIC_SIGNED, STATE_BLOCKSIZE)
    c2, a2 = quant.quantize_blockwise_8bit_ref(v, quant.DYNAMIC_UNSIGNED, STATE_BLOCKSIZE)
    return c1, c2, a1, a2


def test_8bit_one_step_matches_bitsandbytes():
    """From the same 8-bit state, one step of bitsandbytes' CPU 8-bit Adam gives the same parameters up to float
    rounding, and the same state codes except where its CPU quantizer (a 65,536-bin lookup table, bnb-format.md
    §3) misses the nearest code."""
    n = 25_600
    p = torch.randn(n)
    g = torch.randn(n)
    state = random_8bit_state(n, 1)
    bnb_state = tuple(t.clone() for t in state)
    p_bnb = p.clone()
    ops.adamw_step_8bit(p, g, *state, quant.DYNAMIC_SIGNED, quant.DYNAMIC_UNSIGNED, step=4, **HYPER)
    bnb_functional.optimizer_update_8bit_blockwise(
        "adam", g, p_bnb, bnb_state[0], bnb_state[1], HYPER["beta1"], HYPER["beta2"], 0.0, 0.0, HYPER["eps"], 4,
        HYPER["lr"], quant.DYNAMIC_SIGNED, quant.DYNAMIC_UNSIGNED, bnb_state[2], bnb_state[3],
        HYPER["weight_decay"], gnorm_scale=1.0)
    torch.testing.assert_close(p, p_bnb, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(state[2], bnb_state[2], rtol=1e-6, atol=0)  # absmax of m, v: same values
    torch.testing.assert_close(state[3], bnb_state[3], rtol=1e-6, atol=0)
    assert (state[0] != bnb_state[0]).float().mean() < 0.01       # measured 0.15 %
    assert (state[1] != bnb_state[1]).float().mean() < 0.05       # measured 3 %, all near v = 0
    m_ours = quant.dequantize_blockwise_8bit_ref(state[0], state[2], quant.DYNAMIC_SIGNED, STATE_BLOCKSIZE)
    m_bnb = quant.dequantize_blockwise_8bit_ref(bnb_state[0], bnb_state[2], quant.DYNAMIC_SIGNED, STATE_BLOCKSIZE)
    assert ((m_ours - m_bnb).abs() <= 0.02 * state[2].repeat_interleave(STATE_BLOCKSIZE)).all()


def test_8bit_training_matches_bitsandbytes():
    """50 steps of PagedAdamW(optim_bits=8) and bnb.optim.AdamW8bit on the same gradients: both stray from exact
    32-bit AdamW by the same 8-bit state error (measured: mean 0.12·lr), and from each other far less."""
    shapes = [(64, 128), (5000,), (300, 40), (100,)]
    ours, theirs, exact = make_params(shapes), make_params(shapes), make_params(shapes)
    lr = 1e-3
    opts = [PagedAdamW(ours, lr=lr, weight_decay=0.1, optim_bits=8),
            bnb.optim.AdamW8bit(theirs, lr=lr, weight_decay=0.1),
            PagedAdamW(exact, lr=lr, weight_decay=0.1, optim_bits=32)]
    for step in range(50):
        for ps in (ours, theirs, exact):
            set_grads(ps, step)
        for o in opts:
            o.step()
    for a, b, e in zip(ours, theirs, exact):
        ours_err, bnb_err = (a - e).abs().mean(), (b - e).abs().mean()
        assert ours_err <= 1.02 * bnb_err + 1e-3 * lr           # no worse than bitsandbytes' own 8-bit error
        assert (a - b).abs().mean() <= 0.2 * bnb_err + 1e-6     # measured: 0.01·lr against 0.12·lr
        assert (a - b).abs().max() <= 2 * lr                     # measured: 0.5·lr at the worst element


# ---- NaN/Inf gradients, small parameters, argument checks ----

@pytest.mark.parametrize("optim_bits", [32, 8])
def test_nonfinite_gradient_elements_are_skipped(optim_bits):
    params = make_params([(70, 100)])
    p = params[0]
    opt = PagedAdamW(params, optim_bits=optim_bits, paging=None)
    for step in range(3):
        set_grads(params, step)
        opt.step()
    before = p.detach().clone()
    set_grads(params, 3)
    bad = torch.zeros(p.numel(), dtype=torch.bool)
    bad[::37] = True
    p.grad.view(-1)[bad] = torch.tensor([float("nan"), float("inf"), -float("inf")]).repeat(100)[:int(bad.sum())]
    opt.step()
    assert torch.equal(p.detach().view(-1)[bad], before.view(-1)[bad])
    # the rest moved (8-bit state may round a tiny m to 0, leaving an element in place: allow a few)
    assert (p.detach().view(-1)[~bad] != before.view(-1)[~bad]).float().mean() > 0.95
    st = opt.state[p]
    if optim_bits == 8:
        m = ops.dequantize_blockwise_8bit(st["exp_avg"].view(-1), st["exp_avg_absmax"], quant.DYNAMIC_SIGNED)
        v = ops.dequantize_blockwise_8bit(st["exp_avg_sq"].view(-1), st["exp_avg_sq_absmax"], quant.DYNAMIC_UNSIGNED)
    else:
        m, v = st["exp_avg"].view(-1), st["exp_avg_sq"].view(-1)
    assert (m[bad] == 0).all() and (v[bad] == 0).all() and (v[~bad] > 0).all()
    assert torch.isfinite(p).all()


def test_small_parameters_keep_32bit_state():
    params = make_params([(MIN_8BIT_NUMEL - 1,), (MIN_8BIT_NUMEL,), (3,)])
    opt = PagedAdamW(params, optim_bits=8)
    set_grads(params, 0)
    opt.step()
    assert [opt.state[p]["exp_avg"].dtype for p in params] == [torch.float32, torch.uint8, torch.float32]
    assert set(opt.state[params[0]]) == {"step", "exp_avg", "exp_avg_sq"}
    assert opt.state[params[1]]["exp_avg_absmax"].shape == (MIN_8BIT_NUMEL // STATE_BLOCKSIZE,)


def test_bf16_parameters_and_non_contiguous():
    base = torch.randn(30, 200)
    a = torch.nn.Parameter(base.t().to(torch.bfloat16))       # non-contiguous
    b = torch.nn.Parameter(base.t().contiguous().to(torch.bfloat16))
    oa, ob = PagedAdamW([a], optim_bits=8, lr=1e-2), PagedAdamW([b], optim_bits=8, lr=1e-2)
    for step in range(4):
        set_grads([a], step)
        b.grad = a.grad.clone()
        oa.step()
        ob.step()
    assert not a.is_contiguous() and torch.equal(a, b) and a.dtype == torch.bfloat16
    assert oa.state[a]["exp_avg_absmax"].dtype == torch.float32


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-1.0), "lr"), (dict(betas=(0.9, 1.0)), "betas"), (dict(eps=-1e-8), "eps"),
    (dict(weight_decay=-0.1), "weight_decay"), (dict(optim_bits=4), "optim_bits"), (dict(paging="disk"), "paging"),
    (dict(host_buffer_bytes=100), "host_buffer_bytes"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PagedAdamW(make_params([(4,)]), **kwargs)


def test_bad_parameters():
    with pytest.raises(ValueError, match="float32, float16 and bfloat16"):
        PagedAdamW([torch.zeros(4, dtype=torch.float64, requires_grad=True)])
    with pytest.raises(ValueError, match="param group 1: betas"):
        PagedAdamW([{"params": make_params([(4,)])}, {"params": make_params([(4,)]), "betas": (2.0, 0.9)}])
    opt = PagedAdamW(make_params([(4,)]))
    with pytest.raises(ValueError, match="param group 1: lr"):
        opt.add_param_group({"params": make_params([(4,)]), "lr": -1.0})
    assert len(opt.param_groups) == 1
    # the wrappers check in Python (ValueError); the kernels check again in C++ (RuntimeError)
    bad_32bit = (torch.zeros(4), torch.zeros(5), torch.zeros(4), torch.zeros(4))
    with pytest.raises(ValueError, match="grad must match p"):
        ops.adamw_step_32bit(*bad_32bit, step=1, **HYPER)
    with pytest.raises(RuntimeError, match="grad has shape"):
        torch.ops.minqlora.adamw_step_32bit(*bad_32bit, 1e-2, 0.9, 0.999, 1e-8, 0.0, 1)
    bad_8bit = (torch.zeros(300), torch.zeros(300), torch.zeros(300, dtype=torch.uint8),
                torch.zeros(300, dtype=torch.uint8), torch.zeros(1), torch.zeros(2), quant.DYNAMIC_SIGNED,
                quant.DYNAMIC_UNSIGNED)
    with pytest.raises(ValueError, match="exp_avg_absmax must be 2 values"):
        ops.adamw_step_8bit(*bad_8bit, step=1, **HYPER)
    with pytest.raises(RuntimeError, match="exp_avg_absmax has 1 elements, expected 2"):
        torch.ops.minqlora.adamw_step_8bit(*bad_8bit, 1e-2, 0.9, 0.999, 1e-8, 0.0, 1)
    good = (torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.zeros(4))
    with pytest.raises(ValueError, match="step must be >= 1"):
        ops.adamw_step_32bit(*good, step=0, **HYPER)
    with pytest.raises(RuntimeError, match="step must be >= 1"):
        torch.ops.minqlora.adamw_step_32bit(*good, 1e-2, 0.9, 0.999, 1e-8, 0.0, 0)
    with pytest.raises(ValueError, match="must be contiguous"):
        ops.adamw_step_32bit(torch.zeros(4, 2).t(), torch.zeros(2, 4), torch.zeros(8), torch.zeros(8), step=1,
                             **HYPER)
    with pytest.raises(ValueError, match="managed memory lives on a CUDA device"):
        ops.managed_empty([4], torch.float32, "cpu")


# ---- state_dict ----

def train(opt, params, steps, seed0):
    for step in range(steps):
        set_grads(params, seed0 + step)
        opt.step()


@pytest.mark.parametrize("optim_bits", [32, 8])
@pytest.mark.parametrize("paging", [None, "managed", "host"])
def test_state_dict_round_trip(optim_bits, paging):
    shapes = [(64, 100), (200,)]
    a, b = make_params(shapes), make_params(shapes)
    groups = lambda ps: [{"params": ps[:1]}, {"params": ps[1:], "lr": 1e-3}]
    oa = PagedAdamW(groups(a), optim_bits=optim_bits, lr=1e-2, weight_decay=0.1)
    train(oa, a, 5, 0)
    buf = io.BytesIO()
    torch.save(oa.state_dict(), buf)
    with torch.no_grad():
        for x, y in zip(a, b):
            y.copy_(x)
    ob = PagedAdamW(groups(b), optim_bits=optim_bits, lr=0.5, paging=paging)  # hyperparameters come from the dict
    saved = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    ob.load_state_dict(saved)
    for t in saved["state"].values():  # the optimizer copied the tensors: changing the dict changes nothing
        t["exp_avg"].zero_()
    assert ob.param_groups[1]["lr"] == 1e-3 and ob.param_groups[0]["lr"] == 1e-2
    train(oa, a, 5, 100)
    train(ob, b, 5, 100)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
        assert oa.state[x].keys() == ob.state[y].keys()
        for k in oa.state[x]:
            sa, sb = oa.state[x][k], ob.state[y][k]
            assert torch.equal(sa, sb) if isinstance(sa, torch.Tensor) else sa == sb


def test_state_dict_errors_name_the_problem():
    shapes = [(64, 100), (200,)]
    src = PagedAdamW(make_params(shapes), optim_bits=32)
    train(src, src.param_groups[0]["params"], 2, 0)
    sd = src.state_dict()
    dst_params = make_params(shapes)
    dst = PagedAdamW(dst_params, optim_bits=8)
    train(dst, dst_params, 1, 0)
    before = {k: v.clone() for k, v in dst.state[dst_params[0]].items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match=r"parameter 0 .*missing keys .*exp_avg_absmax.*8-bit state"):
        dst.load_state_dict(sd)
    for k, v in before.items():  # a failed load changes nothing
        assert torch.equal(dst.state[dst_params[0]][k], v)

    def broken(edit):
        d = src.state_dict()
        d = {"state": {k: dict(v) for k, v in d["state"].items()},
             "param_groups": [dict(g) for g in d["param_groups"]]}
        edit(d)
        return d

    same = PagedAdamW(make_params(shapes), optim_bits=32)
    cases = [
        (lambda d: d["param_groups"].append(dict(d["param_groups"][0])), "2 param groups"),
        (lambda d: d["param_groups"][0].update(params=[0]), "lists 1 parameters"),
        (lambda d: d["state"][0].update(exp_avg=torch.zeros(3)), r"'exp_avg' has shape \(3,\)"),
        (lambda d: d["state"][1].update(exp_avg_sq=torch.zeros(200, dtype=torch.float16)), "dtype torch.float16"),
        (lambda d: d["state"][0].pop("exp_avg_sq"), "missing keys"),
        (lambda d: d["state"][0].update(step=-1), "'step' must be a non-negative integer"),
        (lambda d: d["state"].update({7: d["state"][0]}), "parameter 7"),
        (lambda d: d["param_groups"][0].pop("eps"), "lacks"),
    ]
    for edit, match in cases:
        with pytest.raises(ValueError, match=match):
            same.load_state_dict(broken(edit))
    with pytest.raises(ValueError, match="'state' and 'param_groups'"):
        same.load_state_dict({"state": {}})


# ---- op registration ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    n = 1000
    p, g = torch.randn(n).to(dtype), torch.randn(n).to(dtype)
    hyper = (1e-2, 0.9, 0.999, 1e-8, 0.1, 3)
    torch.library.opcheck(torch.ops.minqlora.adamw_step_32bit, (p, g, torch.rand(n), torch.rand(n)) + hyper)
    c1, c2, a1, a2 = random_8bit_state(n, 0)
    torch.library.opcheck(torch.ops.minqlora.adamw_step_8bit,
                          (p, g, c1, c2, a1, a2, quant.DYNAMIC_SIGNED, quant.DYNAMIC_UNSIGNED) + hyper)


def test_torch_compile_fullgraph():
    n = 1000
    p, g = torch.randn(n), torch.randn(n)
    state = random_8bit_state(n, 2)

    def step(p, g, c1, c2, a1, a2):
        ops.adamw_step_8bit(p, g, c1, c2, a1, a2, quant.DYNAMIC_SIGNED, quant.DYNAMIC_UNSIGNED, step=3, **HYPER)
        return p

    eager = [t.clone() for t in (p, g) + state]
    compiled = [t.clone() for t in (p, g) + state]
    step(*eager)
    torch.compile(step, fullgraph=True, backend="aot_eager")(*compiled)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)
