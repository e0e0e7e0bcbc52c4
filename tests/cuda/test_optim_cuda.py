"""PagedAdamW on a GPU: the CUDA kernels against the CPU kernels (bit for bit), managed and host paging against
unpaged state (bit for bit), where each mode keeps its state, the GPU memory host paging costs (its buffer), the
managed allocator's refusal to oversubscribe, state_dict across devices and paging modes, and opcheck.

Leaves out the agreement of the CPU kernels with the reference and with torch / bitsandbytes (tests/test_optim.py).
"""

import pytest
import torch

from minqlora import ops, quant
from minqlora.optim import SIGNED_ZERO_CODE, STATE_BLOCKSIZE, PagedAdamW

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
# two parameters >= 100,000 elements (managed when paging="managed"), two smaller, one of them with 32-bit state
SHAPES = [(512, 1024), (300, 400), (64, 100), (1000,)]


def grads(n, dtype, seed, device):
    g = torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(dtype)
    g[3::97] = float("nan")
    g[5::101] = float("inf")
    return g.to(device)


def state_tensors(n, bits):
    if bits == 32:
        return [torch.rand(n), torch.rand(n) * 1e-3]
    nb = -(-n // STATE_BLOCKSIZE)
    return [torch.full((n,), SIGNED_ZERO_CODE, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8),
            torch.zeros(nb), torch.zeros(nb)]


def run_op(bits, p, g, st, step):
    if bits == 32:
        ops.adamw_step_32bit(p, g, *st, step=step, **HYPER)
    else:
        maps = (quant.DYNAMIC_SIGNED.to(p.device), quant.DYNAMIC_UNSIGNED.to(p.device))
        ops.adamw_step_8bit(p, g, *st, *maps, step=step, **HYPER)


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1000, 70001, (1 << 20) + 3])
def test_cuda_kernel_equals_cpu_kernel(bits, dtype, n):
    p_cpu = torch.randn(n).to(dtype)
    st_cpu = state_tensors(n, bits)
    p_gpu, st_gpu = p_cpu.cuda(), [t.cuda() for t in st_cpu]
    for step in range(1, 6):
        g = grads(n, dtype, step, "cpu")
        run_op(bits, p_cpu, g, st_cpu, step)
        run_op(bits, p_gpu, g.cuda(), st_gpu, step)
        assert torch.equal(p_gpu.cpu(), p_cpu)
        for a, b in zip(st_gpu, st_cpu):
            assert torch.equal(a.cpu(), b)


def make_params(dtype, device="cuda", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype).to(device)) for s in SHAPES]


def set_grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype).to(p.device)


def train(opt, params, steps, seed0=0):
    for step in range(steps):
        set_grads(params, seed0 + step)
        opt.step()


def assert_same_state(opt_a, params_a, opt_b, params_b):
    opt_a.synchronize()
    opt_b.synchronize()
    for p, q in zip(params_a, params_b):
        assert torch.equal(p.detach().cpu(), q.detach().cpu())
        assert opt_a.state[p].keys() == opt_b.state[q].keys()
        for k, v in opt_b.state[q].items():
            got = opt_a.state[p][k]
            assert torch.equal(got.cpu(), v.cpu()) if isinstance(v, torch.Tensor) else got == v


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paging_modes_are_bit_identical(bits, dtype):
    runs = {}
    for paging in (None, "managed", "host"):
        params = make_params(dtype)
        set_grads(params, -1)  # grads exist before the baseline, so `grown` below is optimizer state only
        # 64 KiB of buffer: a few thousand elements per chunk, so parameters span many chunks
        opt = PagedAdamW(params, optim_bits=bits, paging=paging, host_buffer_bytes=64 << 10, lr=HYPER["lr"],
                         weight_decay=HYPER["weight_decay"])
        base = torch.cuda.memory_allocated()
        train(opt, params, 6)
        runs[paging] = (params, opt, torch.cuda.memory_allocated() - base)
    ref_params, ref_opt, ref_grown = runs[None]
    for paging in ("managed", "host"):
        params, opt, grown = runs[paging]
        assert_same_state(opt, params, ref_opt, ref_params)
        if paging == "host":
            assert all(t.device.type == "cpu" and t.is_pinned() for p in params for t in opt.state[p].values()
                       if isinstance(t, torch.Tensor))
            assert grown <= (64 << 10) + 4096  # the buffer and the two maps
        else:  # m and v of parameters >= 100,000 elements are managed memory, outside the caching allocator
            paged = sum(opt.state[p][k].numel() * opt.state[p][k].element_size() for p in params
                        if p.numel() >= 100_000 for k in ("exp_avg", "exp_avg_sq"))
            assert paged > 0 and grown <= ref_grown - paged + 4096
            assert all(opt.state[p]["exp_avg"].is_cuda for p in params)


