"""PagedAdamW.step over many small parameters (LoRA's case: 7 projections x 2 matrices x layers), against
torch.optim.AdamW(foreach=True) in the same process: milliseconds per step, median of --steps after one.

    .venv/bin/python benchmarks/bench_optim.py                          # 448 tensors of 16 x 64 on the CPU
    python3 benchmarks/bench_optim.py --device cuda --shape 16 4096     # on a GPU (synchronised per step)

The Llama-3-8B shape with r=16 on all seven projections has 448 LoRA tensors of 16 x 4096 to 14336 x 16.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from minqlora.optim import PagedAdamW


def time_steps(opt, steps: int, device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    opt.step()  # allocates the state
    sync()
    times = []
    for _ in range(steps):
        tick = time.perf_counter()
        opt.step()
        sync()  # SYNC: the step's time
        times.append(time.perf_counter() - tick)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tensors", type=int, default=448, help="number of parameters (default 448)")
    ap.add_argument("--shape", type=int, nargs="+", default=[16, 64], help="shape of each (default 16 64)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads on a CPU (default 1)")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    params = [torch.nn.Parameter(torch.randn(args.shape, device=device)) for _ in range(args.tensors)]
    for p in params:
        p.grad = torch.randn_like(p)
    ours = time_steps(PagedAdamW(params, lr=1e-3), args.steps, device)
    theirs = time_steps(torch.optim.AdamW(params, lr=1e-3, foreach=True), args.steps, device)
    print(f"{args.tensors} tensors of {tuple(args.shape)} on {device}, torch {torch.__version__}: PagedAdamW "
          f"{ours * 1e3:.2f} ms/step, torch AdamW(foreach) {theirs * 1e3:.2f} ms/step ({theirs / ours:.2f}x)")


if __name__ == "__main__":
    main()
