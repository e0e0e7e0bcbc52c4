"""The longest sequence (batch 1) whose QLoRA step completes under a GPU memory cap, and the tok/s at that length.

The cap is torch.cuda.set_per_process_memory_fraction(cap GiB / the GPU's memory): torch's allocator refuses
anything past it with an OutOfMemoryError, which is caught. (Outside the cap, as on a real card of that size they
would sit in host memory or be paged: the CUDA context, the pinned host copies of offloaded activations, and the
paged optimizer state in managed memory.) The model is a random-weight Llama of a named shape built in 4 bits
(shapes.random_model), LoRA r=16 / alpha=32 / dropout 0.05 on all seven projections, trained with the lean
configuration: full checkpointing, checkpointed layer inputs offloaded to pinned host memory, the fused chunked
loss. Each try starts fresh: the model is built once and shared, everything a step creates (gradients, optimizer
state, activations, cached blocks) is freed and the peak reset before the next try.

The search doubles the length from --start while steps pass, then bisects between the longest pass and the
shortest failure down to --resolution tokens. --quick tries only --lengths (default: the target of issue 9) in
increasing order, stopping at the first failure, one step each unless --steps says more. A length is not tried
when its step would not fit --time-budget (step time taken to grow as T² from the longest pass: a 131k-token
step of the 8B shape takes about a minute) or when its offloaded checkpoints (2 · layers · T · H · 2 bytes of
pinned host memory: 64 GiB for the 8B shape at 131k) would not fit 80 % of the host's available memory.

    python3 benchmarks/bench_context.py --shape llama-3-70b --cap-gb 48 --quick
    python3 benchmarks/bench_context.py --shape llama-3-8b --cap-gb 80 --quick
    python3 benchmarks/bench_context.py --cpu --tiny        # the search itself, on the CPU (no cap there)

Unsloth's published figures for comparison (issue 9): 12,106 tokens for Llama-3-70B at 48 GB, 89,389 at 80 GB;
342,733 for Llama-3-8B at 80 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from pathlib import Path

# Expandable segments let the allocator grow one mapping instead of caching fixed blocks that a long step's
# differently-sized tensors cannot reuse; set before torch first touches the GPU (an explicit setting wins).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

from bench_step import StepConfig, fresh, measure, minqlora_model, minqlora_step, random_batch  # noqa: E402
from minqlora.shapes import SHAPES, flops_per_token, shape_config  # noqa: E402

TARGETS = {"llama-3-70b": 16384, "llama-2-70b": 16384, "llama-3-8b": 131072, "tiny": 512}


def host_bytes_needed(config, length: int, cfg: StepConfig) -> int:
    """Pinned host memory the offloaded checkpoints of a batch-1 step take: two (T, H) bf16 inputs per layer."""
    return 2 * config.num_hidden_layers * length * config.hidden_size * 2 if cfg.offload else 0


def host_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


class Tries:
    """The tries so far, and whether the next one fits the time budget and the host's memory."""

    def __init__(self, model, config, device, cfg: StepConfig, steps: int, budget: float):
        self.model, self.config, self.device, self.cfg, self.steps = model, config, device, cfg, steps
        self.began, self.budget, self.rows = time.perf_counter(), budget, []
        self.oom_snapshot = None  # record_oom_snapshots: the allocator's state at the last OOM

    def refuse(self, length: int) -> str | None:
        """Why `length` is not tried (None: try it). Time grows about as T² (attention) from the last pass."""
        need, have = host_bytes_needed(self.config, length, self.cfg), host_available()
        if need > 0.8 * have:
            return f"host memory: offloading needs {need / 2**30:.0f} GiB pinned, {have / 2**30:.0f} GiB available"
        done = [r for r in self.rows if r["ok"]]
        if done:
            last = max(done, key=lambda r: r["length"])
            guess = last["wall_s"] * (length / last["length"]) ** 2
            left = self.budget - (time.perf_counter() - self.began)
            if guess > left:
                return f"time budget: about {guess:.0f} s expected, {left:.0f} s left"
        return None

    def run(self, length: int) -> dict | None:
        """One fresh try at batch 1 x length (None when refused): {"length", "ok", "s", "tok_s", "peak_gb"}."""
        why = self.refuse(length)
        if why:
            print(f"  T = {length:7d}: not tried ({why})", flush=True)
            return None
        batch = random_batch(self.config.vocab_size, 1, length, seed=length)
        tick = time.perf_counter()
        r = measure(lambda: minqlora_step(self.model, batch, self.device, self.cfg), self.device,
                    warmup=self.steps - 1, steps=1)
        row = {"length": length, "ok": "s" in r, "wall_s": round(time.perf_counter() - tick, 1), **r}
        if row["ok"]:
            row["tok_s"] = length / r["s"]
            row["tflops"] = 3 * flops_per_token(self.config, length) * row["tok_s"] / 1e12
            state = f"{row['tok_s']:9.1f} tok/s" + (f"  {row['peak_gb']:.2f} GB" if row["peak_gb"] else "")
        else:
            state = f"OOM: {r['oom']}"
        print(f"  T = {length:7d}: {state}  ({row['wall_s']} s)", flush=True)
        if not row["ok"] and self.oom_snapshot is not None:
            row["live_at_oom"] = live_at_oom(self.oom_snapshot)
            self.oom_snapshot = None
            for where, gb in row["live_at_oom"]:
                print(f"      {gb:7.2f} GiB  {where}")
        self.rows.append(row)
        return row

    def record_oom_snapshots(self) -> None:
        """From now on, record every allocation's Python stack and keep the allocator's state at each OOM (taken
        in torch's OOM observer, before the failed step frees anything)."""
        torch.cuda.memory._record_memory_history(max_entries=200_000, stacks="python")

        def observer(device, alloc, device_alloc, device_free):
            self.oom_snapshot = torch.cuda.memory._snapshot()

        torch._C._cuda_attach_out_of_memory_observer(observer)


