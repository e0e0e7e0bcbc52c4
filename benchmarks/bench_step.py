"""One QLoRA step of a random-weight Llama of a named shape: minqlora in several memory/speed configurations
against transformers + peft + bitsandbytes, in the same process.

Both sides: the base in NF4 + double quantization with bf16 compute, built in 4 bits layer by layer
(minqlora.shapes.random_model; hf_baseline.random_hf_qlora), LoRA r=16 / alpha=32 / dropout 0.05 on all seven
projections, bf16 autocast, the full next-token loss over every position of a random batch, gradient clipping at
0.3 and a paged AdamW step (minqlora's PagedAdamW; bitsandbytes' PagedAdamW32bit). transformers runs with gradient
checkpointing (prepare_model_for_kbit_training's default) and SDPA attention. A step is timed from the forward to
the optimizer's zero_grad, synchronized; the median of --steps after --warmup is reported with tokens/s, the peak
of torch's allocator while the configuration ran, model included (GiB, "GB" below, as
torch.cuda.max_memory_allocated counts it; the paged optimizer state of both sides lives in managed memory, outside
it), TFLOP/s counted as 3 × shapes.flops_per_token (forward, recompute, grad-input) and the ratio to transformers.

minqlora configurations (CONFIGS): the checkpointing mode (none / selective / full), the last layers left
uncheckpointed, the checkpointed layer inputs offloaded to host memory or not, the first layers parked in host
memory, or every host_stride-th (host_layers.py; the JSON records host_layers, host_stride, host_prefetch and
parked_gb), the input embedding's table in host memory (host_embedding.py) and the loss's chunk (0: full logits).
"fast" is then the fastest configuration whose peak is at most transformers' peak, "lean" the one with the least
peak memory; both are printed with ratios.
Each model is freed before the next is built, so a peak counts one model. A configuration that runs out of memory
is reported as OOM and the rest go on.

    python3 benchmarks/bench_step.py --shape llama-3-8b --batch 2x1024 4x2048 --json $OUT/step8b.json \\
        --plot $OUT/frontier.png
    python3 benchmarks/bench_step.py --shape llama-2-70b --batch 1x512 1x2048 --json $OUT/step70b.json
    python3 benchmarks/bench_step.py --cpu --tiny            # the whole benchmark on a tiny shape, on a CPU
    python3 benchmarks/bench_step.py --plot frontier.png --from step8b.json   # redraw the plot from results
--only minqlora / --only transformers runs one side; --configs picks minqlora configurations by name; --quick takes
one warmup and two timed steps and the configurations of QUICK.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from dataclasses import dataclass

import torch

import hf_baseline  # benchmarks/: the transformers + peft + bitsandbytes side
from minqlora import checkpointing, fused
from minqlora.data import Batch
from minqlora.host_embedding import HostEmbedding, embed_on_device, embed_on_host
from minqlora.host_layers import PREFETCH_LAYERS
from minqlora.lora import add_lora
from minqlora.lora_fused import set_lora_path
from minqlora.optim import PagedAdamW
from minqlora.shapes import SHAPES, flops_per_token, random_model, shape_config
from minqlora.sft import token_loss_sum

try:  # optional: only --plot needs it
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
except ImportError:
    Figure = None

LR, CLIP = 2e-4, 0.3
R, ALPHA, DROPOUT = 16, 32, 0.05


@dataclass(frozen=True)
class StepConfig:
    name: str
    checkpointing: str  # "full", "selective" or "none" (checkpointing.py)
    offload: bool  # checkpointed layer inputs in pinned host memory
    loss_chunk: int  # rows per piece of the fused head + loss; 0: full logits (the readable path)
    keep_last: int = 0  # with checkpointing, the last N layers keep their activations
    lora_path: str = "fused"  # lora_fused.LORA_PATHS: the LoRA branch (TrainConfig's default is "fused")
    fused_ops: str = "auto"  # RMSNorm / RoPE / SwiGLU on the GPU: fused.BACKENDS, "auto" (its default), "off" (eager)
    recompute_inputs: bool = True  # grouped LoRA branches redo norm / SwiGLU outputs in backward (set_lora_path)
    host_layers: int = 0  # the first N layers keep their activations in pinned host memory (host_layers.py)
    host_prefetch: int = PREFETCH_LAYERS  # a parked layer i comes back when the backward of layer i + this starts
    host_stride: int = 1  # the parked layers are 0, s, 2s, ... (1: the first host_layers)
    embed_on_host: bool = False  # the frozen embedding's table in pinned host memory (host_embedding.py)
    skip_unused: bool = True  # offloaded recomputation skips o_proj / down_proj (checkpointing.SKIP_UNUSED_OUTPUTS)


CONFIGS = (
    StepConfig("full+logits", "full", False, 0),  # today's path before the chunked loss: the reference point
    StepConfig("none", "none", False, 1024),
    StepConfig("selective", "selective", False, 1024),
    StepConfig("selective-keep4", "selective", False, 1024, keep_last=4),  # spends memory left under the budget
    StepConfig("selective-keep8", "selective", False, 1024, keep_last=8),
    StepConfig("full", "full", False, 1024),
    # Full checkpointing spending the 8B shape's memory up to transformers' 24.5 GB at 4 x 2048 when a kept layer
    # cost about 1.5 GiB there (none 58.9 vs full 9.9 GiB over 32 layers, masks stored): 9 layers skip recomputation.
    StepConfig("full-keep9", "full", False, 1024, keep_last=9),
    # With the counter-based dropout a kept layer costs about 1.0 GB at 4 x 2048 (none 41.4 vs full 9.4 GB): 15
    # layers spend the memory up to transformers' 24.5 GB there.
    StepConfig("full-keep15", "full", False, 1024, keep_last=15),
    # The same with the LoRA branches keeping their inputs (norm and SwiGLU outputs) as before recompute.py: a kept
    # layer saved 139.6 KB a token (1.07 GiB at 4 x 2048) where it now saves 94.6 KB (0.72 GiB; tests/saved_tensors.py
    # on one 8B-shaped layer on a CPU, the fused ops' Functions). none and full-keep15 against these two measure it.
    StepConfig("none+keep-inputs", "none", False, 1024, recompute_inputs=False),
    StepConfig("full-keep15+keep-inputs", "full", False, 1024, keep_last=15, recompute_inputs=False),
    # What the 0.34 GiB freed per kept layer buys under the 24.5 GB budget: full-keep15 minus 15 × 0.34 GiB leaves
    # room for about 7 more layers at 0.72 GiB each.
    StepConfig("full-keep20", "full", False, 1024, keep_last=20),
    StepConfig("full-keep22", "full", False, 1024, keep_last=22),
    StepConfig("selective+offload", "selective", True, 1024),
    StepConfig("full+offload", "full", True, 256),
    # The path before lora_fused.py and fused.py: LoRALinear.forward per module, eager elementwise ops.
    StepConfig("full+offload+eager", "full", True, 256, lora_path="reference", fused_ops="off"),
    StepConfig("full+offload+eager-ops", "full", True, 256, fused_ops="off"),  # each of the two changes alone
    StepConfig("full+offload+ref-lora", "full", True, 256, lora_path="reference"),
    # The elementwise ops compiled by torch.compile (fused.py's "compile" backend) instead of minqlora's kernels.
    StepConfig("none+compile", "none", False, 1024, fused_ops="compile"),
    StepConfig("full+compile", "full", False, 1024, fused_ops="compile"),
    StepConfig("full+offload+compile", "full", True, 256, fused_ops="compile"),
    # Host layers (host_layers.py), 8B shape at 4 x 2048: a parked layer takes its 0.72 GiB off the GPU for about
    # 17 ms of PCIe each way (~45 GB/s) against ~6 ms of forward and ~12 ms of backward per layer, and the first
    # layers are parked so their copies run behind every later layer's compute (copies out of 10 layers: ~170 ms
    # in a ~200 ms forward). Fast side: none (13,949 tok/s, 30.5 GB) less 0.72 GiB per parked layer: 9 layers
    # 24.0, 10 layers 23.3, 12 layers 21.9 GB, no recomputation; full-keep22 (12,195 tok/s, 23.9 GB) with the
    # first 8 of its 10 recomputed layers parked instead recomputes 2.
    StepConfig("none-host9", "none", False, 1024, host_layers=9, host_prefetch=2),
    StepConfig("none-host10", "none", False, 1024, host_layers=10, host_prefetch=2),
    StepConfig("none-host12", "none", False, 1024, host_layers=12, host_prefetch=2),
    StepConfig("none-host10-pf4", "none", False, 1024, host_layers=10, host_prefetch=4),  # more lead: free here
    StepConfig("none-host12-pf4", "none", False, 1024, host_layers=12, host_prefetch=4),
    StepConfig("full-keep22-host8", "full", False, 1024, keep_last=22, host_layers=8, host_prefetch=2),
    StepConfig("full-keep22-host8-pf4", "full", False, 1024, keep_last=22, host_layers=8, host_prefetch=4),
    # Lean side: full+offload (9,900 tok/s, 7.46 GB) with its first layers parked instead of recomputed, ~7.5 ms
    # saved each; what they cost is the layers brought back ahead of need (host_prefetch) on top of the recompute
    # peak, 0.72 GiB each, against the 8.6 GB budget.
    StepConfig("full+offload-host8", "full", True, 256, host_layers=8, host_prefetch=1),
    StepConfig("full+offload-host10", "full", True, 256, host_layers=10, host_prefetch=1),
    StepConfig("full+offload-host10-pf2", "full", True, 256, host_layers=10, host_prefetch=2),
    StepConfig("full+offload-host12", "full", True, 256, host_layers=12, host_prefetch=1),
    # The same spaced out (host_stride): parked consecutively, the copies queue on the link and the GPU holds every
    # layer still waiting for its copy (the peaks above). Every s-th layer gives each 17 ms copy s x ~6 ms of forward
    # to run behind (s = 3: 18 ms, just enough), and with host_prefetch < s a parked layer's backward is over before
    # the next one comes back: about one parked layer on the GPU at a time, each way. 8 at stride 4 and 10 at
    # stride 3 span layers 0-28 and 0-27; 6 at stride 5 leaves more slack per copy; 11 at stride 3 parks the most
    # that fit under 32 layers, with the smallest lead (one ~18 ms checkpointed layer's backward per copy back).
    StepConfig("full+offload-host8-s4", "full", True, 256, host_layers=8, host_stride=4, host_prefetch=2),
    StepConfig("full+offload-host10-s3", "full", True, 256, host_layers=10, host_stride=3, host_prefetch=2),
    StepConfig("full+offload-host6-s5", "full", True, 256, host_layers=6, host_stride=5, host_prefetch=2),
    StepConfig("full+offload-host11-s3-pf1", "full", True, 256, host_layers=11, host_stride=3, host_prefetch=1),
    # The embedding's 128256 x 4096 bf16 table (1.05 GB at 8B) in host memory: the batch's rows gathered on the CPU
    # and copied in (64 MiB at 4 x 2048) once per forward.
    StepConfig("full+offload+host-embed", "full", True, 256, embed_on_host=True),
    StepConfig("full+offload-host8-s4+host-embed", "full", True, 256, host_layers=8, host_stride=4, host_prefetch=2,
               embed_on_host=True),
    StepConfig("full+offload-host6-s5+host-embed", "full", True, 256, host_layers=6, host_stride=5, host_prefetch=2,
               embed_on_host=True),
    StepConfig("full+offload-host10-s3+host-embed", "full", True, 256, host_layers=10, host_stride=3,
               host_prefetch=2, embed_on_host=True),
    StepConfig("full+offload-host8-s4-pf1+host-embed", "full", True, 256, host_layers=8, host_stride=4,
               host_prefetch=1, embed_on_host=True),
    # 2 x 1024 (0.19 GB a layer): more parked layers to come under transformers' ~12.6 GB without checkpointing.
    StepConfig("none-host16-pf4", "none", False, 1024, host_layers=16, host_prefetch=4),
    StepConfig("none-host20-pf4", "none", False, 1024, host_layers=20, host_prefetch=4),
    StepConfig("none-host16-pf4+host-embed", "none", False, 1024, host_layers=16, host_prefetch=4, embed_on_host=True),
    StepConfig("full-keep26", "full", False, 1024, keep_last=26),
    # The offloaded recomputation running o_proj and down_proj again (as before SKIP_UNUSED_OUTPUTS), against the
    # default, in one run.
    StepConfig("full+offload-host8-s4+host-embed+recompute-all", "full", True, 256, host_layers=8, host_stride=4,
               host_prefetch=2, embed_on_host=True, skip_unused=False),
    StepConfig("full+offload+host-embed+recompute-all", "full", True, 256, embed_on_host=True, skip_unused=False),
    StepConfig("full+offload+recompute-all", "full", True, 256, skip_unused=False),  # the 70B rows' configuration
    # 2 x 1024 (0.19 GB a layer, 5.2 GB for full+offload with the host embedding): the last 6 or 8 layers kept
    # instead of recomputed, under Unsloth's 6.85 GB; that step is host-bound, and a kept layer skips its
    # recomputation's host time too.
    StepConfig("full+offload-keep6+host-embed", "full", True, 256, keep_last=6, embed_on_host=True),
    StepConfig("full+offload-keep8+host-embed", "full", True, 256, keep_last=8, embed_on_host=True),
)
QUICK = ("none", "selective", "selective-keep4", "full", "full+offload", "full+offload+eager")


def random_batch(vocab: int, batch: int, seq_len: int, seed: int = 0) -> Batch:
    """Random token ids as an sft Batch whose labels are the ids: the full next-token loss over every position."""
    ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
    ones = torch.ones_like(ids)
    return Batch(input_ids=ids, labels=ids.clone(), attention_mask=ones,
                 position_ids=torch.arange(seq_len).expand(batch, seq_len), segment_ids=ones, packed=False,
                 num_tokens=ids.numel(), num_label_tokens=batch * (seq_len - 1))


def minqlora_model(shape, device: torch.device):
    config = shape if not isinstance(shape, str) else shape_config(shape)
    torch.manual_seed(0)
    model = random_model(config, device=device)
    add_lora(model, r=R, alpha=ALPHA, dropout=DROPOUT)
    model.train()
    return model


def optimizer_step(loss_fn, params, opt):
    """(step, free): step runs loss_fn().backward(), clipping, the optimizer; free drops the optimizer's state."""

    def step():
        loss_fn().backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def free():
        opt.zero_grad(set_to_none=True)
        opt.state.clear()

    return step, free


