"""The fused 4-bit GEMV / small-GEMM kernels (csrc/cuda/gemv_kernels.cuh, the register ring at any M, and
gemv_stream.cuh, one token streamed through shared memory; M = 1 cases run both) against their reference,
F.linear(x, quant.dequantize_ref(...)), and gemm_4bit's dispatch between it and dequantize + matmul.

Every output element is held to a dot-product error bound, |y - y_exact| <= 2^-7 · sum_k |x_k| |w_nk| + 2^-8 |y|,
with y_exact in float64 from the float32 dequantized weight: a wrong index, a missing block scale or an unwritten
element is off by O(1) of that bound, while the kernel's own rounding (weights enter the tensor cores as bf16 or
fp16 table values, fp32 sums, one rounding of y) stays far inside it. The reference path (bf16/fp16 dequantized
weight + cuBLAS) is held to the same bound, so the test also shows the two are equally accurate.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import minqlora as mq
from minqlora import ops, quant

DEV = torch.device("cuda")
OPS = torch.ops.minqlora


def make(n, k, blocksize, quant_type, double_quant, seed, dtype=torch.bfloat16):
    g = torch.Generator(device=DEV).manual_seed(seed)
    # a different scale per row and a few outliers, so absmax varies across blocks and rows
    w = torch.randn(n, k, generator=g, device=DEV) * (0.5 + torch.rand(n, 1, generator=g, device=DEV))
    w[:, ::17] *= 4
    packed, state = mq.quantize_4bit(w.to(dtype), blocksize=blocksize, quant_type=quant_type,
                                     double_quant=double_quant)
    return packed, state


def exact_and_bound(x, packed, state):
    w = mq.dequantize_4bit(packed, state, dtype=torch.float32).double()  # the reference weight, float32 decode
    x64 = x.double().reshape(-1, x.shape[-1])
    y = x64 @ w.T
    bound = 2.0 ** -7 * (x64.abs() @ w.abs().T) + 2.0 ** -8 * y.abs() + 1e-30
    return y.reshape(*x.shape[:-1], -1), bound.reshape(*x.shape[:-1], -1)


def check(got, x, packed, state, what):
    y, bound = exact_and_bound(x, packed, state)
    assert got.shape == y.shape and got.dtype == x.dtype, f"{what}: {got.shape} {got.dtype}"
    err = (got.double() - y).abs()
    bad = ~(err <= bound)  # NaN counts as bad
    if bad.any():
        i = int(bad.reshape(-1).nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {got.numel()} outside the bound; first at {i}: "
                             f"{got.reshape(-1)[i].item()} vs {y.reshape(-1)[i].item()} (bound "
                             f"{bound.reshape(-1)[i].item():.3g})")


# at M = 1 all run; "auto" is stream-window there: the streaming kernel with the block scales copied 8-16 chunks at a
# time (gemv_stream.cuh, StreamMode)
KERNELS = ("ring", "stream", "stream-window")


def rand_x(m, k, dtype, seed):
    g = torch.Generator(device=DEV).manual_seed(seed + 1)
    return torch.randn(m, k, generator=g, device=DEV).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_every_m_1_to_64(dtype, quant_type, double_quant):
    # odd N (a partial 16-row tile), K = 64·3 (a partial 128-value chunk at blocksize 64)
    packed, state = make(37, 192, 64, quant_type, double_quant, seed=1, dtype=dtype)
    for m in range(1, 65):
        x = rand_x(m, 192, dtype, seed=m)
        for rows in (0, 80, 128):  # 80, 128: five / eight row tiles per CTA, some past N (80: 3 warps idle)
            for kernel in KERNELS if m == 1 else ("auto",):
                check(ops.gemv_4bit(x, packed, state, rows_per_cta=rows, kernel=kernel), x, packed, state,
                      f"M={m} rows={rows} {kernel}")


@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 1024, 4096])
@pytest.mark.parametrize("odd", [1, 3])
@pytest.mark.parametrize("m", [1, 5, 16, 32])
def test_blocksizes_and_odd_k(blocksize, odd, m):
    k = blocksize * odd
    for n, dq in ((129, True), (16, False)):
        packed, state = make(n, k, blocksize, "nf4", dq, seed=blocksize + odd)
        x = rand_x(m, k, torch.bfloat16, seed=k + m)
        for kernel in KERNELS if m == 1 else ("auto",):
            check(ops.gemv_4bit(x, packed, state, kernel=kernel), x, packed, state,
                  f"bs={blocksize} K={k} N={n} M={m} {kernel}")


@pytest.mark.parametrize("shape", [(4096, 4096), (14336, 4096), (4096, 14336), (1024, 4096)])
@pytest.mark.parametrize("m", [1, 8, 16])
def test_model_shapes(shape, m):
    n, k = shape
    packed, state = make(n, k, 64, "nf4", True, seed=n + k)
    x = rand_x(m, k, torch.bfloat16, seed=m)
    got = ops.gemv_4bit(x, packed, state)
    check(got, x, packed, state, f"{shape} M={m}")
    # every CTA shape (16 rows × a 1/8 split of K per warp ... 128 rows × all of K; 48 and 112: row-tile counts that
    # do not divide the 8 warps, some of them idle) meets the bound, and each is deterministic: the same call twice
    # gives the same bits
    for rows in (16, 32, 48, 64, 112, 128):
        for kernel in KERNELS if m == 1 else ("auto",):
            y = ops.gemv_4bit(x, packed, state, rows_per_cta=rows, kernel=kernel)
            check(y, x, packed, state, f"{shape} M={m} rows_per_cta={rows} {kernel}")
            torch.testing.assert_close(ops.gemv_4bit(x, packed, state, rows_per_cta=rows, kernel=kernel), y,
                                       rtol=0, atol=0)


def test_kernel_choice():
    """"auto" is the streaming kernel at one token and the ring above; "stream" at M > 1 runs the ring; codes that
    are not 4-byte aligned (a view at an odd offset) take the ring at one token; an unknown name is an error."""
    packed, state = make(80, 320, 64, "nf4", True, seed=8)
    x1 = rand_x(1, 320, torch.bfloat16, seed=8)
    torch.testing.assert_close(ops.gemv_4bit(x1, packed, state), ops.gemv_4bit(x1, packed, state, kernel="stream"),
                               rtol=0, atol=0)
    x4 = rand_x(4, 320, torch.bfloat16, seed=9)
    torch.testing.assert_close(ops.gemv_4bit(x4, packed, state, kernel="stream"),
                               ops.gemv_4bit(x4, packed, state, kernel="ring"), rtol=0, atol=0)
    codes = state.absmax
    shifted = torch.empty(codes.numel() + 1, dtype=codes.dtype, device=DEV)[1:]
    shifted.copy_(codes)
    assert shifted.data_ptr() % 4 != 0
    state_odd = dataclasses.replace(state, absmax=shifted)
    got = ops.gemv_4bit(x1, packed, state_odd)
    torch.testing.assert_close(got, ops.gemv_4bit(x1, packed, state, kernel="ring"), rtol=0, atol=0)
    with pytest.raises(ValueError, match="kernel must be one of"):
        ops.gemv_4bit(x1, packed, state, kernel="fast")


@pytest.mark.parametrize("blocksize", [64, 128, 256])
@pytest.mark.parametrize("double_quant", [True, False])
def test_scale_windows_equal_staged_bit_for_bit(blocksize, double_quant):
    """Copying the block scales by windows (codes 16 chunks at a time, float32 absmax 8) brings the same bytes, and the
    decode is the same: y is bit for bit the staged kernel's, in rows and tiles, for every CTA shape (128 rows: one
    warp runs all of K, 112 chunks = 7 / 14 windows, both buffers reused), a partial last chunk (K = 4160) and odd N;
    "auto" is the windows."""
    from minqlora import layout
    for n, k in ((4096, 14336), (37, 4160), (1000, 2048), (48, 768)):
        if k % blocksize:
            continue
        packed, state = make(n, k, blocksize, "nf4", double_quant, seed=n + blocksize)
        x = rand_x(1, k, torch.bfloat16, seed=k)
        layouts = [packed] + ([layout.to_tiles(packed, state.shape)] if layout.tiles_apply(state.shape) else [])
        for rows in (0, 16, 48, 128):
            want = ops.gemv_4bit(x, packed, state, rows_per_cta=rows, kernel="stream")
            for p in layouts:
                for kernel in ("stream-window", "auto"):
                    got = ops.gemv_4bit(x, p, state, rows_per_cta=rows, kernel=kernel)
                    torch.testing.assert_close(got, want, rtol=0, atol=0,
                                               msg=f"{n}x{k} bs={blocksize} rows={rows} {kernel} {p.dim()}-D")
        check(want, x, packed, state, f"{n}x{k} bs={blocksize}")


def test_every_output_written():
    packed, state = make(300, 256, 64, "nf4", True, seed=3)
    x = rand_x(3, 256, torch.bfloat16, seed=3)
    want = ops.gemv_4bit(x, packed, state)
    for _ in range(3):  # the caching allocator hands the NaN-filled block back as the next output
        poison = torch.full((3, 300), float("nan"), device=DEV, dtype=torch.bfloat16)
        del poison
        got = ops.gemv_4bit(x, packed, state)
        assert not got.isnan().any()
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_batched_strided_and_empty_x():
    packed, state = make(64, 256, 64, "nf4", True, seed=4)
    x3 = rand_x(6, 512, torch.bfloat16, seed=4).reshape(2, 3, 512)[..., ::2]  # (2, 3, 256), not contiguous
    assert not x3.is_contiguous()
    check(ops.gemv_4bit(x3, packed, state), x3, packed, state, "strided 3-D x")
    torch.testing.assert_close(mq.gemm_4bit(x3, packed, state), ops.gemv_4bit(x3.contiguous(), packed, state),
                               rtol=0, atol=0)
    empty = torch.empty(0, 256, device=DEV, dtype=torch.bfloat16)
    assert ops.gemv_4bit(empty, packed, state).shape == (0, 64)
    assert mq.gemm_4bit(empty, packed, state).shape == (0, 64)
    assert mq.gemm_4bit(empty.reshape(2, 0, 256), packed, state).shape == (2, 0, 64)


def test_gemm_dispatch():
    """Few rows take the fused kernel (bit for bit gemv_4bit); many rows, float32 x and K that is not a multiple of
    the blocksize take dequantize + matmul (bit for bit F.linear on the dequantized weight)."""
    packed, state = make(96, 512, 64, "nf4", True, seed=5)
    for m in (1, 7, 32):
        x = rand_x(m, 512, torch.bfloat16, seed=m)
        torch.testing.assert_close(mq.gemm_4bit(x, packed, state), ops.gemv_4bit(x, packed, state), rtol=0, atol=0)
    w = mq.dequantize_4bit(packed, state, dtype=torch.bfloat16)
    x = rand_x(33, 512, torch.bfloat16, seed=33)
    torch.testing.assert_close(mq.gemm_4bit(x, packed, state), F.linear(x, w), rtol=0, atol=0)
    x32 = rand_x(2, 512, torch.float32, seed=2)
    torch.testing.assert_close(mq.gemm_4bit(x32, packed, state),
                               F.linear(x32, mq.dequantize_4bit(packed, state, dtype=torch.float32)), rtol=0, atol=0)
    # blocksize 64 but K = 96: the fused kernel does not apply, gemm_4bit still answers
    packed2, state2 = make(40, 96, 64, "nf4", True, seed=6)
    x = rand_x(1, 96, torch.bfloat16, seed=6)
    check(mq.gemm_4bit(x, packed2, state2), x, packed2, state2, "K=96, blocksize 64")
    with pytest.raises(ValueError, match="multiple of 32 and of the blocksize"):
        ops.gemv_4bit(x, packed2, state2)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        ops.gemv_4bit(x32, packed, state)
    for bad in (40, 144, -16):
        with pytest.raises(RuntimeError, match=f"rows_per_cta must be 0 .automatic. or a multiple of 16 up to 128, "
                                               f"got {bad}"):
            ops.gemv_4bit(rand_x(1, 512, torch.bfloat16, seed=1), packed, state, rows_per_cta=bad)


def test_reference_path_meets_the_same_bound():
    packed, state = make(512, 1024, 64, "nf4", True, seed=7)
    x = rand_x(4, 1024, torch.bfloat16, seed=7)
    ref = F.linear(x, quant.dequantize_ref(packed.cpu(), state.to("cpu")).to(DEV, torch.bfloat16))
    check(ref, x, packed, state, "F.linear(x, dequantize_ref)")


def test_grad_and_compile():
    packed, state = make(128, 256, 64, "nf4", True, seed=8)
    x = rand_x(2, 256, torch.bfloat16, seed=8).requires_grad_()
    y = mq.gemm_4bit(x, packed, state)
    (g,) = torch.autograd.grad(y.float().sum(), x)
    w = mq.dequantize_4bit(packed, state, dtype=torch.bfloat16)
    torch.testing.assert_close(g, torch.ones(2, 128, device=DEV, dtype=torch.bfloat16) @ w, rtol=1e-2, atol=1e-2)
    fn = torch.compile(lambda v: mq.gemm_4bit(v, packed, state), fullgraph=True)
    xd = x.detach()
    torch.testing.assert_close(fn(xd), mq.gemm_4bit(xd, packed, state), rtol=0, atol=0)


def test_opcheck():
    packed, state = make(48, 128, 64, "nf4", True, seed=9)
    x = rand_x(3, 128, torch.bfloat16, seed=9)
    torch.library.opcheck(OPS.gemv_4bit.default, (x, packed, *ops._state_args(state), 0))
    torch.library.opcheck(OPS.gemm_4bit.default, (x, packed, *ops._state_args(state)))


def test_cuda_graph_replay():
    packed, state = make(256, 512, 64, "nf4", True, seed=10)
    x = rand_x(1, 512, torch.bfloat16, seed=10)
    want = mq.gemm_4bit(x, packed, state)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        mq.gemm_4bit(x, packed, state)  # warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mq.gemm_4bit(x, packed, state)
    x.copy_(rand_x(1, 512, torch.bfloat16, seed=11))
    graph.replay()
    torch.testing.assert_close(out, mq.gemm_4bit(x, packed, state), rtol=0, atol=0)
    assert not torch.equal(out, want)


@pytest.mark.parametrize("m", [1, 4])
def test_graph_with_pdl_waits_for_the_kernel_before(m):
    # Captured, the fused kernels launch with PDL (csrc/cuda/pdl.cuh): they may start while the kernel before them
    # runs and must read x only after it. Here x comes from a reduction over 16 MB (the slowest kernel before them,
    # and the last to write x), the norm (which lets a PDL successor start early) and SwiGLU, fresh each replay.
    packed, state = make(4096, 4096, 64, "nf4", True, seed=12)
    group = [make(1024, 4096, 64, "nf4", True, seed=13 + i) for i in range(2)]
    big = torch.randn(2048, m, 4096, device=DEV, dtype=torch.bfloat16)
    w = torch.rand(4096, device=DEV, dtype=torch.bfloat16) + 0.5

    def step():
        x = big.sum(0)  # (m, K)
        h = OPS.rms_norm(x, w, 1e-5)
        ys = ops.gemm_4bit_group(h, group)
        y = mq.gemm_4bit(OPS.swiglu(ys[0].repeat(1, 4), h), packed, state)
        return [mq.gemm_4bit(x, packed, state), y, *ys]

    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for seed in range(3):
        big.copy_(torch.randn(big.shape, generator=torch.Generator(device=DEV).manual_seed(seed), device=DEV))
        graph.replay()
        for got, want in zip(outs, step()):  # eager: no PDL
            assert torch.equal(got, want), seed


# -- gemm_4bit_group: sibling weights in one launch --------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("blocksize", [32, 64, 128])
@pytest.mark.parametrize("count", [2, 3])
def test_group_equals_gemm_4bit_bit_for_bit(dtype, blocksize, count):
    """Each output of one grouped launch equals its own gemm_4bit exactly (same CTA shape per member), for every
    kernel the group runs (M = 1 streaming, up to 16 the ring) and past 16 rows (one launch per member), with
    members of different N (odd, a partial tile; one much taller so the CTA shapes differ), one with float32 absmax
    among double-quantized ones, and zero rows."""
    ns = [37, 16, 2000][:count]
    k = blocksize * 5
    weights = [make(n, k, blocksize, "nf4", i != 1, seed=10 + i, dtype=dtype) for i, n in enumerate(ns)]
    for m in (0, 1, 2, 7, 8, 9, 16, 17, 33):
        x = rand_x(m, k, dtype, seed=m)
        got = ops.gemm_4bit_group(x, weights)
        assert len(got) == count
        for (packed, state), y in zip(weights, got):
            torch.testing.assert_close(y, mq.gemm_4bit(x, packed, state), rtol=0, atol=0)
        if m:
            check(got[-1], x, *weights[-1], f"group m={m}")


def test_group_leading_dims_and_errors():
    weights = [make(64, 128, 64, "nf4", True, seed=i) for i in range(2)]
    x = rand_x(3, 128, torch.bfloat16, seed=0).reshape(1, 3, 128)
    for (packed, state), y in zip(weights, ops.gemm_4bit_group(x, weights)):
        assert y.shape == (1, 3, 64)
        torch.testing.assert_close(y, mq.gemm_4bit(x, packed, state), rtol=0, atol=0)
    with pytest.raises(ValueError, match="in_features"):
        ops.gemm_4bit_group(x, [weights[0], make(64, 256, 64, "nf4", True, seed=5)])
    with pytest.raises(ValueError, match="blocksize"):
        ops.gemm_4bit_group(x, [weights[0], make(64, 128, 128, "nf4", True, seed=5)])
    with pytest.raises(ValueError, match="at least one"):
        ops.gemm_4bit_group(x, [])


def test_projection_groups_in_a_decode_step():
    """group_projections on a bf16 NF4 Llama: under no_grad one launch per sibling set (the kernel count drops by
    three a layer), logits bit for bit the ungrouped model's; with autograd on or on many rows it stays out."""
    from torch.profiler import ProfilerActivity, profile

    from minqlora.model import Llama, LlamaConfig
    from minqlora.proj_group import group_projections
    from test_lora import quantize_projections

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = quantize_projections(Llama(cfg).to(torch.bfloat16), compute_dtype=torch.bfloat16).to(DEV).eval()
    ids = torch.randint(0, 128, (1, 1), device=DEV)

    def run():
        with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
            out = model(ids)
            torch.cuda.synchronize()
        gemv = sum(1 for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA and "gemv_4bit" in e.name)
        return out, gemv

    plain, plain_launches = run()
    group_projections(model)
    grouped, grouped_launches = run()
    torch.testing.assert_close(grouped, plain, rtol=0, atol=0)
    assert plain_launches == 7 * 2 and grouped_launches == 4 * 2, (plain_launches, grouped_launches)
    q = model.model.layers[0].self_attn.q_proj
    x = torch.randn(1, 1, 256, device=DEV, dtype=torch.bfloat16)
    with torch.no_grad():
        assert q.group.applies(x)
        assert not q.group.applies(x.expand(1, 17, 256))  # more than GROUP_MAX_ROWS rows
    with torch.enable_grad():
        assert not q.group.applies(x)
    group_projections(model, False)
    assert q.group is None


