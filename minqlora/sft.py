"""Supervised fine-tuning: TrainConfig and train(), one loop from a base model and a JSONL file to a LoRA adapter,
with checkpoints that resume exactly.

train(model, tokenizer, config) trains a Llama already in memory (tests, notebooks, cli.py); run(config) first loads
config.model (checkpoint.py: HF directory, bnb-4bit directory or GGUF file, quantized as config.quantize says) and
its tokenizer. What lands in config.output_dir:
  adapter_config.json, adapter_model.safetensors   the final adapter (PEFT format, lora.py)
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

Leaves out: full fine-tuning (only LoRA parameters train), multi-GPU (distributed.py), command-line flags (cli.py),
early stopping.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import resource
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .checkpoint import load_pretrained
from .data import IGNORE_INDEX, BatchLoader, Batch, iter_batches, load_sft_data, make_rows, packed_attention_mask
from .gguf_io import load_tokenizer as load_gguf_tokenizer
from .lora import DEFAULT_TARGETS, WEIGHTS_NAME, CONFIG_NAME, add_lora, load_adapter, lora_modules, save_adapter
from .lora import trainable_summary
from .optim import PagedAdamW
from .tokenizer import Tokenizer

try:  # optional extra [plot]: without it training runs and only loss.png is missing
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
except ImportError:
    Figure = None

STATE_NAME = "trainer_state.pt"
METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "loss.png"
CONFIG_FILE = "train_config.json"
RUN_FILES = (CONFIG_FILE, METRICS_NAME, "checkpoints", PLOT_NAME, CONFIG_NAME, WEIGHTS_NAME)  # what a run writes
# Fields that may change between a run and its resumption: they do not change what is computed.
RESUMABLE_CHANGES = ("model", "data", "eval_data", "tokenizer", "output_dir", "device", "resume", "overwrite",
                     "progress")


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
    # -- LoRA (QLoRA §4 found adapters on every linear layer necessary to match 16-bit fine-tuning)
    lora_r: int = 16  # adapter rank
    lora_alpha: float = 32  # scale alpha / r = 2
    lora_dropout: float = 0.05  # QLoRA §5 / Appendix B: 0.05 for models up to 13B
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS  # all seven projections of every decoder layer
    # -- data
    seq_len: int = 1024  # tokens per example (and per packed row) at most
    prompt_format: str = "auto"  # prompt/completion + Alpaca records: "chat", "plain" or "auto" (data.py)
    overflow: str = "truncate"  # examples over seq_len: "truncate" (counted), "drop" (counted) or "error"
    packing: bool = False  # several examples per row, attending only within themselves (block-diagonal mask)
    eval_fraction: float = 0.05  # share of `data` held out for eval loss when eval_data is None (0: no eval)
    # -- optimisation
    batch_size: int = 4  # rows per micro-batch (one forward/backward)
    grad_accum: int = 4  # micro-batches per optimizer step; effective batch = batch_size * grad_accum rows
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
    precision: str = "auto"  # "auto": bf16 autocast on CUDA, none on CPU; "bf16": autocast anywhere; "fp32": none
    gradient_checkpointing: bool = True  # recompute each decoder layer in backward (QLoRA trains with it)
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
                              ("optim_bits", (32, 8))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"TrainConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("seq_len", "batch_size", "grad_accum", "log_every", "max_bad_steps", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)!r}")
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


def token_loss_sum(model, batch: Batch, device: torch.device, bf16: bool) -> torch.Tensor:
    """Sum of next-token cross-entropies over the batch's trained tokens: an fp32 scalar on `device`.

    Only hidden states that predict a trained token reach lm_head ((N, H) -> (N, V) instead of (B, T, V)): prompts
    and padding cost no vocabulary projection. Those positions are found on the CPU labels, so selecting them on
    the GPU needs no sync. Unpacked rows are right-padded, so plain causal attention (mask None, which lets SDPA
    use its fused kernels) is exact for every real token; packed rows need the block-diagonal mask.
    """
    targets = batch.labels[:, 1:].reshape(-1)  # (B*(T-1),) logits at t predict labels at t+1
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # (N,) on the CPU
    mask = packed_attention_mask(batch.segment_ids).to(device) if batch.packed else None
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        hidden = model.model(batch.input_ids.to(device), attention_mask=mask,
                             position_ids=batch.position_ids.to(device))  # (B, T, H)
        hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, keep.to(device))  # (N, H)
        logits = model.lm_head(hidden)  # (N, V)
    return F.cross_entropy(logits.float(), targets[keep].to(device), reduction="sum")


@torch.no_grad()
def evaluate(model, rows, config: TrainConfig, pad_id: int, device: torch.device, bf16: bool) -> tuple[float, int]:
    """Mean loss per trained token over the eval rows (the first eval_batches micro-batches when set)."""
    model.eval()
    total, tokens = torch.zeros((), device=device), 0
    for i, batch in enumerate(iter_batches(rows, config.batch_size, pad_id)):
        if config.eval_batches and i >= config.eval_batches:
            break
        total += token_loss_sum(model, batch, device, bf16)
        tokens += batch.num_label_tokens
    model.train()
    return total.item() / max(tokens, 1), tokens  # SYNC: one per evaluation


# -- run directory, checkpoints, identity ----------------------------------------------------------------------------

def model_identity(model, path: str) -> dict:
    """What a checkpoint must be resumed on: hashes of the model's config and of its first embedding rows (in bf16,
    so a bf16 and an fp32 load of one checkpoint agree). The path is recorded for messages only: models move."""
    config = json.dumps(model.config.to_hf(), sort_keys=True)
    rows = model.model.embed_tokens.weight[:8].detach().to("cpu", torch.bfloat16).view(torch.int16).numpy()
    return {"path": path, "config_sha256": hashlib.sha256(config.encode()).hexdigest(),
            "embedding_sha256": hashlib.sha256(rows.tobytes()).hexdigest()}


def _checkpoints(out: Path) -> list[Path]:
    found = [p for p in (out / "checkpoints").glob("step-*") if p.is_dir() and (p / STATE_NAME).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def prepare_output_dir(out: Path, config: TrainConfig) -> Path | None:
    """Make `out` ready for this run and return the checkpoint to resume from (None: start fresh).

    Refuses a directory holding another run unless overwrite (then deletes that run's files, nothing else) or
    resume with the same settings (only RESUMABLE_CHANGES may differ).
    """
    present = [name for name in RUN_FILES if (out / name).exists()]
    if present and config.resume and (out / CONFIG_FILE).is_file():
        saved = json.loads((out / CONFIG_FILE).read_text(encoding="utf-8"))
        ours = config.to_json()
        differ = sorted(k for k in ours.keys() | saved.keys()
                        if k not in RESUMABLE_CHANGES and ours.get(k) != saved.get(k))
        if differ:
            raise ValueError(f"cannot resume in {out}: it holds a run with other settings: "
                             + ", ".join(f"{k}={saved.get(k)!r} (now {ours.get(k)!r})" for k in differ))
    elif present and not config.overwrite:
        raise FileExistsError(f"{out} holds another run ({', '.join(present)}); pass resume=True to continue it or "
                              "overwrite=True to replace it")
    elif present:
        for name in present:
            shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    out.mkdir(parents=True, exist_ok=True)
    for tmp in (out / "checkpoints").glob(".tmp-*"):  # a checkpoint a killed run was writing
        shutil.rmtree(tmp)
    _write_atomic(out / CONFIG_FILE, lambda f: f.write(json.dumps(config.to_json(), indent=2).encode()))
    found = _checkpoints(out)
    return found[-1] if config.resume and found else None


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_states() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(out: Path, step: int, model, state: dict, keep: int) -> Path:
    """Adapter + trainer state under checkpoints/.tmp-*, renamed to checkpoints/step-N; prunes to `keep` newest."""
    final = out / "checkpoints" / f"step-{step:08d}"
    if final.exists():  # already saved at this step (the last step was also a checkpoint step)
        return final
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(model, str(tmp))
    _write_atomic(tmp / STATE_NAME, lambda f: torch.save(state, f))
    os.replace(tmp, final)
    for old in _checkpoints(out)[:-keep]:
        shutil.rmtree(old)
    return final


def load_checkpoint(path: Path, model, identity: dict) -> dict:
    """Trainer state of checkpoint `path` (tensors only, never arbitrary pickles), after checking it belongs to this
    base model; loads its adapter into `model`."""
    state = torch.load(path / STATE_NAME, map_location="cpu", weights_only=True)
    theirs = state["model"]
    for key in ("config_sha256", "embedding_sha256"):
        if theirs[key] != identity[key]:
            raise ValueError(f"checkpoint {path} was trained on another base model ({theirs['path'] or 'in memory'}: "
                             f"{key} {theirs[key][:12]}…) than this one ({identity['path'] or 'in memory'}: "
                             f"{identity[key][:12]}…); refusing to resume")
    load_adapter(model, str(path))
    return state


class Interrupt:
    """Ctrl-C (SIGINT) sets `requested`; the loop finishes its step, checkpoints and raises KeyboardInterrupt.
    A second Ctrl-C raises at once (the checkpoint being written is temporary until renamed, so nothing breaks)."""

    def __enter__(self):
        self.requested, self.previous = False, None
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def plot_losses(metrics_path: Path, png_path: Path) -> Path | None:
    """Train and eval loss against step from metrics.jsonl; None without matplotlib."""
    if Figure is None:
        return None
    rows = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines()]
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key, style in (("loss", "-"), ("eval_loss", "o-")):
        points = [(r["step"], r[key]) for r in rows if key in r and "skipped" not in r]
        if points:
            ax.plot(*zip(*points), style, label=key.replace("_", " "), markersize=3)
    ax.set(xlabel="step", ylabel="loss per token", title="minqlora SFT")
    ax.grid(alpha=0.3)
    ax.legend()
    _write_atomic(png_path, lambda f: fig.savefig(f, format="png"))
    return png_path


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports peak RSS in KiB


# -- the loop --------------------------------------------------------------------------------------------------------

def train(model, tokenizer: Tokenizer, config: TrainConfig) -> dict:
    """Fine-tune `model` (a Llama, on its device; LoRA is added when it has none) on config.data.

    Returns {"step", "loss", "eval_loss", "adapter_dir", "train_stats", "eval_stats"}. Raises FloatingPointError
    after config.max_bad_steps consecutive non-finite steps and KeyboardInterrupt after a Ctrl-C checkpoint.
    """
    out = Path(config.output_dir)
    device = next(model.parameters()).device
    # CPU: no autocast by default. The base weights run in their own dtype anyway (Linear4bit computes in its
    # compute_dtype); fp32 activations keep CPU results reproducible, and bf16 autocast gained nothing measurable
    # on the CPU path (see README's CPU numbers).
    bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    identity = model_identity(model, config.model)
    torch.manual_seed(config.seed)  # LoRA init (A) and dropout masks

    data = load_sft_data(config.data, tokenizer, config.seq_len, config.prompt_format, config.overflow,
                         config.eval_data, config.eval_fraction, config.seed)
    pad_id = next(i for i in (tokenizer.pad_id, tokenizer.eos_id, 0) if i is not None)
    loader = BatchLoader(make_rows(data.train, config.seq_len, config.packing, config.seed), config.batch_size,
                         pad_id, seed=config.seed)
    eval_rows = make_rows(data.eval, config.seq_len, config.packing, config.seed)
    total_steps = config.max_steps or math.ceil(config.epochs * len(loader) / config.grad_accum)
    for name, s in (("train", data.train_stats), ("eval", data.eval_stats)):
        if s.truncated or s.dropped:
            print(f"{name} data: {s.truncated} of {s.records} examples truncated to seq_len={config.seq_len}, "
                  f"{s.dropped} dropped (overflow={config.overflow!r}; first dropped: {s.dropped_sources})")

    if not lora_modules(model):
        add_lora(model, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                 targets=config.lora_targets)
    model.gradient_checkpointing = config.gradient_checkpointing
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = PagedAdamW(params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay,
                           optim_bits=config.optim_bits, paging=config.paging)
    print(f"{len(data.train)} train / {len(data.eval)} eval examples, {len(loader.rows)} rows, {total_steps} steps of "
          f"{config.batch_size} x {config.grad_accum} rows; {trainable_summary(model, print_it=False)}")

    step, bad_steps, metrics_offset = 0, 0, 0
    checkpoint = prepare_output_dir(out, config)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, identity)
        optimizer.load_state_dict(state["optimizer"])
        loader.load_state_dict(state["data"])
        set_rng_states(state["rng"])
        step, bad_steps, metrics_offset = state["step"], state["bad_steps"], state["metrics_offset"]
        print(f"resuming from {checkpoint} at step {step}, data position {loader.position}")
    metrics_path = out / METRICS_NAME
    with open(metrics_path, "ab") as f:
        f.truncate(metrics_offset)  # drop lines a killed run wrote after its checkpoint
    metrics = open(metrics_path, "a", encoding="utf-8")

    def log(record: dict) -> None:
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()

    def trainer_state() -> dict:
        metrics.flush()
        os.fsync(metrics.fileno())
        return {"step": step, "bad_steps": bad_steps, "metrics_offset": metrics.tell(),
                "optimizer": optimizer.state_dict(), "data": loader.state_dict(), "rng": rng_states(),
                "scheduler": {"step": step, "total_steps": total_steps, "lr": lr_at(step, total_steps, config)},
                "model": identity, "config": config.to_json()}

    loss = eval_loss = None
    if step == 0 and eval_rows and config.eval_every:
        eval_loss, eval_tokens = evaluate(model, eval_rows, config, pad_id, device, bf16)
        log({"step": 0, "eval_loss": eval_loss, "eval_tokens": eval_tokens})
    bar = tqdm(total=total_steps, initial=step, disable=not config.progress, desc="sft", unit="step")
    with metrics, bar, Interrupt() as interrupt:
        tick = time.perf_counter()
        while step < total_steps:
            lr = lr_at(step, total_steps, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro = [loader.next_batch() for _ in range(config.grad_accum)]  # CPU tensors
            # Normalise by every trained token of the whole step, counted on the CPU (no sync): the gradient is
            # that of one batch of batch_size * grad_accum rows, whatever the split into micro-batches.
            step_tokens = sum(b.num_label_tokens for b in micro)
            loss_sum = torch.zeros((), device=device)
            for batch in micro:
                micro_loss = token_loss_sum(model, batch, device, bf16) / max(step_tokens, 1)
                micro_loss.backward()
                loss_sum += micro_loss.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or math.inf)
            loss, norm = torch.stack([loss_sum, grad_norm.to(device)]).tolist()  # SYNC: one per step
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
                     "tokens_per_s": round(step_real_tokens / (now - tick), 1), "mem_gb": round(_memory_gb(device), 3)})
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{step_real_tokens / (now - tick):.0f}")
            if eval_rows and config.eval_every and (step % config.eval_every == 0 or step == total_steps):
                eval_loss, eval_tokens = evaluate(model, eval_rows, config, pad_id, device, bf16)
                log({"step": step, "eval_loss": eval_loss, "eval_tokens": eval_tokens})
            if (config.checkpoint_every and step % config.checkpoint_every == 0) or interrupt.requested:
                path = save_checkpoint(out, step, model, trainer_state(), config.keep_checkpoints)
                if interrupt.requested:
                    plot_losses(metrics_path, out / PLOT_NAME)
                    raise KeyboardInterrupt(f"interrupted at step {step}; checkpoint saved to {path}")
            tick = time.perf_counter()  # evaluation and checkpoint time stays out of tokens_per_s

        save_checkpoint(out, step, model, trainer_state(), config.keep_checkpoints)
    save_adapter(model, str(out), base_model_name_or_path=config.model or None)
    plot_losses(metrics_path, out / PLOT_NAME)
    print(f"adapter, metrics and loss curve written to {out}")
    return {"step": step, "loss": loss, "eval_loss": eval_loss, "adapter_dir": str(out),
            "train_stats": asdict(data.train_stats), "eval_stats": asdict(data.eval_stats)}


def run(config: TrainConfig) -> dict:
    """Load config.model (quantized per config.quantize) and its tokenizer onto config.device, then train()."""
    device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available() else
                          "cpu" if config.device == "auto" else config.device)
    model = load_pretrained(config.model, quantize=config.quantize, device=device)
    source = Path(config.tokenizer or config.model)
    tokenizer = load_gguf_tokenizer(source) if source.is_file() else Tokenizer.from_pretrained(source)
    return train(model, tokenizer, config)

