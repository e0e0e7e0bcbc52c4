"""Supervised fine-tuning: TrainConfig and train(), one loop from a base model and a JSONL file to a LoRA adapter,
with checkpoints that resume exactly.

train(model, tokenizer, config) trains a Llama already in memory (tests, notebooks, cli.py); run(config) first loads
config.model (checkpoint.py: HF directory, bnb-4bit directory or GGUF file, quantized as config.quantize says) and
its tokenizer. What lands in config.output_dir:
  adapter/            the final adapter (PEFT format, lora.py): adapter_config.json, adapter_model.safetensors
  metrics.jsonl       one JSON object per line: {"step", "loss", "grad_norm", "lr", "tokens", "tokens_per_s",
                      "mem_gb", ...} per optimizer step, {"step", "eval_loss", "eval_tokens"} per evaluation (step 0
                      = before training), {"step", "skipped", ...} for a step dropped for a NaN/Inf loss or gradient
  loss.png            train and eval loss against step
  train_config.json   this run's TrainConfig; marks the directory as holding a run
  checkpoints/step-N/ adapter + trainer_state.pt: optimizer, schedule, RNG states (python, numpy, torch, cuda), data
                      position, step, metrics.jsonl offset, base-model identity; written to a temporary name, renamed

Exact resume: everything a step depends on is either in the checkpoint or a pure function of (config, step): the
data order (data.py: seeded per epoch), the learning rate (lr_at), dropout masks (the restored torch RNG). On a CPU a
resumed run ends with the same adapter bytes as one that never stopped; metrics.jsonl is cut back to the checkpoint's
offset, so the lines a killed run wrote after it are written again once, identically.

Leaves out: how checkpoints, the run directory and RNG states are written (sft_state.py), full fine-tuning (only
LoRA parameters train), how ranks shard and gather (distributed.py), command-line flags (cli.py), early stopping.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import distributed
from .checkpoint import gguf_io, load_pretrained  # gguf_io is None without the optional `gguf` package
from .data import (IGNORE_INDEX, BatchLoader, Batch, iter_batches, load_sft_data, make_rows, packed_attention_mask,
                   shard_batch)
from .checkpointing import checkpoint_mode
from .host_embedding import embed_on_host
from .loss import linear_cross_entropy
from .lora import DEFAULT_TARGETS, add_lora, lora_modules, save_adapter, trainable_summary
from .lora_fused import LORA_PATHS, set_lora_path
from .optim import PagedAdamW
from .sft_state import (ADAPTER_DIR, METRICS_NAME, PLOT_NAME, Interrupt, load_checkpoint, memory_gb, model_identity,
                        plot_losses, prepare_output_dir, rng_states, save_checkpoint, set_rng_states)
from .tokenizer import Tokenizer


@dataclass
class TrainConfig:
    # -- inputs and outputs
    model: str = ""  # base model for run(): HF dir, bnb-4bit dir or GGUF file; recorded in adapter and checkpoints
    data: str = ""  # training JSONL (shapes: data.py)
    output_dir: str = "runs/sft"  # adapter, metrics.jsonl, loss.png, checkpoints/
    eval_data: str | None = None  # held-out JSONL; None: hold out eval_fraction of `data`
    tokenizer: str | None = None  # tokenizer directory for run(); None: the model's directory (or the GGUF's own)
    quantize: str | None = "nf4"  # run(): base projections in "nf4" (QLoRA §3) or "fp4"; None keeps them 16-bit
    device: str = "auto"  # run(): "auto" (cuda when present, else cpu), "cpu", "cuda", "cuda:1", ...
    # -- ranks (torchrun; distributed.py)
    parallel: str = "none"  # "none" (one process), "ddp" (replicated 4-bit base) or "fsdp2" (sharded per layer)
    dist_backend: str = "auto"  # "auto" (nccl on CUDA, gloo on CPU), "gloo" or "nccl"
    dist_timeout: float = 180.0  # seconds a collective may wait before the run fails (a dead or stuck rank)
    # -- LoRA (QLoRA §4 found adapters on every linear layer necessary to match 16-bit fine-tuning)
    lora_r: int = 16  # adapter rank
    lora_alpha: float = 32  # scale alpha / r = 2
    lora_dropout: float = 0.05  # QLoRA Appendix B: 0.05 helped 7B and 13B models
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS  # all seven projections of every decoder layer
    lora_path: str = "fused"  # "fused" (lora_fused.py, peft's math), "shared-dropout" (one mask per input), "reference"
    # -- data
    seq_len: int = 1024  # tokens per example (and per packed row) at most
    prompt_format: str = "auto"  # prompt/completion + Alpaca records: "chat", "plain" or "auto" (data.py)
    overflow: str = "truncate"  # examples over seq_len: "truncate" (counted), "drop" (counted) or "error"
    packing: bool = False  # several examples per row, attending only within themselves (block-diagonal mask)
    eval_fraction: float = 0.05  # share of `data` held out for eval loss when eval_data is None (0: no eval)
    # -- optimisation
    batch_size: int = 4  # rows per micro-batch (one forward/backward) of each rank
    grad_accum: int = 4  # micro-batches per optimizer step; effective batch = ranks * batch_size * grad_accum rows
    max_steps: int = 0  # optimizer steps; 0: epochs * steps per epoch
    epochs: float = 1.0  # passes over the training rows when max_steps is 0
    lr: float = 2e-4  # peak learning rate (QLoRA Appendix B: 2e-4 for 7B and 13B)
    lr_schedule: str = "cosine"  # "cosine" (decay to min_lr_ratio * lr) or "constant" (the QLoRA paper's), after warmup
    warmup_ratio: float = 0.03  # share of max_steps warming up linearly (the common QLoRA recipe)
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    weight_decay: float = 0.0  # decoupled (AdamW) weight decay on the adapters
    betas: tuple[float, float] = (0.9, 0.999)  # Adam moment decays
    eps: float = 1e-8  # Adam epsilon
    optim_bits: int = 32  # optimizer state width: 32 (QLoRA's paged 32-bit AdamW) or 8 (blockwise, optim.py)
    paging: str | None = "managed"  # optimizer state paging on CUDA: "managed", "host" or None (optim.py)
    max_grad_norm: float = 0.3  # clip the global gradient norm (QLoRA Appendix B); 0 disables clipping
    # -- precision and memory
    precision: str = "auto"  # "auto": bf16 autocast on CUDA and for bf16 models on CPU; "bf16": always; "fp32": never
    gradient_checkpointing: bool | str = "full"  # "full": recompute each decoder layer in backward (QLoRA trains
    # so); "selective": also keep attention outputs (no O(T²) recompute); "none" (or False): keep everything
    offload_checkpoints: bool = False  # checkpointed layer inputs to pinned host memory (long context; CUDA)
    keep_last_layers: int = 0  # with checkpointing, the last N decoder layers keep their activations: faster,
    # N layers' activations more memory (spend what the memory budget leaves)
    host_layers: int = 0  # N decoder layers (the first, or every host_stride-th) are not recomputed and keep their
    # activations in pinned host memory, copied out and back on a side stream behind the other layers' compute
    # (host_layers.py; CUDA: the copies cost PCIe time, ~17 ms per 8B-shaped layer at 4 x 2048; with checkpointing,
    # the parked layers may not reach into the last keep_last_layers)
    host_stride: int = 1  # park layers 0, s, 2s, ...: 1 parks a contiguous run whose copies queue on the link; 3 or
    # more gives each copy that many layers' forward to hide behind, so about one layer waits on the GPU at a time
    host_prefetch: int = 4  # a host layer i is brought back when the backward of layer i + N starts: more lead hides
    # more copy time, and with checkpointing each layer back early adds its activations to the peak (host_layers.py)
    embed_on_host: bool = False  # the frozen input embedding's table in pinned host memory, its rows gathered on the
    # CPU and copied in per forward (host_embedding.py): 1.05 GB less on the GPU for Llama-3-8B; not with a tied lm_head
    loss_chunk: int = 512  # rows per piece of the fused head + cross-entropy (loss.py); 0: full logits at once
    # -- bookkeeping
    seed: int = 42  # eval split, data order, packing and LoRA init/dropout
    log_every: int = 1  # write a metrics line every this many steps (skipped steps are always written)
    eval_every: int = 100  # eval loss every this many steps (and before the first and after the last); 0: never
    eval_batches: int = 0  # micro-batches per evaluation; 0: the whole eval set
    checkpoint_every: int = 100  # checkpoint every this many steps (and at the end, and on Ctrl-C); 0: only those
    keep_checkpoints: int = 2  # newest checkpoints kept; older ones are deleted
    max_bad_steps: int = 10  # stop after this many consecutive steps with a NaN/Inf loss or gradient norm
    resume: bool = False  # continue from output_dir's newest checkpoint (start fresh when it has none)
    overwrite: bool = False  # replace another run's files in output_dir instead of refusing
    progress: bool = True  # tqdm progress bar

    def __post_init__(self):
        self.lora_targets, self.betas = tuple(self.lora_targets), tuple(self.betas)
        for name, allowed in (("lr_schedule", ("cosine", "constant")), ("precision", ("auto", "bf16", "fp32")),
                              ("optim_bits", (32, 8)), ("lora_path", LORA_PATHS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"TrainConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("seq_len", "batch_size", "grad_accum", "log_every", "max_bad_steps", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        self.gradient_checkpointing = checkpoint_mode(self.gradient_checkpointing)
        if self.keep_last_layers < 0:
            raise ValueError(f"TrainConfig.keep_last_layers must be >= 0, got {self.keep_last_layers!r}")
        if self.loss_chunk < 0:
            raise ValueError(f"TrainConfig.loss_chunk must be >= 0 (0: full logits), got {self.loss_chunk!r}")
        if not isinstance(self.host_layers, int) or self.host_layers < 0:
            raise ValueError(f"TrainConfig.host_layers must be an int >= 0, got {self.host_layers!r}")
        if not isinstance(self.host_prefetch, int) or self.host_prefetch < 0:
            raise ValueError(f"TrainConfig.host_prefetch must be an int >= 0 (layers of lead), got {self.host_prefetch!r}")
        if not isinstance(self.host_stride, int) or isinstance(self.host_stride, bool) or self.host_stride < 1:
            raise ValueError(f"TrainConfig.host_stride must be an int >= 1 (1: consecutive layers), got "
                             f"{self.host_stride!r}")
        if self.embed_on_host and self.parallel != "none":
            raise ValueError(f"TrainConfig.embed_on_host needs parallel='none', got {self.parallel!r}: DDP and FSDP2 "
                             "keep every parameter on the rank's device, and the host table is a parameter on the CPU")
        if self.host_layers and self.parallel == "fsdp2":
            raise ValueError("TrainConfig.host_layers does not combine with parallel='fsdp2' (the gathered weights "
                             "would be saved as activations and copied); use 'ddp' or host_layers=0")
        if self.offload_checkpoints and self.gradient_checkpointing == "none":
            raise ValueError("TrainConfig.offload_checkpoints needs gradient_checkpointing 'full' or 'selective'")
        if self.max_steps < 0 or self.epochs <= 0:
            raise ValueError(f"TrainConfig needs max_steps >= 0 and epochs > 0, got {self.max_steps}, {self.epochs}")

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))  # tuples -> lists, as read back from train_config.json


# -- numerics --------------------------------------------------------------------------------------------------------

def lr_at(step: int, total_steps: int, config: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup to config.lr over ceil(warmup_ratio * total)
    steps (the first step already at lr / warmup, not 0), then constant or a half cosine down to min_lr_ratio * lr."""
    warmup = math.ceil(config.warmup_ratio * total_steps)
    if step < warmup:
        return config.lr * (step + 1) / warmup
    if config.lr_schedule == "constant":
        return config.lr
    progress = (step - warmup) / max(1, total_steps - warmup)
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def token_loss_sum(model, batch: Batch, device: torch.device, bf16: bool, loss_chunk: int = 0) -> torch.Tensor:
    """Sum of next-token cross-entropies over the batch's trained tokens: an fp32 scalar on `device`.

    Only hidden states that predict a trained token reach lm_head ((N, H) -> (N, V) instead of (B, T, V)): prompts
    and padding cost no vocabulary projection. Those positions are found on the CPU labels, so selecting them on
    the GPU needs no sync. Unpacked rows are right-padded, so plain causal attention (mask None, which lets SDPA
    use its fused kernels) is exact for every real token; packed rows need the block-diagonal mask.
    loss_chunk > 0 (and an nn.Linear head) takes loss.linear_cross_entropy: the same sum, loss_chunk rows of
    logits at a time instead of (N, V) at once; 0 is this readable path.
    """
    targets = batch.labels[:, 1:].reshape(-1)  # (B*(T-1),) logits at t predict labels at t+1
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # (N,) on the CPU
    mask = packed_attention_mask(batch.segment_ids.to(device)) if batch.packed else None  # (B, 1, T, T), built there
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        hidden = model.model(batch.input_ids.to(device), attention_mask=mask,
                             position_ids=batch.position_ids.to(device))  # (B, T, H)
        hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, keep.to(device))  # (N, H)
        if loss_chunk and isinstance(model.lm_head, torch.nn.Linear):
            return linear_cross_entropy(hidden, model.lm_head, targets[keep].to(device), chunk=loss_chunk)
        logits = model.lm_head(hidden)  # (N, V)
    return F.cross_entropy(logits.float(), targets[keep].to(device), reduction="sum")


