"""Quantize and dequantize throughput: minqlora against bitsandbytes 0.50.2, in one process, printed side by side.

GPU (default): NF4 + double quantization of bf16 weights, 4096x4096, 14336x4096, 4096x14336, 1024x4096 and a
1 GiB tensor (32768x16384), plus the same without double quantization. Timed with CUDA events after a warm-up; the
median of 200 runs per case. A long sleep kernel heads each batch of 50 runs so the GPU never waits for Python: the
events time the kernels, not the launch overhead. Inputs rotate through enough copies, and enough outputs stay alive,
that each run's working set misses the 60 MB L2. The ceiling is a device-to-device copy measured in the same run.

What is timed is the raw op path: quantize = ops.quantize_4bit_raw, absmax.mean(), ops.quantize_blockwise_8bit
(the public mq.quantize_4bit adds a host sync for its NaN check and for the offset); dequantize = mq.dequantize_4bit
(one kernel; bitsandbytes runs three: 8-bit decode of the absmax, + offset, 4-bit decode).

Bytes are counted honestly as each input read once plus each output written once: the bf16 weight (2 B/element),
the packed nibbles (0.5 B), the 8-bit absmax codes (1 B per block), the float32 second-level absmax and the map.
Intermediates (the float32 absmax between the steps) are not counted; bitsandbytes' 1.06 TB/s in DESIGN.md §9 is
counted the same way.

--cpu: 4096x4096 bf16 on the CPU, quantize NF4+DQ and dequantize, against bitsandbytes' CPU path.

Usage: python benchmarks/bench_quant.py [--cpu] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import bitsandbytes
import bitsandbytes.functional as bnbf
import torch

import minqlora as mq
from minqlora import ops, quant

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (1024, 4096), (32768, 16384)]
BLOCKSIZE = 64
L2_BYTES = 60 * 2**20
ITERS, BATCH, WARMUP = 200, 50, 20


# ---- timing ------------------------------------------------------------------------------------------------------

def time_gpu(fn, inputs, keep: int, headed: bool = True) -> float:
    """Median µs of fn(inputs[i % len(inputs)]). The last `keep` results stay alive so the allocator hands out
    distinct output buffers (fresh memory, not L2-resident lines). headed: a sleep kernel heads each batch, so the
    events time the GPU work alone; otherwise calls go back to back and a call costs at least its Python and launch
    overhead (what a caller sees, and how DESIGN.md §9's 139 µs for bitsandbytes was taken)."""
    ring = [None] * keep
    for i in range(WARMUP):
        ring[i % keep] = fn(inputs[i % len(inputs)])
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(BATCH)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(BATCH)]
    times = []
    for r in range(ITERS // BATCH):
        if headed:
            torch.cuda._sleep(20_000_000)  # ~10 ms of GPU time while Python queues the batch
        for i in range(BATCH):
            j = r * BATCH + i
            starts[i].record()
            ring[j % keep] = fn(inputs[j % len(inputs)])
            ends[i].record()
        torch.cuda.synchronize()
        times += [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Device-to-device copy of 1 GiB: bytes read + bytes written over the median time, GB/s."""
    src = torch.randn(2**28, device="cuda")  # 1 GiB of float32
    dst = torch.empty_like(src)
    us = time_gpu(lambda s: dst.copy_(s), [src], keep=1)
    return 2 * src.numel() * 4 / us / 1e3


# ---- byte counts ---------------------------------------------------------------------------------------------------

def state_bytes(n: int, nested: bool) -> int:
    nb = -(-n // BLOCKSIZE)
    return nb + 4 * -(-nb // 256) + 1024 if nested else 4 * nb


def quant_bytes(n: int, nested: bool) -> int:   # read the bf16 weight, write packed + state
    return 2 * n + n // 2 + state_bytes(n, nested)


def dequant_bytes(n: int, nested: bool) -> int:  # read packed + state, write the bf16 weight
    return n // 2 + state_bytes(n, nested) + 2 * n


# ---- the two implementations -------------------------------------------------------------------------------------

def mq_quantize(nested: bool, device: str = "cuda"):
    dyn = quant.DYNAMIC_SIGNED.to(device)

    def run(x):
        packed, absmax = ops.quantize_4bit_raw(x, BLOCKSIZE, "nf4")
        if not nested:
            return packed, absmax
        offset = absmax.mean()  # as mq.quantize_4bit, minus its host syncs
        codes, absmax2 = ops.quantize_blockwise_8bit(absmax - offset, dyn, 256)
        return packed, codes, absmax2, offset
    return run


def bnb_quantize(nested: bool):
    return lambda x: bnbf.quantize_4bit(x, blocksize=BLOCKSIZE, compress_statistics=nested, quant_type="nf4")


def gpu_bench(shapes) -> dict:
    torch.manual_seed(0)
    copy = copy_bandwidth()
    rows = []
    for shape in shapes:
        n = math.prod(shape)
        # copies of the weight so that one pass over them is at least 3x the L2
        copies = max(2, math.ceil(3 * L2_BYTES / (2.5 * n)))
        weights = [torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        for nested in (True, False):
            mq_q = [mq.quantize_4bit(w, BLOCKSIZE, "nf4", double_quant=nested) for w in weights]
            bnb_q = [bnbf.quantize_4bit(w, blocksize=BLOCKSIZE, compress_statistics=nested, quant_type="nf4")
                     for w in weights]
            # same bytes and values as bitsandbytes (tests/cuda checks this in depth; here it is reported)
            same = all(torch.equal(a[0], b[0]) for a, b in zip(mq_q, bnb_q)) and torch.equal(
                mq.dequantize_4bit(*mq_q[0]), bnbf.dequantize_4bit(*bnb_q[0]))
            cases = [
                ("quantize", quant_bytes(n, nested), mq_quantize(nested), bnb_quantize(nested), weights, weights),
                ("dequantize", dequant_bytes(n, nested), lambda q: mq.dequantize_4bit(*q),
                 lambda q: bnbf.dequantize_4bit(*q), mq_q, bnb_q),
            ]
            for op, nbytes, f_mq, f_bnb, in_mq, in_bnb in cases:
                t_mq = time_gpu(f_mq, in_mq, keep=copies)
                t_bnb = time_gpu(f_bnb, in_bnb, keep=copies)
                c_mq = time_gpu(f_mq, in_mq, keep=copies, headed=False)
                c_bnb = time_gpu(f_bnb, in_bnb, keep=copies, headed=False)
                rows.append(dict(op=op, dq=nested, shape=list(shape), bytes=nbytes, identical=same,
                                 minqlora_us=t_mq, bnb_us=t_bnb, minqlora_call_us=c_mq, bnb_call_us=c_bnb,
                                 call_speedup=c_bnb / c_mq,
                                 minqlora_gbs=nbytes / t_mq / 1e3, bnb_gbs=nbytes / t_bnb / 1e3,
                                 pct_copy=100 * nbytes / t_mq / 1e3 / copy, speedup=t_bnb / t_mq))
            del mq_q, bnb_q
        del weights
        torch.cuda.empty_cache()
    return dict(device=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda,
                bitsandbytes=bitsandbytes.__version__, copy_gbs=copy, blocksize=BLOCKSIZE, rows=rows)


def print_gpu(res: dict) -> None:
    print(f"\n{res['device']}, torch {res['torch']} (CUDA {res['cuda']}), bitsandbytes {res['bitsandbytes']}; "
          f"NF4, blocksize {res['blocksize']}, bf16; copy {res['copy_gbs'] / 1e3:.2f} TB/s (read+write)")
    print("kernel: GPU time of the op (sleep-headed batches); call: back-to-back calls, launch overhead included")
    print(f"{'op':<11}{'DQ':<4}{'shape':>12} | {'kernel µs: mq':>13}{'bnb':>8}{'ratio':>7} | {'call µs: mq':>11}"
          f"{'bnb':>8}{'ratio':>7} | {'mq GB/s':>7}{'% copy':>7}{'bnb GB/s':>9}")
    for r in res["rows"]:
        shape = "x".join(map(str, r["shape"]))
        print(f"{r['op']:<11}{'yes' if r['dq'] else 'no':<4}{shape:>12} | {r['minqlora_us']:>13.1f}{r['bnb_us']:>8.1f}"
              f"{r['speedup']:>6.2f}x | {r['minqlora_call_us']:>11.1f}{r['bnb_call_us']:>8.1f}{r['call_speedup']:>6.2f}x"
              f" | {r['minqlora_gbs']:>7.0f}{r['pct_copy']:>6.0f}%{r['bnb_gbs']:>9.0f}"
              + ("" if r["identical"] else "  OUTPUT DIFFERS FROM BITSANDBYTES"))


# ---- CPU -----------------------------------------------------------------------------------------------------------

def time_cpu(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def cpu_bench() -> dict:
    x = torch.randn(4096, 4096).to(torch.bfloat16)
    q_mq = mq_quantize(True, "cpu")
    packed, state = mq.quantize_4bit(x, BLOCKSIZE, "nf4", double_quant=True)
    p_b, qs = bnbf.quantize_4bit(x, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4")
    rows = [
        dict(op="quantize", minqlora_ms=time_cpu(lambda: q_mq(x), 7),
             bnb_ms=time_cpu(lambda: bnbf.quantize_4bit(x, blocksize=BLOCKSIZE, compress_statistics=True,
                                                        quant_type="nf4"), 3)),
        dict(op="dequantize", minqlora_ms=time_cpu(lambda: mq.dequantize_4bit(packed, state), 20),
             bnb_ms=time_cpu(lambda: bnbf.dequantize_4bit(p_b, qs), 20)),
    ]
    for r in rows:
        r["speedup"] = r["bnb_ms"] / r["minqlora_ms"]
    return dict(device="cpu", threads=torch.get_num_threads(), torch=torch.__version__,
                bitsandbytes=bitsandbytes.__version__, shape=[4096, 4096], rows=rows)


def print_cpu(res: dict) -> None:
    print(f"\nCPU, {res['threads']} threads, torch {res['torch']}, bitsandbytes {res['bitsandbytes']}; "
          f"4096x4096 bf16, NF4 + double quant, blocksize {BLOCKSIZE}")
    print(f"{'op':<12}{'minqlora ms':>12}{'bnb ms':>10}{'speedup':>9}")
    for r in res["rows"]:
        print(f"{r['op']:<12}{r['minqlora_ms']:>12.2f}{r['bnb_ms']:>10.2f}{r['speedup']:>8.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="measure on the CPU instead (4096x4096 bf16)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    if args.cpu:
        res = cpu_bench()
        print_cpu(res)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU: use --cpu")
        res = gpu_bench(SHAPES)
        print_gpu(res)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