def minqlora_step(model, batch: Batch, device: torch.device, cfg: StepConfig):
    """A closure running one optimizer step of `model` under `cfg`, and a function freeing its state."""
    set_lora_path(model, cfg.lora_path, recompute_inputs=cfg.recompute_inputs)
    on = cfg.fused_ops != "off" and device.type == "cuda"
    fused.set_fused(on, backend=None if cfg.fused_ops in ("auto", "off") else cfg.fused_ops)
    model.gradient_checkpointing = cfg.checkpointing
    model.model.offload_checkpoints = cfg.offload
    model.model.keep_last_layers = cfg.keep_last
    model.model.host_layers, model.model.host_prefetch = host_layers(cfg, len(model.model.layers)), cfg.host_prefetch
    model.model.host_stride = cfg.host_stride
    model.model.host_layer_range()  # a bad configuration fails here, not as a step's error
    place_embedding(model, cfg.embed_on_host, device)
    model.model.host_stats = None
    checkpointing.SKIP_UNUSED_OUTPUTS = cfg.skip_unused
    params = [p for p in model.parameters() if p.requires_grad]
    n = batch.num_label_tokens
    return optimizer_step(lambda: token_loss_sum(model, batch, device, bf16=True, loss_chunk=cfg.loss_chunk) / n,
                          params, PagedAdamW(params, lr=LR))