def live_at_oom(snap: dict, top: int = 12) -> list[tuple[str, float]]:
    """The GiB held in a snapshot (torch.cuda.memory._snapshot), by the innermost minqlora/benchmarks frame that
    allocated it: each segment's live blocks carry the Python frames of their allocation."""
    held = Counter()
    for seg in snap["segments"]:
        for block in seg["blocks"]:
            if block["state"] != "active_allocated":
                continue
            frames = [f for f in block.get("frames", ()) if "minqlora" in f["filename"] or "bench" in f["filename"]]
            f = frames[0] if frames else None
            where = f"{Path(f['filename']).name}:{f['line']} {f['name']}" if f else "(no Python frame)"
            held[where] += block["size"] / 2**30
    return [(w, round(g, 3)) for w, g in held.most_common(top)]


def search(tries: Tries, start: int, resolution: int) -> None:
    """Double from `start` while steps pass, then bisect to `resolution` tokens."""
    good, bad, length = 0, None, start
    while bad is None:
        row = tries.run(length)
        if row is None:
            return
        if row["ok"]:
            good, length = length, length * 2
        else:
            bad = length
    while bad - good > resolution:
        length = (good + bad) // 2 // resolution * resolution or resolution
        if length in (good, bad):
            return
        row = tries.run(length)
        if row is None:
            return
        good, bad = (length, bad) if row["ok"] else (good, length)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3-8b", choices=sorted(SHAPES))
    ap.add_argument("--cap-gb", type=float, default=80.0, help="GPU memory cap in GiB (torch allocator)")
    ap.add_argument("--start", type=int, default=0, help="first length of the doubling search (0: target / 4)")
    ap.add_argument("--resolution", type=int, default=0, help="bisect down to this many tokens (0: target / 16)")
    ap.add_argument("--steps", type=int, default=0, help="steps per try, the last timed (0: 2; 1 with --quick,"
                    " whose time then includes first-step costs such as pinning host buffers)")
    ap.add_argument("--time-budget", type=float, default=480.0, help="seconds of searching at most")
    ap.add_argument("--quick", action="store_true", help="only --lengths, one step each, stop at the first OOM")
    ap.add_argument("--lengths", type=int, nargs="+", help="lengths for --quick (default: the target)")
    ap.add_argument("--checkpointing", default="full", choices=("full", "selective"))
    ap.add_argument("--no-offload", dest="offload", action="store_false", help="keep checkpoints on the GPU")
    ap.add_argument("--loss-chunk", type=int, default=256, help="rows per piece of the fused head + loss")
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="the tiny shape (checks the search on a CPU)")
    ap.add_argument("--json", help="write the tries here")
    ap.add_argument("--snapshot", action="store_true", help="on an OOM, print what held the GPU memory, by "
                    "allocating line (records every allocation's Python stack: slower)")
    args = ap.parse_args()
    args.steps = args.steps or (1 if args.quick else 2)

    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    shape = "tiny" if args.tiny else args.shape
    config = shape_config(shape)
    target = TARGETS[shape]
    cfg = StepConfig("context", args.checkpointing, args.offload, args.loss_chunk)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        if args.cap_gb * 2**30 > total:
            raise SystemExit(f"--cap-gb {args.cap_gb} exceeds the GPU's {total / 2**30:.1f} GiB")
        torch.cuda.set_per_process_memory_fraction(args.cap_gb * 2**30 / total, torch.cuda.current_device())
    cap = f"{args.cap_gb:g} GiB cap" if device.type == "cuda" else "no cap (CPU)"
    print(f"longest QLoRA step, {shape} shape, batch 1, {cap}, checkpointing {cfg.checkpointing}"
          f"{' + offload' if cfg.offload else ''}, loss chunk {cfg.loss_chunk}, torch {torch.__version__}")
    tick = time.perf_counter()
    model = minqlora_model(config, device)
    held = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    print(f"built in 4 bits in {time.perf_counter() - tick:.1f} s; the model holds {held:.2f} GB")
    fresh(device)
    tries = Tries(model, config, device, cfg, args.steps, args.time_budget)
    if args.snapshot and device.type == "cuda":
        tries.record_oom_snapshots()
    if args.quick:
        for length in sorted(args.lengths or (target,)):
            row = tries.run(length)
            if row is None or not row["ok"]:
                break
    else:
        search(tries, args.start or max(target // 4, 2), args.resolution or max(target // 16, 1))
    tries = tries.rows
    passed = [t for t in tries if t["ok"]]
    best = max(passed, key=lambda t: t["length"]) if passed else None
    failed = min((t["length"] for t in tries if not t["ok"] and (best is None or t["length"] > best["length"])),
                 default=None)
    if best:
        print(f"longest passing: {best['length']} tokens ({best['length'] / target:.2f}x the target {target}), "
              f"{best['tok_s']:.1f} tok/s" + (f", peak {best['peak_gb']:.2f} GB" if best["peak_gb"] else "")
              + (f"; {failed} tokens ran out of memory" if failed else "; no failure reached"))
    else:
        print(f"no length passed (shortest tried {tries[0]['length'] if tries else None})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": shape, "cap_gb": args.cap_gb, "config": cfg.__dict__, "tries": tries,
                       "longest": best and best["length"], "target": target}, f, indent=1)


if __name__ == "__main__":
    main()
