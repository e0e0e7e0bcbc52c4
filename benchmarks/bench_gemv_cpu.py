"""The CPU few-row gemm_4bit (csrc/cpu/gemv.cpp) against what it replaces and against bitsandbytes, in one process.

Rows: minqlora gemm_4bit (the fused loop up to 8 rows of x), the composite path it replaces at those rows
(F.linear on mq.dequantize_4bit, what gemm_4bit did before), bitsandbytes' CPU matmul_4bit on the same weight, and
F.linear on a float weight (8x the memory; the floor a 16/32-bit model pays). NF4 + double quantization,
blocksize 64, SmolLM2-135M's projection shapes and one Llama-8B shape; CPU time (time.process_time) of one thread,
median of --runs after a warm-up; ratios to the composite path and to bitsandbytes printed.

    .venv/bin/python benchmarks/bench_gemv_cpu.py
    MINQLORA_DISABLE_AVX2=1 .venv/bin/python benchmarks/bench_gemv_cpu.py   # the portable loop
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import minqlora as mq

SHAPES = [(1536, 576), (576, 1536), (576, 576), (4096, 4096)]  # SmolLM2-135M MLP / attention; Llama-8B q_proj


def cpu_us(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        t = time.process_time()
        fn()
        times.append((time.process_time() - t) * 1e6)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=11, help="timed calls per cell, median reported (default 11)")
    ap.add_argument("--ms", nargs="+", type=int, default=[1, 4, 8, 16], help="rows of x (default 1 4 8 16)")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
    except ImportError:
        bnb = None
    print(f"torch {torch.__version__}, bitsandbytes {bnb.__version__ if bnb else 'not installed'}, one thread, "
          f"CPU µs, median of {args.runs}")
    print(f"{'N x K':>11} {'dtype':>8} {'M':>3} | {'minqlora':>9} {'dq+mm':>9} {'bnb':>9} {'float':>9} | "
          f"{'x dq+mm':>7} {'x bnb':>6}")
    for n, k in SHAPES:
        w = torch.randn(n, k) * 0.02
        packed, state = mq.quantize_4bit(w, blocksize=64, quant_type="nf4", double_quant=True)
        for name in args.dtypes:
            dtype = getattr(torch, name)
            wf = w.to(dtype)
            bw = bnbf.quantize_4bit(wf, blocksize=64, compress_statistics=True, quant_type="nf4") if bnb else None
            for m in args.ms:
                x = torch.randn(m, k).to(dtype)
                ours = cpu_us(lambda: mq.gemm_4bit(x, packed, state), args.runs)
                comp = cpu_us(lambda: F.linear(x, mq.dequantize_4bit(packed, state, dtype)), args.runs)
                theirs = cpu_us(lambda: bnb.matmul_4bit(x, bw[0].t(), quant_state=bw[1]), args.runs) if bnb else 0.0
                flt = cpu_us(lambda: F.linear(x, wf), args.runs)
                print(f"{n:>5}x{k:<5} {name:>8} {m:>3} | {ours:>9.0f} {comp:>9.0f} {theirs:>9.0f} {flt:>9.0f} | "
                      f"{comp / ours:>6.2f}x {theirs / ours if bnb else 0:>5.2f}x", flush=True)


if __name__ == "__main__":
    main()