def hf_step(model, batch: Batch, device: torch.device):
    params = [p for p in model.parameters() if p.requires_grad]
    ids = batch.input_ids.to(device)

    def loss():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return model(input_ids=ids, labels=ids).loss

    return optimizer_step(loss, params, hf_baseline.hf_optimizer(params, device, LR))


def fresh(device: torch.device) -> None:
    """Drop freed blocks and start a new peak (between configurations)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        if hasattr(torch._C, "_host_emptyCache"):  # the pinned blocks of offloaded activations, tens of GB at 100k+
            torch._C._host_emptyCache()
        torch.cuda.reset_peak_memory_stats(device)


def host_layers(cfg: StepConfig, n_layers: int) -> int:
    """cfg.host_layers, capped for models with fewer layers than the 8B shape's 32 (--tiny, --layers): the parked
    layers 0, s, 2s, ... must lie below the last keep_last (with checkpointing)."""
    keep = min(cfg.keep_last, n_layers) if cfg.checkpointing != "none" else 0
    return min(cfg.host_layers, -(-(n_layers - keep) // cfg.host_stride))  # ceil: layers 0, s, ... below n - keep


def place_embedding(model, on_host: bool, device: torch.device) -> None:
    """The one model serves every configuration: swap its embedding to the host or back to the device as cfg asks,
    then start the peak again, so it counts the table only where it stays on the GPU (fresh)."""
    if on_host != isinstance(model.model.embed_tokens, HostEmbedding):
        if on_host:
            embed_on_host(model)
        else:
            embed_on_device(model)
        fresh(device)


def parked_gb(model) -> float | None:
    """GiB the last step's forward parked in host memory (host_layers.HostStats), None without host layers."""
    stats = model.model.host_stats
    return stats.bytes / 2**30 if stats is not None else None


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def measure(build, device: torch.device, warmup: int, steps: int) -> dict:
    """{"s": median seconds per step, "peak_gb"} or {"oom": message}; the step's state is freed either way."""
    fresh(device)
    step = free = None
    try:
        step, free = build()
        for _ in range(warmup):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # SYNC: the step's time
            times.append(time.perf_counter() - start)
        return {"s": statistics.median(times), "peak_gb": peak_gb(device)}
    except torch.OutOfMemoryError as e:
        return {"oom": str(e).splitlines()[0]}
    finally:
        if free is not None:
            free()
        del step, free
        fresh(device)


