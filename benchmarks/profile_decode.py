"""Where one decode step's time goes: the kernels of a Llama-3-8B-shaped NF4 + DQ decode step, from torch.profiler.

bench_generate.py gives tokens/s; this says which kernels make up a token. It builds the same random-weight model
(bench_generate.minqlora_model), prefills a 16-token prompt into a Decoder's static cache, then
- times the captured step (CUDA-graph replay, CUDA events, median of --steps): the real per-token cost;
- profiles --steps eager steps of the same static-cache step (the same kernels, launched one by one) and prints,
  per kernel name, the calls and the GPU µs per step, largest first, and the sum against the graph's step time
  (what is left is the gaps between kernels that a graph does not remove).

    python3 benchmarks/profile_decode.py [--batch 1] [--steps 20] [--lora] [--tiny] [--lm-head-4bit]   # GPU
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from bench_generate import LLAMA3_8B, PROMPT_LEN, TINY, minqlora_model
from minqlora.decode import Decoder
from minqlora.lora import add_lora
from minqlora import layout, lora_fused, static_cache
from minqlora.lora_fused import set_lora_path
from minqlora.model import LlamaConfig
from minqlora.proj_group import group_projections
from minqlora.sampling import GenerationConfig


def graph_step_us(decoder: Decoder, step, steps: int) -> float:
    """Median µs of one replayed step, CUDA events around each replay."""
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return statistics.median(times)


def prefilled(model, ids, config, max_len: int, mode: str, ungroup: bool, rows: bool = False,
              lm_head_4bit: bool = False):
    """(Decoder, its step) in `mode`, the prompt prefilled and 3 steps run (graph capture, warm-up); ungroup undoes the
    Decoder's projection groups before the step is made, rows its decode layout (the weights back in bitsandbytes'
    rows, layout.py); lm_head_4bit gives the Decoder its 4-bit copy of the head (decode.py)."""
    decoder = Decoder(model, ids.shape[0], max_len, mode, lm_head_4bit=lm_head_4bit)
    if ungroup:
        group_projections(model, False)
    if rows:
        layout.use_tiles(model, False)
        if decoder.head is not None:
            decoder.head.use_tiles(False)
    step = decoder._runner(config)
    decoder._reset()
    decoder._emit(decoder._logits(ids, None), config)  # through the Decoder's head, 4-bit or the model's
    for _ in range(3):
        step()
    return decoder, step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1, help="rows decoded together (default 1)")
    ap.add_argument("--steps", type=int, default=20, help="profiled and timed steps (default 20)")
    ap.add_argument("--top", type=int, default=30, help="kernel names listed (default 30)")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer, 256-wide model instead of the 8B shape")
    ap.add_argument("--no-group", action="store_true", help="undo the Decoder's projection groups (proj_group.py) "
                    "before capture: q/k/v and gate/up as separate launches, for comparison")
    ap.add_argument("--rows", action="store_true", help="undo the Decoder's decode layout (layout.py) before capture: "
                    "the weights in bitsandbytes' rows, for comparison")
    ap.add_argument("--lora", action="store_true", help="with an unmerged r=16 adapter on all seven projections "
                    "(the fused branch, as bench_generate.py)")
    ap.add_argument("--lora-kernels", choices=("on", "off"), help="with --lora: the few-row decode kernels "
                    "(ops.lora_down / lora_up_add_) or cuBLAS + addmm_ (default: lora_fused.DECODE_KERNELS)")
    ap.add_argument("--lm-head-4bit", action="store_true", help="logits from the Decoder's NF4 + DQ copy of the "
                    "bf16 lm_head (decode.py: 0.27 GB read per token instead of 1.05 GB at the 8B shape)")
    ap.add_argument("--no-rope-cache", action="store_true", help="rotary embedding and KV-cache writes as two RoPE "
                    "launches and two index_copy_ (static_cache.rope_kv_cache_ref) instead of ops.rope_kv_cache")
    args = ap.parse_args()
    if args.no_rope_cache:
        static_cache.rope_kv_cache_applies = lambda *a: False
    if not torch.cuda.is_available():
        raise SystemExit("profile_decode.py needs a CUDA GPU")
    dev = torch.device("cuda")
    cfg = LlamaConfig(**(TINY if args.tiny else LLAMA3_8B))
    model = minqlora_model(cfg, dev, quantize=True)
    if args.lora:
        add_lora(model, r=16, alpha=32, dropout=0.0)
        set_lora_path(model, "fused")
        if args.lora_kernels:
            lora_fused.DECODE_KERNELS = args.lora_kernels == "on"
    ids = torch.randint(0, cfg.vocab_size, (args.batch, PROMPT_LEN), device=dev)
    config = GenerationConfig(max_new_tokens=2 * args.steps + 8)
    max_len = PROMPT_LEN + 3 * args.steps + 16

    with torch.inference_mode():
        graphed, replay = prefilled(model, ids, config, max_len, "graph", args.no_group, args.rows, args.lm_head_4bit)
        graph_us = graph_step_us(graphed, replay, args.steps)
        del graphed, replay

        eager, step = prefilled(model, ids, config, max_len, "static", args.no_group, args.rows, args.lm_head_4bit)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize()

    per_name: dict[str, list[float]] = defaultdict(list)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per_name[ev.name].append(ev.device_time)
    rows = sorted(((sum(t) / args.steps, len(t) / args.steps, n) for n, t in per_name.items()), reverse=True)
    total = sum(r[0] for r in rows)
    what = ((f", LoRA r=16 (decode kernels {'on' if lora_fused.DECODE_KERNELS else 'off'})" if args.lora else "")
            + (", projections ungrouped" if args.no_group else "") + (", weights in rows" if args.rows else "")
            + (", RoPE + index_copy_" if args.no_rope_cache else "") + (", 4-bit lm_head" if args.lm_head_4bit else ""))
    print(f"batch {args.batch}, {cfg.num_hidden_layers} layers{what}: graph replay {graph_us:.1f} us a step "
          f"({1e6 / graph_us * args.batch:.1f} tok/s); kernels of the eager step sum to {total:.1f} us "
          f"({total / graph_us:.0%} of the replay)")
    print(f"{'us/step':>9} {'share':>6} {'calls':>6} {'us/call':>8}  kernel")
    for us, calls, name in rows[:args.top]:
        print(f"{us:9.1f} {us / total:6.1%} {calls:6.1f} {us / calls:8.2f}  {name[:110]}")


if __name__ == "__main__":
    main()
