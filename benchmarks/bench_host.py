"""Host time of a QLoRA training step per decoder layer: the Python and dispatcher work around the kernels.

On the H200 a Llama-3-8B-shaped step at 2 × 1024 tokens (and a 70B shape at 1 × 512) is host-bound: the GPU waits
while Python issues each layer's small ops (issue 8). This measures that cost on the CPU, where bench_step.py's tiny
shape (width 64) makes the kernels negligible, so the time is host overhead: the step of a bench_step configuration
(bench_step.minqlora_model / minqlora_step, the same LoRA r=16 on all projections, bf16 autocast, paged AdamW) on
models of --layers and of --base-layers decoder layers, single-threaded, CPU time (time.process_time) per step,
median of --steps after --warmup, the two models' steps taken in turn. The per-layer figure is the difference of
the two medians over the difference of the layer counts, so the embedding, loss and optimizer step cancel out.

    python3 benchmarks/bench_host.py                                   # full+offload, full, none
    python3 benchmarks/bench_host.py --configs full+offload --profile 30   # cProfile of the deeper model's steps
    python3 benchmarks/bench_host.py --configs full+offload --ops 25       # aten ops a layer, by name

--ops counts the aten ops one step dispatches (a TorchDispatchMode) on both models and prints the difference per
layer: on a GPU each is a launch or at least a dispatch, so the count is what a host-bound step pays for. Under the
mode fused.call runs the spec functions (RMSNorm, RoPE, SwiGLU as several ops each, as on the CPU anyway).

Caveat: on the CPU fused.py's RMSNorm / RoPE / SwiGLU run as several eager ops each; on the GPU each is one extension
call, so this overstates their share and the other code's share is what transfers.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time
from collections import Counter

import torch

from torch.utils._python_dispatch import TorchDispatchMode

import bench_step  # benchmarks/
from minqlora.shapes import shape_config


def build(layers: int, cfg: bench_step.StepConfig, batch_shape):
    """(step, free) of bench_step's step of a `layers`-layer tiny model on the CPU under `cfg`."""
    config = shape_config("tiny", num_hidden_layers=layers)
    device = torch.device("cpu")
    model = bench_step.minqlora_model(config, device)
    batch = bench_step.random_batch(config.vocab_size, *batch_shape, seed=0)
    return bench_step.minqlora_step(model, batch, device, cfg)


def cpu_seconds(step) -> float:
    start = time.process_time()
    step()
    return time.process_time() - start


class OpCounter(TorchDispatchMode):
    """Counts the aten (and minqlora) ops dispatched while it is active, by name."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def ops_per_layer(cfg: bench_step.StepConfig, layers: tuple[int, int], batch_shape, warmup: int) -> Counter:
    """Ops of one step of the deeper model less those of the shallower, per layer of the difference."""
    counts = []
    for n in layers:
        step, free = build(n, cfg, batch_shape)
        for _ in range(warmup):
            step()
        with OpCounter() as counter:
            step()
        counts.append(counter.counts)
        free()
    per = Counter()
    for name in counts[0].keys() | counts[1].keys():
        per[name] = (counts[1][name] - counts[0][name]) / (layers[1] - layers[0])
    return per


def measure(cfg: bench_step.StepConfig, layers: tuple[int, ...], batch_shape, warmup: int, steps: int,
            profile: int = 0) -> list[float]:
    """Median CPU seconds per step of each model in `layers`, their steps taken in turn (a drift of the shared
    machine's speed then hits every model alike); with profile > 0, then cProfile over `steps` steps of the last
    model, printing the `profile` functions of most own time."""
    built = [build(n, cfg, batch_shape) for n in layers]
    for step, _ in built:
        for _ in range(warmup):
            step()
    times = [[] for _ in built]
    for _ in range(steps):
        for (step, _), t in zip(built, times):
            t.append(cpu_seconds(step))
    if profile:
        prof = cProfile.Profile()
        prof.runcall(lambda: [built[-1][0]() for _ in range(steps)])
        print(f"\n==== cProfile: {cfg.name}, {layers[-1]} layers, {steps} steps ====")
        pstats.Stats(prof).sort_stats("tottime").print_stats(profile)
    for _, free in built:
        free()
    return [statistics.median(t) for t in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["full+offload", "full", "none"],
                    choices=[c.name for c in bench_step.CONFIGS], help="bench_step configurations")
    ap.add_argument("--layers", type=int, default=8, help="decoder layers of the measured model")
    ap.add_argument("--base-layers", type=int, default=2, help="decoder layers of the model subtracted from it")
    ap.add_argument("--batch", type=bench_step.parse_batch, default=(1, 16), help="BATCHxSEQ_LEN (default 1x16)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    ap.add_argument("--steps", type=int, default=40, help="timed steps (median reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: no pool hand-offs in the time)")
    ap.add_argument("--profile", type=int, default=0, metavar="ROWS",
                    help="also cProfile the --layers model's steps, printing the ROWS functions of most own time")
    ap.add_argument("--ops", type=int, default=0, metavar="ROWS",
                    help="instead of timing, count the ops a step dispatches per layer; print the ROWS most frequent")
    args = ap.parse_args()
    if not 0 <= args.base_layers < args.layers:
        ap.error("need 0 <= --base-layers < --layers")
    torch.set_num_threads(args.threads)
    what = "aten ops per step" if args.ops else f"CPU ms, median of {args.steps} steps after {args.warmup}"
    print(f"host time per decoder layer: tiny shape, batch {args.batch[0]} x {args.batch[1]}, torch "
          f"{torch.__version__}, {args.threads} thread(s); {what}")
    for name in args.configs:
        cfg = next(c for c in bench_step.CONFIGS if c.name == name)
        if args.ops:
            per = ops_per_layer(cfg, (args.base_layers, args.layers), args.batch, max(args.warmup, 1))
            print(f"  {name}: {sum(per.values()):.1f} ops a layer")
            for op, n in per.most_common(args.ops):
                print(f"    {n:7.1f}  {op}")
            continue
        base, deep = measure(cfg, (args.base_layers, args.layers), args.batch, args.warmup, args.steps, args.profile)
        per_layer = (deep - base) / (args.layers - args.base_layers)
        print(f"  {name:24s} {args.layers} layers {deep * 1e3:7.2f} ms  {args.base_layers} layers {base * 1e3:7.2f} ms"
              f"  per layer {per_layer * 1e3:6.3f} ms", flush=True)


if __name__ == "__main__":
    main()