def run_shape(shape: str, config, batches, device, configs, sides, warmup, steps) -> list[dict]:
    rows = []
    if "minqlora" in sides:
        tick = time.perf_counter()
        model = minqlora_model(config, device)
        print(f"minqlora {shape}: built in 4 bits in {time.perf_counter() - tick:.1f} s")
        for b, t in batches:
            batch = random_batch(config.vocab_size, b, t)
            for cfg in configs:
                r = measure(lambda: minqlora_step(model, batch, device, cfg), device, warmup, steps)
                rows.append({"side": "minqlora", "config": cfg.name, "batch": b, "seq_len": t, **r,
                             "checkpointing": cfg.checkpointing, "offload": cfg.offload,
                             "loss_chunk": cfg.loss_chunk, "keep_last": cfg.keep_last,
                             "recompute_inputs": cfg.recompute_inputs, "host_layers": model.model.host_layers,
                             "host_stride": cfg.host_stride, "host_prefetch": cfg.host_prefetch,
                             "embed_on_host": cfg.embed_on_host, "skip_unused": cfg.skip_unused,
                             "parked_gb": parked_gb(model)})
                print(_line(rows[-1]), flush=True)
        del model
        fresh(device)
    if "transformers" in sides:
        tick = time.perf_counter()
        model = hf_baseline.random_hf_qlora(config, device, r=R, alpha=ALPHA, dropout=DROPOUT)
        print(f"transformers {shape}: built in 4 bits in {time.perf_counter() - tick:.1f} s")
        for b, t in batches:
            batch = random_batch(config.vocab_size, b, t)
            r = measure(lambda: hf_step(model, batch, device), device, warmup, steps)
            rows.append({"side": "transformers", "config": "peft+bnb", "batch": b, "seq_len": t, **r})
            print(_line(rows[-1]), flush=True)
        del model
        fresh(device)
    for row in rows:
        if "s" in row:
            row["tok_s"] = row["batch"] * row["seq_len"] / row["s"]
            row["tflops"] = 3 * flops_per_token(config, row["seq_len"]) * row["tok_s"] / 1e12
    return rows