@torch.no_grad()
def evaluate(model, rows, config: TrainConfig, pad_id: int, device: torch.device, bf16: bool,
             par: distributed.Parallel | None = None) -> tuple[float, int]:
    """Mean loss per trained token over the eval rows (the first eval_batches micro-batches when set). Under
    several ranks, batches are global like the training batches and each rank evaluates its share."""
    par = par or distributed.Parallel()
    model.eval()
    total, tokens = torch.zeros((), device=device), 0
    for i, batch in enumerate(iter_batches(rows, config.batch_size * par.world_size, pad_id)):
        if config.eval_batches and i >= config.eval_batches:
            break
        total += token_loss_sum(model, shard_batch(batch, par.rank, par.world_size), device, bf16, config.loss_chunk)
        tokens += batch.num_label_tokens
    model.train()
    return par.sum(total).item() / max(tokens, 1), tokens  # SYNC: one per evaluation


# -- the loop --------------------------------------------------------------------------------------------------------

def train(model, tokenizer: Tokenizer, config: TrainConfig) -> dict:
    """Fine-tune `model` (a Llama, on its device; LoRA is added when it has none) on config.data.

    Seeds torch's global RNG with config.seed (LoRA init, dropout). Returns {"step", "loss", "eval_loss",
    "adapter_dir", "train_stats", "eval_stats"}. Raises FloatingPointError after config.max_bad_steps consecutive
    non-finite steps and KeyboardInterrupt after a Ctrl-C checkpoint.
    """
    out = Path(config.output_dir)
    device = next(model.parameters()).device
    # "auto" on a CPU follows the model: bf16 weights (run()'s default load) compute under bf16 autocast, fp32
    # weights stay fp32. Measured on this repo's 2-core AMX Xeon, one thread, a SmolLM2-135M-shaped model cut to 6
    # layers, NF4 + LoRA r=16, 8 x 66 tokens: bf16 autocast 340 tok/s, bf16 without autocast 284 (the fp32 LoRA
    # branch casts back and forth), all fp32 159. The loss is computed in fp32 either way.
    bf16 = config.precision == "bf16" or (config.precision == "auto" and (
        device.type == "cuda" or model.model.embed_tokens.weight.dtype == torch.bfloat16))
    par = distributed.setup(config.parallel, device, config.dist_backend, config.dist_timeout)
    identity = model_identity(model, config.model, par.world_size)
    par.check_same("the base model", identity)
    torch.manual_seed(config.seed)  # LoRA init (A) and dropout masks

    data = load_sft_data(config.data, tokenizer, config.seq_len, config.prompt_format, config.overflow,
                         config.eval_data, config.eval_fraction, config.seed)
    pad_id = next(i for i in (tokenizer.pad_id, tokenizer.eos_id, 0) if i is not None)
    # The global batch: every rank draws the same rows_per_rank x ranks and keeps its share (shard_batch).
    loader = BatchLoader(make_rows(data.train, config.seq_len, config.packing, config.seed),
                         config.batch_size * par.world_size, pad_id, seed=config.seed)
    eval_rows = make_rows(data.eval, config.seq_len, config.packing, config.seed)
    total_steps = config.max_steps or math.ceil(config.epochs * len(loader) / config.grad_accum)
    for name, s in (("train", data.train_stats), ("eval", data.eval_stats)):
        if s.truncated or s.dropped:
            print(f"{name} data: {s.truncated} of {s.records} examples truncated to seq_len={config.seq_len}, "
                  f"{s.dropped} dropped (overflow={config.overflow!r}; first dropped: {s.dropped_sources})")

    if not lora_modules(model):
        add_lora(model, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                 targets=config.lora_targets)
    set_lora_path(model, config.lora_path)
    if par.world_size > 1:  # same LoRA init on every rank (above), then a dropout stream of each rank's own
        torch.manual_seed(config.seed + 1_000_003 * par.rank)
    model.gradient_checkpointing = config.gradient_checkpointing
    model.model.offload_checkpoints = config.offload_checkpoints
    model.model.keep_last_layers = config.keep_last_layers
    model.model.host_layers, model.model.host_prefetch = config.host_layers, config.host_prefetch
    model.model.host_stride = config.host_stride
    model.model.host_layer_range()  # host_layers against this model's layer count, now rather than at the first step
    if config.embed_on_host:  # after add_lora froze the table, before the optimizer; frees the GPU copy
        embed_on_host(model)
    model.train()
    summary = trainable_summary(model, print_it=False)
    step, bad_steps, metrics_offset = 0, 0, 0
    checkpoint = par.on_main(prepare_output_dir, out, config)  # rank 0 alone writes into out/
    state = load_checkpoint(checkpoint, model, identity) if checkpoint is not None else None  # adapter: before wrap
    net = par.wrap(model)  # DDP / FSDP2 (distributed.py); what token_loss_sum runs
    params = [p for p in model.parameters() if p.requires_grad]  # after wrap: FSDP2 replaces them by shards
    optimizer = par.optimizer(params, lambda ps: PagedAdamW(
        ps, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay,
        optim_bits=config.optim_bits, paging=config.paging))
    if par.is_main:
        print(f"{len(data.train)} train / {len(data.eval)} eval examples, {len(loader.rows)} rows, {total_steps} "
              f"steps of {par.world_size} x {config.batch_size} x {config.grad_accum} rows; {summary}")
    if state is not None:
        optimizer.load_state_dict(state["optimizer"][par.rank] if config.parallel == "fsdp2" else state["optimizer"])
        loader.load_state_dict(state["data"])
        set_rng_states(state["rng_per_rank"][par.rank] if "rng_per_rank" in state else state["rng"])
        step, bad_steps, metrics_offset = state["step"], state["bad_steps"], state["metrics_offset"]
        if par.is_main:
            print(f"resuming from {checkpoint} at step {step}, data position {loader.position}")
    metrics_path = out / METRICS_NAME
    if par.is_main:
        with open(metrics_path, "ab") as f:
            f.truncate(metrics_offset)  # drop lines a killed run wrote after its checkpoint
    # binary: tell() is the byte offset a checkpoint records; other ranks' lines go nowhere
    metrics = open(metrics_path, "ab") if par.is_main else io.BytesIO()

    def log(record: dict) -> None:
        metrics.write((json.dumps(record) + "\n").encode())
        metrics.flush()

    def trainer_state() -> dict:  # on every rank (it gathers); only rank 0's is written
        metrics.flush()
        if par.is_main:
            os.fsync(metrics.fileno())
        optim = par.gather(optimizer.state_dict()) if config.parallel == "fsdp2" else optimizer.state_dict()
        return {"step": step, "bad_steps": bad_steps, "metrics_offset": metrics.tell(),
                "optimizer": optim, "data": loader.state_dict(), "rng": rng_states(),
                "rng_per_rank": par.gather(rng_states()),
                "scheduler": {"step": step, "total_steps": total_steps, "lr": lr_at(step, total_steps, config)},
                "model": identity, "config": config.to_json()}

    def checkpoint_now() -> Path:
        state = trainer_state()
        with par.whole_adapter(model):
            return par.on_main(save_checkpoint, out, step, model, state, config.keep_checkpoints)

    loss = eval_loss = None
    if step == 0 and eval_rows and config.eval_every:
        eval_loss, eval_tokens = evaluate(net, eval_rows, config, pad_id, device, bf16, par)
        log({"step": 0, "eval_loss": eval_loss, "eval_tokens": eval_tokens})
    bar = tqdm(total=total_steps, initial=step, disable=not (config.progress and par.is_main), desc="sft",
               unit="step")
    with metrics, bar, Interrupt() as interrupt:
        tick = time.perf_counter()
        while step < total_steps:
            lr = lr_at(step, total_steps, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro = [loader.next_batch() for _ in range(config.grad_accum)]  # CPU tensors, global batches
            # Normalise by every trained token of the whole step (all ranks), counted on the CPU (no sync): the
            # gradient is that of one batch of ranks * batch_size * grad_accum rows, however it is split.
            step_tokens = sum(b.num_label_tokens for b in micro)
            loss_sum = torch.zeros((), device=device)
            for i, batch in enumerate(micro):
                with par.no_sync(net, last=i == len(micro) - 1):
                    micro_loss = token_loss_sum(net, shard_batch(batch, par.rank, par.world_size), device, bf16,
                                                config.loss_chunk) / max(step_tokens, 1)
                    micro_loss.backward()
                loss_sum += micro_loss.detach()
            grad_norm = par.clip_grad_norm(params, config.max_grad_norm or math.inf)
            loss, norm = torch.stack([par.sum(loss_sum), grad_norm.to(device)]).tolist()  # SYNC: one per step
            step += 1
            if math.isfinite(loss) and math.isfinite(norm):
                optimizer.step()
                bad_steps = 0
            else:  # skip: the adapters and optimizer state stay as they were
                bad_steps += 1
                log({"step": step, "skipped": "non-finite loss" if not math.isfinite(loss) else
                     "non-finite gradient norm", "loss": str(loss), "grad_norm": str(norm), "lr": lr})
                tqdm.write(f"step {step}: {loss=} grad_norm={norm}; step skipped ({bad_steps} in a row)")
            optimizer.zero_grad(set_to_none=True)
            if bad_steps >= config.max_bad_steps:
                raise FloatingPointError(f"stopping at step {step}: {bad_steps} consecutive steps with a NaN/Inf loss "
                                         f"or gradient norm (max_bad_steps={config.max_bad_steps}); lower lr?")
            now = time.perf_counter()
            step_real_tokens = sum(b.num_tokens for b in micro)
            if bad_steps == 0 and (step % config.log_every == 0 or step == total_steps):
                epoch, index = loader.position
                log({"step": step, "epoch": round(epoch + index / len(loader), 4), "loss": loss, "grad_norm": norm,
                     "lr": lr, "tokens": step_real_tokens, "label_tokens": step_tokens,
                     "tokens_per_s": round(step_real_tokens / (now - tick), 1), "mem_gb": round(memory_gb(device), 3)})
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{step_real_tokens / (now - tick):.0f}")
            if eval_rows and config.eval_every and (step % config.eval_every == 0 or step == total_steps):
                eval_loss, eval_tokens = evaluate(net, eval_rows, config, pad_id, device, bf16, par)
                log({"step": step, "eval_loss": eval_loss, "eval_tokens": eval_tokens})
            interrupted = par.any(interrupt.requested)  # every rank stops at the same step
            if (config.checkpoint_every and step % config.checkpoint_every == 0) or interrupted:
                path = checkpoint_now()
                if interrupted:
                    par.on_main(plot_losses, metrics_path, out / PLOT_NAME)
                    raise KeyboardInterrupt(f"interrupted at step {step}; checkpoint saved to {path}")
            tick = time.perf_counter()  # evaluation and checkpoint time stays out of tokens_per_s

        checkpoint_now()
    with par.whole_adapter(model):
        par.on_main(save_adapter, model, str(out / ADAPTER_DIR), config.model or None)
    par.on_main(plot_losses, metrics_path, out / PLOT_NAME)
    if par.is_main:
        print(f"adapter, metrics and loss curve written to {out}")
    return {"step": step, "loss": loss, "eval_loss": eval_loss, "adapter_dir": str(out / ADAPTER_DIR),
            "train_stats": asdict(data.train_stats), "eval_stats": asdict(data.eval_stats)}


def run(config: TrainConfig) -> dict:
    """Load config.model (quantized per config.quantize) and its tokenizer onto config.device, then train()."""
    device = distributed.rank_device(config.device, config.parallel)
    # Ranks join before loading: under FSDP2 each quantizes only its own rows (train() reuses the group).
    par = distributed.setup(config.parallel, device, config.dist_backend, config.dist_timeout)
    model = load_pretrained(config.model, quantize=config.quantize, device=device, shard=par.row_shard())
    source = Path(config.tokenizer or config.model)
    if source.is_file() and gguf_io is None:
        raise ImportError(f"{source} is a GGUF file: its tokenizer needs the `gguf` package (pip install "
                          "'minqlora[gguf]')")
    tokenizer = gguf_io.load_tokenizer(source) if source.is_file() else Tokenizer.from_pretrained(source)
    return train(model, tokenizer, config)

