"""One QLoRA training step, minqlora against transformers + peft + bitsandbytes, in the same process.

Both sides train the same base model (NF4 + double quantization, LoRA r=16 / alpha=32 / dropout 0.05 on all seven
projections, gradient checkpointing) in the same compute dtype on the same random batch, with the full next-token
loss over every position, gradient clipping at 0.3 and an AdamW step. The step is timed from the forward pass to the
optimizer's zero_grad; the median of --steps after --warmup is reported with tokens/s and the ratio. minqlora runs
once per --lora-paths entry (lora_fused.py: "fused", "shared-dropout"; lora.py: "reference").

--dtype auto computes in bf16 (autocast, bnb_4bit_compute_dtype=bfloat16: the QLoRA recipe) on CUDA and on CPUs with
native bf16 matmuls (oneDNN's check: AVX512-BF16 / AMX), and in float32 on other CPUs, where torch's bf16 matmul is
an emulated fallback: on this workspace's AVX2 EPYC it ran at 1.5 GFLOP/s against 46 GFLOP/s in float32 (one
thread), which makes a bf16 step take minutes on either stack.

DESIGN.md §9 records the bar on this 2-core CPU: transformers+peft+bitsandbytes takes 4.4 s per step of SmolLM2-135M
at batch 8 x ~66 tokens (about 120 tok/s); minqlora should be at least 1.5x faster.

    .venv/bin/python benchmarks/bench_train.py --model ~/.cache/minqlora/smollm2-135m-instruct/<file>.gguf

--model takes a GGUF file or a Hugging Face directory (the demo, `bash scripts/demo.sh`, fetches SmolLM2's GGUF).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from pathlib import Path

import peft
import torch
import torch.nn.functional as F
import transformers

from minqlora.checkpoint import load_pretrained, save_pretrained
from minqlora.lora import add_lora
from minqlora.lora_fused import LORA_PATHS, set_lora_path
from minqlora.optim import PagedAdamW
from minqlora.data import Batch
from minqlora.sft import token_loss_sum

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LR, CLIP = 2e-4, 0.3


def time_steps(step, warmup: int, steps: int, sync, clock=time.perf_counter) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        sync()
        start = clock()
        step()
        sync()
        times.append(clock() - start)
    return times


def minqlora_step(model_path: str, ids: torch.Tensor, device: torch.device, dtype: torch.dtype, lora_path: str,
                  checkpointing: str = "full", loss_chunk: int = 0):
    """loss_chunk 0: full (B, T, V) logits and F.cross_entropy, as the other side; > 0: sft's training loss
    (token_loss_sum: the fused head + loss, loss_chunk rows of logits at a time), the same value."""
    model = load_pretrained(model_path, quantize="nf4", double_quant=True, device=device, dtype=dtype)
    add_lora(model, r=16, alpha=32, dropout=0.05, targets=TARGETS)
    set_lora_path(model, lora_path)
    model.gradient_checkpointing = checkpointing
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = PagedAdamW(params, lr=LR)
    ones = torch.ones_like(ids)
    batch = Batch(input_ids=ids, labels=ids.clone(), attention_mask=ones, segment_ids=ones, packed=False,
                  position_ids=torch.arange(ids.shape[1], device=ids.device).expand_as(ids),
                  num_tokens=ids.numel(), num_label_tokens=ids.shape[0] * (ids.shape[1] - 1))

    def step():
        if loss_chunk:
            loss = token_loss_sum(model, batch, device, dtype == torch.bfloat16, loss_chunk) / batch.num_label_tokens
        else:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                logits = model(ids)  # (B, T, V)
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def hf_step(hf_dir: str, ids: torch.Tensor, device: torch.device, dtype: torch.dtype, checkpointing: bool = True):
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, quantization_config=quant,
                                                              dtype=dtype, device_map={"": device})
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                       target_modules=list(TARGETS), task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)  # bitsandbytes' paged AdamW falls back to this on a CPU

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="GGUF file or Hugging Face directory of a Llama model")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--seq-len", type=int, default=66, help="tokens per sequence")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"), help="compute dtype")
    ap.add_argument("--lora-paths", default="fused,reference", help=f"minqlora LoRA paths to time, of {LORA_PATHS}")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--checkpointing", default="full", help="minqlora checkpointing modes to time, comma-separated "
                    "(full, selective, none; the other side always checkpoints, the QLoRA recipe)")
    ap.add_argument("--hf-checkpointing", default="full", help="the other side's modes, comma-separated: full "
                    "(prepare_model_for_kbit_training's default, the usual recipe) and/or none")
    ap.add_argument("--loss-chunk", type=int, default=0, help="minqlora's loss: 0 = full logits + F.cross_entropy "
                    "(as the other side), N = sft's fused head + loss in N-row pieces")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time with this process's CPU seconds, not wall time: with --threads 1 on a shared machine "
                         "they do not count the time other jobs hold the cores")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(args.dtype) or (
        torch.bfloat16 if device.type == "cuda" or torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32)
    paths = [p.strip() for p in args.lora_paths.split(",") if p.strip()]
    if not paths or any(p not in LORA_PATHS for p in paths):
        ap.error(f"--lora-paths takes a comma-separated subset of {LORA_PATHS}, got {args.lora_paths!r}")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    with tempfile.TemporaryDirectory() as tmp:
        # transformers reads the same weights as a 16-bit HF checkpoint written by minqlora.
        base = load_pretrained(args.model, quantize=None, dtype=torch.bfloat16)
        save_pretrained(base, tmp)
        vocab = base.config.vocab_size
        del base
        ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
        ids = ids.to(device)
        modes = [m.strip() for m in args.checkpointing.split(",") if m.strip()]
        steps = {f"minqlora {p}" + (f" ckpt={m}" if modes != ["full"] else ""):
                 functools.partial(minqlora_step, args.model, ids, device, dtype, p, m, args.loss_chunk)
                 for p in paths for m in modes}
        for m in (m.strip() for m in args.hf_checkpointing.split(",") if m.strip()):
            if m not in ("full", "none"):
                ap.error(f"--hf-checkpointing takes full and/or none, got {m!r}")
            name = "transformers+peft+bnb" + ("" if m == "full" else " ckpt=none")
            steps[name] = functools.partial(hf_step, tmp, ids, device, dtype, m == "full")
        results = {}
        for name, build in steps.items():
            torch.manual_seed(0)
            times = time_steps(build(), args.warmup, args.steps, sync,
                               time.process_time if args.cpu_time else time.perf_counter)
            results[name] = statistics.median(times)
            print(f"{name}: {', '.join(f'{t:.3f}' for t in times)} s", flush=True)

    tokens = args.batch * args.seq_len
    print(f"\nQLoRA step, {Path(args.model).name}, batch {args.batch} x {args.seq_len} tokens, {device}, {dtype} "
          f"compute, {torch.get_num_threads()} threads, torch {torch.__version__}, median of {args.steps}"
          f"{' (CPU seconds)' if args.cpu_time else ''}")
    hf = {n: t for n, t in results.items() if n.startswith("transformers")}
    labels = [f"vs {n.removeprefix('transformers+peft+bnb').strip() or 'ckpt=full'}" for n in hf]
    print(f"  {'':38s} {'':24s} {'':15s}  " + "  ".join(labels))  # the ratio columns: vs each transformers row
    for name, t in results.items():
        ratios = "  ".join(f"{theirs / t:6.2f}x" for theirs in hf.values()) if name not in hf else ""
        print(f"  {name:38s} {t:8.3f} s/step  {tokens / t:8.1f} tok/s  {ratios}")


if __name__ == "__main__":
    main()
