"""4-bit GEMV / small GEMM on the GPU: minqlora's gemm_4bit against bitsandbytes' matmul_4bit, bf16 F.linear and
PyTorch's own int4 kernel (torch._weight_int4pack_mm, group 64), in one process, ratios printed.

For each shape (N, K) of a Llama projection and each row count M of x:
- kernel time: the calls captured in a CUDA graph over enough weight copies that one replay's weights exceed the
  60 MB L2 several times (each call reads its weight from HBM), replayed after a warm-up; the median over replays of
  graph time / calls. This is what a graph-captured decoder sees.
- eager call time: back-to-back calls from Python with no sync, wall clock per call (what an eager caller sees:
  the larger of the host overhead and the kernel), and the host overhead alone (calls queued behind a long sleep
  kernel, so the GPU never waits for Python).
- TB/s: the bytes a call must read (packed weight + scales for 4-bit, bf16 weight for F.linear, x once) over the
  kernel time, against a device-to-device copy measured in the same run (bytes read + written).
"minqlora dq+mm" is minqlora's dequantize + F.linear (its path for many rows), for the crossover; "minqlora tiles"
is gemm_4bit on the same bytes in the decode layout (minqlora/layout.py), the layout question of issue 7.

Usage: python benchmarks/bench_gemv.py [--quick] [--shapes 14336x4096 ...] [--ms 1 16 ...] [--out results.json]
       [--png tbs.png]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import matplotlib
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

import minqlora as mq
from minqlora import layout, ops

matplotlib.use("Agg")

SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (28672, 8192), (8192, 28672)]
MS = [1, 2, 4, 8, 16, 32, 64]
L2_BYTES = 60 * 2**20
BLOCKSIZE, GROUP = 64, 64
DOUBLE_QUANT = True  # --no-double-quant: float32 absmax, for both 4-bit stacks


def copy_tbs() -> float:
    src = torch.randn(2**28, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e-3)
    return 2 * src.numel() * 4 / statistics.median(times) / 1e12


def graph_us(calls) -> float:
    """Median kernel time per call of a list of zero-argument callables, replayed as one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for fn in calls:  # warm-up (lazy init, autotuning) outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(15):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / len(calls))
    del graph
    return statistics.median(times)


