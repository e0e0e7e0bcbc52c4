"""A frozen 4-bit linear layer in training: forward + grad-input backward at many rows (issue 8's M = 4096 figure).

One QLoRA projection costs, per step, a forward y = x·Wᵀ and a grad-input dx = dy·W (the base weight is frozen: no
dW). This times exactly that pair, y = layer(x) and torch.autograd.grad(y, x, dy), for
- minqlora Linear4bit (NF4 + double quant, blocksize 64, bf16 compute): gemm_4bit / gemm_4bit_grad_input, which at
  many rows dequantize the weight to bf16 and call cuBLAS (csrc/gemm.cpp);
- bitsandbytes Linear4bit (NF4 + compress_statistics, blocksize 64): its MatMul4Bit, the same strategy;
- bf16 F.linear with the weight frozen: the floor both aim at (two GEMMs of 2·M·N·K FLOPs each).
All three in one process on the same GPU, CUDA events around a loop over enough weight copies that each pass misses
the 60 MB L2, the median of --runs loops after a warm-up. Printed: µs per forward and per forward + grad-input,
TFLOP/s, and each 4-bit layer's time as a multiple of bf16's (issue 8 asks minqlora for <= 1.15x at M = 4096).

    python3 benchmarks/bench_linear.py [--rows 4096] [--shapes 4096x4096 14336x4096 4096x14336] [--out f.json]
    .venv/bin/python benchmarks/bench_linear.py --cpu --rows 64 --shapes 256x256 --runs 2   # a CPU check
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import bitsandbytes as bnb
import torch
import torch.nn.functional as F
from torch import nn

from minqlora.linear4bit import Linear4bit

L2_BYTES = 60 * 2**20
SHAPES = ["4096x4096", "14336x4096", "4096x14336"]  # N x K: q/o, gate/up, down of the Llama-3-8B shape


def bnb_layer(w: torch.Tensor) -> nn.Module:
    n, k = w.shape
    q = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                          quant_type="nf4", device="meta")
    # Params4bit quantizes when moved to a device (bitsandbytes' own loading path).
    q.weight = bnb.nn.Params4bit(w.cpu(), requires_grad=False, compress_statistics=True, quant_type="nf4",
                                 blocksize=64, module=q).to(w.device)
    return q


def mq_layer(w: torch.Tensor) -> nn.Module:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(w, requires_grad=False)
    return Linear4bit.from_linear(lin, compute_dtype=torch.bfloat16)


class Bf16Linear(nn.Module):
    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = w  # frozen: not a parameter, so autograd computes grad-input only

    def forward(self, x):
        return F.linear(x, self.w)


def layer_bytes(m: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*m.parameters(), *m.buffers(), *vars(m).values())
               if isinstance(t, torch.Tensor))


def time_loop(fn, device: torch.device, runs: int) -> float:
    """Median seconds of fn() (one pass over every weight copy), after two warm-up passes."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda._sleep(50_000_000)  # the GPU waits while Python queues the loop: events time kernels only
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e-3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_shape(n: int, k: int, rows: int, device: torch.device, runs: int) -> list[dict]:
    gen = torch.Generator(device="cpu").manual_seed(n * 31 + k)
    make = {"bf16 F.linear": Bf16Linear, "minqlora Linear4bit": mq_layer, "bitsandbytes Linear4bit": bnb_layer}
    nf4_bytes = n * k // 2
    copies = max(2, math.ceil(3 * L2_BYTES / nf4_bytes)) if device.type == "cuda" else 1
    x = (torch.randn(rows, k, generator=gen) * 0.5).to(device, torch.bfloat16).requires_grad_(True)
    dy = torch.randn(rows, n, generator=gen).to(device, torch.bfloat16)
    flops = 2 * rows * n * k
    out = []
    for name, ctor in make.items():
        layers = [ctor((torch.randn(n, k, generator=gen) * 0.02).to(device, torch.bfloat16)) for _ in range(copies)]

        def forward():
            with torch.no_grad():
                for m in layers:
                    m(x)

        def forward_backward():
            for m in layers:
                torch.autograd.grad(m(x), x, dy)

        fwd = time_loop(forward, device, runs) / copies
        both = time_loop(forward_backward, device, runs) / copies
        out.append(dict(shape=f"{n}x{k}", rows=rows, stack=name, copies=copies, bytes=layer_bytes(layers[0]),
                        forward_us=fwd * 1e6, fwd_grad_input_us=both * 1e6, tflops=2 * flops / both / 1e12))
        print(f"  {n}x{k} M={rows} {name:24s} forward {fwd * 1e6:9.1f} us, forward + grad-input {both * 1e6:9.1f} us "
              f"({2 * flops / both / 1e12:6.1f} TFLOP/s), {copies} copies", flush=True)
        del layers
    base = out[0]
    for r in out:
        r["x_bf16_forward"] = r["forward_us"] / base["forward_us"]
        r["x_bf16"] = r["fwd_grad_input_us"] / base["fwd_grad_input_us"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4096, help="rows of x, M (default 4096)")
    ap.add_argument("--shapes", nargs="+", default=SHAPES, help="weights N x K (default: the 8B projections)")
    ap.add_argument("--runs", type=int, default=10, help="timed loops per case, median reported (default 10)")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (a check of the script; wall time)")
    ap.add_argument("--out", help="also write the results as JSON here")
    args = ap.parse_args()
    device = torch.device("cpu" if args.cpu else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_linear.py needs a CUDA GPU (or --cpu)")
    shapes = []
    for s in args.shapes:
        try:
            n, k = (int(v) for v in s.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--shapes: {s!r} is not NxK (e.g. 4096x14336)") from None
        if k % 64:
            raise SystemExit(f"--shapes: K of {s} must be a multiple of the blocksize 64")
        shapes.append((n, k))
    rows = [r for n, k in shapes for r in run_shape(n, k, args.rows, device, args.runs)]

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\nFrozen linear layer, forward + grad-input, M = {args.rows}, bf16 activations; {gpu}, torch "
          f"{torch.__version__}, bitsandbytes {bnb.__version__}. Time as a multiple of bf16 F.linear's "
          f"(lower is better).")
    print("| N×K | stack | forward µs | fwd + grad-input µs | TFLOP/s | × bf16 forward | × bf16 fwd + grad-input |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['shape']} | {r['stack']} | {r['forward_us']:.1f} | {r['fwd_grad_input_us']:.1f} | "
              f"{r['tflops']:.1f} | {r['x_bf16_forward']:.3f}× | {r['x_bf16']:.3f}× |")
    if args.out:
        Path(args.out).write_text(json.dumps({"env": f"{gpu}, torch {torch.__version__}", "rows": rows}, indent=2)
                                  + "\n")


if __name__ == "__main__":
    main()