def _line(row: dict) -> str:
    what = f"{row['side']:12s} {row['config']:32s} {row['batch']} x {row['seq_len']:<6d}"
    if "oom" in row:
        return f"  {what} OOM"
    peak = f"{row['peak_gb']:6.2f} GB" if row["peak_gb"] is not None else "   - GB"
    parked = f"  {row['parked_gb']:.2f} GB parked" if row.get("parked_gb") is not None else ""
    return (f"  {what} {row['s'] * 1e3:9.1f} ms/step {row['batch'] * row['seq_len'] / row['s']:9.1f} tok/s  {peak}"
            + parked)


def summary(rows: list[dict]) -> list[str]:
    """Per batch shape: every configuration's tok/s and peak against transformers', then fast and lean."""
    out = []
    for b, t in sorted({(r["batch"], r["seq_len"]) for r in rows}):
        group = [r for r in rows if (r["batch"], r["seq_len"]) == (b, t)]
        hf = next((r for r in group if r["side"] == "transformers" and "s" in r), None)
        ours = [r for r in group if r["side"] == "minqlora" and "s" in r]
        out.append(f"batch {b} x {t}:")
        for r in group:
            if "s" not in r:
                out.append(f"  {r['side']:12s} {r['config']:32s}      OOM")
                continue
            ratio = (f"  {r['tok_s'] / hf['tok_s']:5.2f}x tok/s" if hf else "") + (
                f"  {r['peak_gb'] / hf['peak_gb']:5.2f}x memory" if hf and r["peak_gb"] else "")
            peak = f"{r['peak_gb']:6.2f} GB" if r["peak_gb"] is not None else "     - GB"
            out.append(f"  {r['side']:12s} {r['config']:32s} {r['tok_s']:9.1f} tok/s {peak} "
                       f"{r['tflops']:6.1f} TFLOP/s{ratio}")
        if hf and ours and hf["peak_gb"] is not None:
            fits = [r for r in ours if r["peak_gb"] <= hf["peak_gb"]]
            fast = max(fits, key=lambda r: r["tok_s"]) if fits else None
            lean = min(ours, key=lambda r: r["peak_gb"])
            for label, r in (("fast", fast), ("lean", lean)):
                if r is None:
                    out.append(f"  {label}: no configuration within transformers' {hf['peak_gb']:.2f} GB")
                    continue
                out.append(f"  {label} = {r['config']}: {r['tok_s'] / hf['tok_s']:.2f}x transformers' tok/s at "
                           f"{r['peak_gb'] / hf['peak_gb']:.2f}x its peak ({r['tok_s']:.0f} tok/s, "
                           f"{r['peak_gb']:.2f} GB)")
    return out