# -- the decode layout (minqlora/layout.py): tiles read by both kernels ------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256])
@pytest.mark.parametrize("double_quant", [True, False])
def test_tiles_equal_rows_bit_for_bit(dtype, blocksize, double_quant):
    """The same bytes in tiles give the same y, bit for bit, as in rows, for every M through both kernels and every
    CTA shape (the kernel reads the same values in the same order; only the addresses differ), for single weights
    and groups; gemm_4bit past the fused kernel's rows (dequantize + matmul) takes tiles back to rows."""
    from minqlora import layout
    n, k = 48, 768
    quant_type = "fp4" if blocksize == 128 else "nf4"
    packed, state = make(n, k, blocksize, quant_type, double_quant, seed=blocksize, dtype=dtype)
    tiles = layout.to_tiles(packed, state.shape)
    assert tiles.shape == (3, 6, 16, 64) and torch.equal(layout.to_rows(tiles), packed)
    for m in (1, 2, 8, 9, 16, 17, 32, 33, 64):
        x = rand_x(m, k, dtype, seed=m)
        for rows in (0, 16, 32, 128):  # 32, 128: row tiles past N (3 tiles) in the last CTA read the last tile
            for kernel in KERNELS if m == 1 else ("auto",):
                want = ops.gemv_4bit(x, packed, state, rows_per_cta=rows, kernel=kernel)
                got = ops.gemv_4bit(x, tiles, state, rows_per_cta=rows, kernel=kernel)
                torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"M={m} rows={rows} {kernel}")
        torch.testing.assert_close(mq.gemm_4bit(x, tiles, state), mq.gemm_4bit(x, packed, state), rtol=0, atol=0)
    other, other_state = make(32, k, blocksize, quant_type, True, seed=3, dtype=dtype)
    group_rows = [(packed, state), (other, other_state)]
    group_tiles = [(tiles, state), (layout.to_tiles(other, other_state.shape), other_state)]
    for m in (1, 4, 16):
        x = rand_x(m, k, dtype, seed=40 + m)
        for a, b in zip(ops.gemm_4bit_group(x, group_tiles), ops.gemm_4bit_group(x, group_rows)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    big = rand_x(300, k, dtype, seed=7)
    torch.testing.assert_close(mq.gemm_4bit(big, tiles, state), mq.gemm_4bit(big, packed, state), rtol=0, atol=0)
    for out_dtype in (torch.float32, torch.float16, torch.bfloat16):  # 2- and 4-byte units of the dequantize kernel
        torch.testing.assert_close(mq.dequantize_4bit(tiles, state, out_dtype),
                                   mq.dequantize_4bit(packed, state, out_dtype), rtol=0, atol=0)


def test_tiles_at_model_shapes():
    from minqlora import layout
    for n, k in ((4096, 4096), (14336, 4096), (4096, 14336), (1024, 4096)):
        packed, state = make(n, k, 64, "nf4", True, seed=n + k)
        tiles = layout.to_tiles(packed, state.shape)
        x = rand_x(1, k, torch.bfloat16, seed=n)
        got = ops.gemv_4bit(x, tiles, state)
        check(got, x, packed, state, f"tiles {n}x{k}")
        torch.testing.assert_close(got, ops.gemv_4bit(x, packed, state), rtol=0, atol=0)


def test_linear4bit_in_tiles_saves_rows_and_decodes_the_same():
    """Linear4bit.use_tiles replaces the buffer (no second copy), keeps every output, and state_dict() still holds
    bitsandbytes' rows; a Decoder puts a model's weights in tiles and back to rows reloads cleanly."""
    from minqlora import layout
    from minqlora.linear4bit import Linear4bit
    torch.manual_seed(0)
    lin = Linear4bit.from_linear(torch.nn.Linear(256, 48, bias=False).to(DEV, torch.bfloat16))
    rows = lin.weight.clone()
    x = rand_x(3, 256, torch.bfloat16, seed=3)
    want = lin(x)
    assert lin.use_tiles() and layout.is_tiles(lin.weight) and lin.weight.numel() == rows.numel()
    torch.testing.assert_close(lin(x), want, rtol=0, atol=0)
    sd = lin.state_dict()
    assert torch.equal(sd["weight"], rows)
    assert not lin.use_tiles(False) and torch.equal(lin.weight, rows)
    lin.use_tiles()
    lin.load_state_dict(sd)
    torch.testing.assert_close(lin(x), want, rtol=0, atol=0)
    odd = Linear4bit.from_linear(torch.nn.Linear(192, 40, bias=False).to(DEV, torch.bfloat16))
    assert not odd.use_tiles()  # 40 rows, 192 columns: not a tile shape, stays in rows