@pytest.mark.parametrize("bits", [32, 8])
def test_host_paging_gpu_memory_is_bounded_by_its_buffer(bits):
    n = 8 << 20  # 8M fp32 elements: 64 MiB of 32-bit state, 16 MiB of 8-bit state
    buffer = 2 << 20
    peaks = {}
    for paging in (None, "host"):
        p = torch.nn.Parameter(torch.randn(n, device="cuda"))
        p.grad = torch.randn(n, device="cuda")
        opt = PagedAdamW([p], optim_bits=bits, paging=paging, host_buffer_bytes=buffer)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(3):
            opt.step()
        torch.cuda.synchronize()
        peaks[paging] = torch.cuda.max_memory_allocated() - base
        del opt, p
    state = n * (8 if bits == 32 else 2)
    assert peaks[None] >= state
    assert peaks["host"] <= buffer + 4096, peaks  # the two slots and the two 1 KiB maps


def test_managed_allocation_refuses_to_oversubscribe():
    free, total = torch.cuda.mem_get_info()
    before = ops.managed_bytes_in_use()
    with pytest.raises(RuntimeError, match="refusing to allocate"):
        ops.managed_empty([2 * free], torch.uint8, "cuda")
    assert ops.managed_bytes_in_use() == before
    t = ops.managed_empty([1000, 3], torch.float32, "cuda")
    assert t.shape == (1000, 3) and t.is_cuda and ops.managed_bytes_in_use() == before + 12000
    t.fill_(2.0)
    ops.prefetch_managed(t, "cpu")
    ops.prefetch_managed(t, t.device)
    assert t.sum().item() == 6000.0
    del t
    assert ops.managed_bytes_in_use() == before


def test_bad_input_raises_before_the_kernel():
    p = torch.zeros(4, device="cuda")
    with pytest.raises(ValueError, match="grad must match p"):
        ops.adamw_step_32bit(p, torch.zeros(5, device="cuda"), p.clone(), p.clone(), step=1, **HYPER)
    with pytest.raises(ValueError, match="exp_avg must be 4 values of torch.float32 on cuda"):
        ops.adamw_step_32bit(p, p.clone(), torch.zeros(4), p.clone(), step=1, **HYPER)


def test_state_dict_across_paging_modes_and_devices():
    """Saved from managed 8-bit state on the GPU, loaded into host paging, no paging and a CPU optimizer: all four
    continue identically (the CPU kernel equals the CUDA kernel bit for bit)."""
    src_params = make_params(torch.float32)
    src = PagedAdamW(src_params, optim_bits=8, paging="managed", lr=1e-2)
    train(src, src_params, 3)
    sd = src.state_dict()
    copies = []
    for paging, device in (("host", "cuda"), (None, "cuda"), ("managed", "cpu")):
        params = [torch.nn.Parameter(p.detach().clone().to(device)) for p in src_params]
        opt = PagedAdamW(params, optim_bits=8, paging=paging, lr=0.5)
        opt.load_state_dict(sd)
        copies.append((params, opt))
    train(src, src_params, 3, 10)
    for params, opt in copies:
        train(opt, params, 3, 10)
        assert_same_state(opt, params, src, src_params)


def test_opcheck_cuda():
    n = 3000
    p, g = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
    hyper = (1e-2, 0.9, 0.999, 1e-8, 0.1, 3)
    torch.library.opcheck(torch.ops.minqlora.adamw_step_32bit,
                          (p, g, torch.rand(n, device="cuda"), torch.rand(n, device="cuda")) + hyper)
    st = [t.cuda() for t in state_tensors(n, 8)]
    maps = (quant.DYNAMIC_SIGNED.cuda(), quant.DYNAMIC_UNSIGNED.cuda())
    torch.library.opcheck(torch.ops.minqlora.adamw_step_8bit, (p, g, *st, *maps) + hyper)
    device = torch.device("cuda", torch.cuda.current_device())
    # managed_empty returns uninitialized memory, so the test that compares outputs of two runs is left out
    torch.library.opcheck(torch.ops.minqlora.managed_empty, ([10, 3], torch.float32, device),
                          test_utils=("test_schema", "test_faketensor"))
    t = ops.managed_empty([1000], torch.float32, device)
    torch.library.opcheck(torch.ops.minqlora.prefetch_managed, (t, device))


def test_32bit_list_op_on_cuda_equals_the_single_op():
    """adamw_step_32bit_list dispatches each element to the CUDA kernel: the same bits as one call per tensor."""
    sizes, dtypes = (1, 4097, 70001), (torch.float32, torch.bfloat16, torch.float16)
    ps = [torch.randn(n).to(dt).cuda() for n, dt in zip(sizes, dtypes)]
    ms, vs = [torch.rand(n).cuda() for n in sizes], [torch.rand(n).cuda() * 1e-3 for n in sizes]
    ref = [[t.clone() for t in ts] for ts in (ps, ms, vs)]
    for t in range(1, 4):
        gs = [grads(n, dt, 10 * t + i, "cuda") for i, (n, dt) in enumerate(zip(sizes, dtypes))]
        ops.adamw_step_32bit_list(ps, gs, ms, vs, step=t, **HYPER)
        for p, g, m, v in zip(ref[0], gs, ref[1], ref[2]):
            ops.adamw_step_32bit(p, g, m, v, step=t, **HYPER)
    for got, want in zip(ps + ms + vs, ref[0] + ref[1] + ref[2]):
        assert torch.equal(got, want)