def plot(rows: list[dict], path: str, title: str) -> None:
    """tok/s against peak GB, one marker per side, one colour per batch shape (the frontier of issue 8)."""
    if Figure is None:
        raise SystemExit("--plot needs matplotlib (pip install matplotlib); the --json results can be plotted "
                         "elsewhere with --plot FILE --from JSON")
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    shapes = sorted({(r["batch"], r["seq_len"]) for r in rows})
    for i, (b, t) in enumerate(shapes):
        colour = f"C{i}"
        for r in rows:
            if (r["batch"], r["seq_len"]) != (b, t) or "s" not in r or r["peak_gb"] is None:
                continue
            hf = r["side"] == "transformers"
            ax.scatter(r["peak_gb"], r["tok_s"], color=colour, marker="s" if hf else "o", s=50 if hf else 30)
            ax.annotate("transformers+peft+bnb" if hf else r["config"], (r["peak_gb"], r["tok_s"]), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
        ax.scatter([], [], color=colour, label=f"batch {b} x {t}")
    ax.set_xlabel("peak GPU memory (GB, torch allocator)")
    ax.set_ylabel("tokens / s")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    print(f"frontier plot written to {path}")


def profile_steps(config, batch_shape, device, configs, rows: int) -> None:
    """torch.profiler over one step (after one untimed) of each configuration: the ops that take the device's time."""
    from torch.profiler import ProfilerActivity, profile
    model = minqlora_model(config, device)
    batch = random_batch(config.vocab_size, *batch_shape, seed=0)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for cfg in configs:
        step, free = minqlora_step(model, batch, device, cfg)
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with profile(activities=activities) as prof:
            step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        wall = time.perf_counter() - start
        free()
        # The table's last lines give the device time of all kernels ("Self CUDA time total"); wall minus that is
        # the time the GPU sat idle (less "Command Buffer Full", where the host waited for a full launch queue).
        print(f"\n==== profile: {cfg.name}, batch {batch_shape[0]} x {batch_shape[1]}: wall {wall * 1e3:.1f} ms "
              "(under the profiler) ====")
        print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60))
        if device.type == "cuda":  # where the host's time goes (launch-bound steps)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows // 2,
                                            max_name_column_width=60))