def eager_us(fn, reps: int = 200) -> tuple[float, float]:
    """(wall µs per call back to back, host µs per call behind a sleeping GPU)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / reps * 1e6
    torch.cuda._sleep(200_000_000)  # ~100 ms of GPU time: the queue absorbs every call below
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    host = (time.perf_counter() - t0) / reps * 1e6
    torch.cuda.synchronize()
    return wall, host


class Weights:
    """`copies` copies of one random weight in every competitor's format (copies beyond L2 in the graph)."""

    def __init__(self, n: int, k: int, copies: int):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        packed, state = mq.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4", double_quant=DOUBLE_QUANT)
        self.mq = [(packed.clone(), state.to("cuda")) for _ in range(copies)]
        for i, (p, st) in enumerate(self.mq):  # distinct scale buffers too
            self.mq[i] = (p, dataclasses.replace(
                st, absmax=st.absmax.clone(),
                nested_absmax=None if st.nested_absmax is None else st.nested_absmax.clone(),
                nested_map=None if st.nested_map is None else st.nested_map.clone()))
        # the same bytes in the decode layout (minqlora/layout.py: 1 KB tiles read contiguously)
        self.mq_tiles = [(layout.to_tiles(p, st.shape), st) for p, st in self.mq]
        bp, bs = bnbf.quantize_4bit(w, blocksize=BLOCKSIZE, compress_statistics=DOUBLE_QUANT, quant_type="nf4")
        self.bnb = [(bp.clone(), bs) for _ in range(copies)]
        bf16_copies = max(2, -(-3 * L2_BYTES // (2 * n * k)))
        self.bf16 = [w.clone() for _ in range(bf16_copies)]
        # torch's tinygemm int4: uint8 [N, K/2] -> its packed int32 layout; bf16 scales and zeros [K/G, N, 2]
        q = torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8)
        w4 = torch._convert_weight_to_int4pack(q, 8)
        sz = torch.randn(k // GROUP, n, 2, device="cuda", dtype=torch.bfloat16) * 0.01
        self.int4 = [(w4.clone(), sz.clone()) for _ in range(copies)]
        self.bytes_4bit = packed.numel() + state.absmax.numel() * state.absmax.element_size() + (
            0 if state.nested_absmax is None else 4 * state.nested_absmax.numel())
        self.bytes_int4 = n * k // 2 + sz.numel() * 2
        self.bytes_bf16 = 2 * n * k


def run_shape(n: int, k: int, ms, tbs: float) -> list[dict]:
    copies = max(2, -(-3 * L2_BYTES // (n * k // 2)))
    W = Weights(n, k, copies)
    rows = []
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        xb = 2 * m * k
        methods = {
            "minqlora": ([lambda p=p, s=s: mq.gemm_4bit(x, p, s) for p, s in W.mq], W.bytes_4bit),
            "minqlora tiles": ([lambda p=p, s=s: mq.gemm_4bit(x, p, s) for p, s in W.mq_tiles], W.bytes_4bit),
            "minqlora dq+mm": ([lambda p=p, s=s: F.linear(x, mq.dequantize_4bit(p, s)) for p, s in W.mq],
                               W.bytes_4bit),
            "bitsandbytes": ([lambda p=p, s=s: bnb.matmul_4bit(x, p.t(), quant_state=s) for p, s in W.bnb],
                             W.bytes_4bit),
            "bf16": ([lambda w=w: F.linear(x, w) for w in W.bf16], W.bytes_bf16),
            "torch int4": ([lambda w=w, z=z: torch._weight_int4pack_mm(x, w, GROUP, z) for w, z in W.int4],
                           W.bytes_int4),
        }
        row = {"N": n, "K": k, "M": m}
        for name, (calls, nbytes) in methods.items():
            us = graph_us(calls)
            wall, host = eager_us(calls[0])
            row[name] = {"graph_us": us, "eager_us": wall, "host_us": host, "TB/s": (nbytes + xb) / us / 1e6}
        # the fused kernels' CTA shapes, for the launcher's choice; at one token also the register-ring kernel, which
        # the streaming one replaces there
        # 112 (7 row tiles, one warp idle) gives grids that fill 132 SMs x 2 more evenly for 896 / 1792 row tiles
        variants = [("auto", r, "") for r in (16, 32, 64, 128)]
        variants += [("auto", r, "tiles ") for r in (16, 32, 48, 64, 112, 128)]
        variants += [("ring", r, "") for r in (0, 16, 64)] if m == 1 else []
        # the streaming kernel with the scales copied per chunk (the default copies them by windows; gemv_stream.cuh)
        variants += [("stream", r, lay) for r in (0, 112) for lay in ("", "tiles ")] if m == 1 else []
        for kernel, r, lay in variants if m <= 32 else ():
            calls = [lambda p=p, s=s, r=r, kn=kernel: ops.gemv_4bit(x, p, s, rows_per_cta=r, kernel=kn)
                     for p, s in (W.mq_tiles if lay else W.mq)]
            name = f"fused {lay}rows/CTA {r}" if kernel == "auto" else f"{kernel} {lay}rows/CTA {r or 'auto'}"
            row[name] = {"graph_us": graph_us(calls)}
        rows.append(row)
        print(f"{n}x{k} M={m}: " + ", ".join(f"{k_}: {v['graph_us']:.2f} us" for k_, v in row.items()
                                             if isinstance(v, dict)), flush=True)
    del W
    torch.cuda.empty_cache()
    return rows


def overhead() -> dict:
    """Host µs per call of gemm_4bit's layers at M=1 (4096x4096): the public wrapper, the raw op with prebuilt
    arguments, the raw op below the autograd key, the fused op alone, and bf16 F.linear for scale."""
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    packed, state = mq.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4", double_quant=True)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    args = (x, packed, *ops._state_args(state))
    raw = torch.ops.minqlora.gemm_4bit.default

    def below_autograd():
        with torch._C._AutoDispatchBelowAutograd():
            return raw(*args)

    cases = {"mq.gemm_4bit": lambda: mq.gemm_4bit(x, packed, state), "raw op": lambda: raw(*args),
             "raw op below autograd": below_autograd,
             "raw gemv_4bit op": lambda: torch.ops.minqlora.gemv_4bit.default(*args, 0),
             "F.linear bf16": lambda: F.linear(x, w), "x.mul(2) (one ATen kernel)": lambda: x.mul(2)}
    # 300 calls: well under the ~1,000 launches the CUDA queue holds, so none waits behind the sleep kernel
    res = {name: eager_us(fn, reps=300)[1] for name, fn in cases.items()}
    with torch.inference_mode():
        res["mq.gemm_4bit (inference_mode)"] = eager_us(lambda: mq.gemm_4bit(x, packed, state), reps=300)[1]
    return res


def print_table(rows: list[dict], tbs: float) -> None:
    fmt = "NF4+DQ" if DOUBLE_QUANT else "NF4 (float32 absmax)"
    print(f"\n==== gemm_4bit, {fmt} blocksize 64, bf16 x; kernel time (CUDA graph, weights beyond L2); copy {tbs:.2f} "
          f"TB/s ====")
    hdr = (f"{'N x K':>12} {'M':>3} | {'minqlora':>9} {'TB/s':>5} {'%copy':>5} | {'bnb':>8} {'bf16':>8} {'int4':>8} "
           f"{'dq+mm':>8} | {'x bnb':>6} {'x bf16':>6} {'x int4':>6} | {'eager':>6} {'host':>5} | {'tiles':>8} "
           f"{'%copy':>5} {'x rows':>6}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        q, t = r["minqlora"], r["minqlora tiles"]
        print(f"{r['N']:>6}x{r['K']:<5} {r['M']:>3} | {q['graph_us']:>8.2f}u {q['TB/s']:>5.2f} "
              f"{100 * q['TB/s'] / tbs:>4.0f}% | {r['bitsandbytes']['graph_us']:>7.2f}u {r['bf16']['graph_us']:>7.2f}u "
              f"{r['torch int4']['graph_us']:>7.2f}u {r['minqlora dq+mm']['graph_us']:>7.2f}u | "
              f"{r['bitsandbytes']['graph_us'] / q['graph_us']:>5.2f}x {r['bf16']['graph_us'] / q['graph_us']:>5.2f}x "
              f"{r['torch int4']['graph_us'] / q['graph_us']:>5.2f}x | {q['eager_us']:>5.1f}u {q['host_us']:>4.1f}u | "
              f"{t['graph_us']:>7.2f}u {100 * t['TB/s'] / tbs:>4.0f}% {q['graph_us'] / t['graph_us']:>5.2f}x")


def plot(rows: list[dict], tbs: float, path: str) -> None:
    shapes = sorted({(r["N"], r["K"]) for r in rows})
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), sharey=True)
    for ax, (n, k) in zip(axes.flat, shapes):
        sub = [r for r in rows if (r["N"], r["K"]) == (n, k)]
        for name in ("minqlora", "minqlora tiles", "bitsandbytes", "bf16", "torch int4"):
            ax.plot([r["M"] for r in sub], [r[name]["TB/s"] for r in sub], marker="o", label=name)
        ax.axhline(tbs, color="gray", ls="--", label="copy")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{n} x {k}")
        ax.set_xlabel("M (rows of x)")
    axes[0, 0].set_ylabel("TB/s of bytes read")
    axes[0, 0].legend()
    fig.suptitle("4-bit GEMV / small GEMM on one GPU (kernel time, weights beyond L2)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="three shapes, M in 1, 16, 32")
    ap.add_argument("--shapes", nargs="+", metavar="NxK", help="only these weight shapes (default: all of SHAPES)")
    ap.add_argument("--ms", nargs="+", type=int, metavar="M", help="only these row counts of x")
    ap.add_argument("--out", help="write every figure as JSON here")
    ap.add_argument("--png", help="write the TB/s-vs-M plot here")
    ap.add_argument("--no-double-quant", action="store_true",
                    help="float32 absmax instead of double quantization, in both 4-bit stacks")
    args = ap.parse_args()
    global DOUBLE_QUANT
    DOUBLE_QUANT = not args.no_double_quant
    torch.manual_seed(0)
    shapes = SHAPES[:1] + SHAPES[2:4] if args.quick else SHAPES
    if args.shapes:
        try:
            shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
        except ValueError:
            ap.error(f"--shapes takes NxK such as 14336x4096, got {args.shapes}")
        if any(len(s) != 2 or min(s) < 1 for s in shapes):
            ap.error(f"--shapes takes NxK with N, K >= 1, got {args.shapes}")
    ms = args.ms or ([1, 16, 32] if args.quick else MS)
    if min(ms) < 1:
        ap.error(f"--ms takes row counts >= 1, got {ms}")
    tbs = copy_tbs()
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} bitsandbytes {bnb.__version__}; "
          f"copy {tbs:.2f} TB/s", flush=True)
    rows = [r for n, k in shapes for r in run_shape(n, k, ms, tbs)]
    host = overhead()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"copy_tbs": tbs, "rows": rows, "host_overhead_us": host}, f, indent=1)
    if args.png:
        plot(rows, tbs, args.png)
    print_table(rows, tbs)
    print("\nhost overhead per call at M=1 (µs): " + ", ".join(f"{k}: {v:.1f}" for k, v in host.items()))


if __name__ == "__main__":
    main()