def parse_batch(text: str) -> tuple[int, int]:
    try:
        b, t = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch takes BATCHxSEQ_LEN such as 4x2048, got {text!r}") from None
    if b < 1 or t < 2:
        raise argparse.ArgumentTypeError(f"--batch {text!r}: need batch >= 1 and seq_len >= 2")
    return b, t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3-8b", choices=sorted(SHAPES), help="model shape (shapes.SHAPES)")
    ap.add_argument("--layers", type=int, default=0, help="override the shape's layer count (0: keep)")
    ap.add_argument("--batch", type=parse_batch, nargs="+", default=None, help="BATCHxSEQ_LEN, several allowed")
    ap.add_argument("--only", choices=("minqlora", "transformers"), help="run one side only")
    ap.add_argument("--configs", nargs="+", choices=[c.name for c in CONFIGS], help="minqlora configurations")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first allocates, pages)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    ap.add_argument("--quick", action="store_true", help=f"1 warmup, 2 timed steps, configurations {QUICK}")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU")
    ap.add_argument("--tiny", action="store_true", help="the tiny shape at batch 2x64 (checks the benchmark)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--plot", help="write the tok/s-against-peak-GB plot here (PNG; needs matplotlib)")
    ap.add_argument("--from", dest="from_json", help="with --plot: redraw from a --json file, run nothing")
    ap.add_argument("--profile", type=int, default=0, metavar="ROWS", help="instead of timing: torch.profiler over "
                    "one step of each --configs at the first --batch, printing the ROWS ops of most device time")
    args = ap.parse_args()

    if args.from_json:
        saved = json.load(open(args.from_json))
        print("\n".join(summary(saved["rows"])))
        if args.plot:
            plot(saved["rows"], args.plot, saved["title"])
        return
    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    shape = "tiny" if args.tiny else args.shape
    config = shape_config(shape, **({"num_hidden_layers": args.layers} if args.layers else {}))
    batches = args.batch or ([(2, 64)] if args.tiny else [(2, 1024), (4, 2048)])
    warmup, steps = (1, 2) if args.quick else (args.warmup, args.steps)
    names = args.configs or (QUICK if args.quick else [c.name for c in CONFIGS])
    configs = [c for c in CONFIGS if c.name in names]
    sides = [args.only] if args.only else ["minqlora", "transformers"]

    env = (f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, torch {torch.__version__}"
           + (f", CUDA {torch.version.cuda}" if device.type == "cuda" else f", {torch.get_num_threads()} threads"))
    print(f"QLoRA step, {shape} shape ({config.num_hidden_layers} layers), r={R} alpha={ALPHA} dropout={DROPOUT}, "
          f"{env}; median of {steps} after {warmup} warmup")
    if args.profile:
        profile_steps(config, batches[0], device, configs, args.profile)
        return
    rows = run_shape(shape, config, batches, device, configs, sides, warmup, steps)
    print()
    print("\n".join(summary(rows)))
    title = f"QLoRA step, {shape} shape, {env}"
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"title": title, "shape": shape, "layers": config.num_hidden_layers, "rows": rows}, f, indent=1)
    if args.plot:
        plot(rows, args.plot, title)


if __name__ == "__main__":
    main()
