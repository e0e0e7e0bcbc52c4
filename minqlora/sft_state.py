"""The on-disk state of an SFT run (sft.py): the output directory, atomic checkpoints, RNG states, the base-model
identity a checkpoint must be resumed on, the Ctrl-C / SIGTERM guard and the loss plot.

Split from sft.py so that file stays the config, the loss and the loop; everything here is about surviving a stop.
The run directory holds adapter/ (the final adapter, nothing else: what one uploads or hands to peft) and, beside it,
checkpoints/, metrics.jsonl, loss.png and train_config.json. A checkpoint is a directory checkpoints/step-N/ holding
the adapter (lora.save_adapter) and trainer_state.pt, written under checkpoints/.tmp-step-N/ and renamed, so a
reader sees a whole checkpoint or none. trainer_state.pt is read
with torch.load(weights_only=True): tensors and plain containers only, never arbitrary pickled objects.

Leaves out: what goes into the trainer state (sft.train builds it), the base checkpoint (checkpoint.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import shutil
import signal
import sys
import threading
from pathlib import Path

import numpy as np
import torch

from .lora import CONFIG_NAME, WEIGHTS_NAME, load_adapter, save_adapter

try:  # optional extra [plot]: without it training runs and only loss.png is missing
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
except ImportError:
    Figure = None

STATE_NAME = "trainer_state.pt"
METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "loss.png"
CONFIG_FILE = "train_config.json"
ADAPTER_DIR = "adapter"  # the final adapter, beside (not above) checkpoints/
# What a run writes; CONFIG_NAME and WEIGHTS_NAME are where runs before adapter/ put the final adapter.
RUN_FILES = (CONFIG_FILE, METRICS_NAME, "checkpoints", PLOT_NAME, ADAPTER_DIR, CONFIG_NAME, WEIGHTS_NAME)
# TrainConfig fields that may change between a run and its resumption: they do not change what is computed.
# host_layers / host_stride / host_prefetch move saved bytes to host memory and back unchanged, embed_on_host gathers
# the same embedding rows on the host (and runs written before them had no such fields).
RESUMABLE_CHANGES = ("model", "data", "eval_data", "tokenizer", "output_dir", "device", "resume", "overwrite",
                     "progress", "dist_backend", "dist_timeout", "host_layers", "host_stride", "host_prefetch",
                     "embed_on_host")


def model_identity(model, path: str, world_size: int = 1) -> dict:
    """What a checkpoint must be resumed on: hashes of the model's config and of its first embedding rows (in bf16,
    so a bf16 and an fp32 load of one checkpoint agree), and the number of ranks (distributed.py: the data shards,
    RNG streams and FSDP2 optimizer shards are per rank). The path is recorded for messages only: models move."""
    config = json.dumps(model.config.to_hf(), sort_keys=True)
    rows = model.model.embed_tokens.weight[:8].detach().to("cpu", torch.bfloat16).view(torch.int16).numpy()
    return {"path": path, "config_sha256": hashlib.sha256(config.encode()).hexdigest(),
            "embedding_sha256": hashlib.sha256(rows.tobytes()).hexdigest(), "world_size": world_size}


def _checkpoints(out: Path) -> list[Path]:
    found = [p for p in (out / "checkpoints").glob("step-*") if p.is_dir() and (p / STATE_NAME).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def check_output_dir(out: Path, config) -> list[str]:
    """The run files already in `out` (RUN_FILES names) after checking that `config` (a TrainConfig) may use it:
    refuses another run unless overwrite, or resume with the same settings (only RESUMABLE_CHANGES may differ).
    Messages name both spellings (--resume / resume=True): the command line calls this before loading a model."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} is a file; the output (--out / output_dir) must be a directory")
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
        raise FileExistsError(f"{out} holds another run ({', '.join(present)}); pass --resume (resume=True) to "
                              "continue it or --overwrite (overwrite=True) to replace it")
    return present


def prepare_output_dir(out: Path, config) -> Path | None:
    """Make `out` ready for the run of `config` (a TrainConfig); return the checkpoint to resume from (None: fresh).

    check_output_dir's rules; with overwrite, that run's files are deleted (nothing else). resume with no
    checkpoint to resume from starts at step 0 and says so on stderr.
    """
    present = check_output_dir(out, config)
    if present and not (config.resume and (out / CONFIG_FILE).is_file()):
        for name in present:
            shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    out.mkdir(parents=True, exist_ok=True)
    for tmp in (out / "checkpoints").glob(".tmp-*"):  # a checkpoint a killed run was writing
        shutil.rmtree(tmp)
    write_atomic(out / CONFIG_FILE, lambda f: f.write(json.dumps(config.to_json(), indent=2).encode()))
    found = _checkpoints(out)
    if config.resume and not found:
        print(f"resume: no checkpoint in {out / 'checkpoints'}; starting from step 0", file=sys.stderr)
    return found[-1] if config.resume and found else None


def write_atomic(path: Path, write) -> None:
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
    write_atomic(tmp / STATE_NAME, lambda f: torch.save(state, f))
    os.replace(tmp, final)
    for old in _checkpoints(out)[:-keep]:
        shutil.rmtree(old)
    return final


def load_checkpoint(path: Path, model, identity: dict) -> dict:
    """Trainer state of checkpoint `path` (tensors only, never arbitrary pickles), after checking it belongs to this
    base model; loads its adapter into `model`."""
    state = torch.load(path / STATE_NAME, map_location="cpu", weights_only=True)
    theirs = state["model"]
    saved_world = theirs.get("world_size", 1)
    if saved_world != identity.get("world_size", 1):
        raise ValueError(f"checkpoint {path} was written by a run of {saved_world} rank(s); this run has "
                         f"{identity.get('world_size', 1)}. Resume with the same number of processes "
                         f"(torchrun --nproc-per-node {saved_world}): per-rank state is not re-sharded")
    for key in ("config_sha256", "embedding_sha256"):
        if theirs[key] != identity[key]:
            raise ValueError(f"checkpoint {path} was trained on another base model ({theirs['path'] or 'in memory'}: "
                             f"{key} {theirs[key][:12]}…) than this one ({identity['path'] or 'in memory'}: "
                             f"{identity[key][:12]}…); refusing to resume")
    load_adapter(model, str(path))
    return state


class Stopped(KeyboardInterrupt):
    """The run stopped on a signal after saving a checkpoint; exit_code is the shell's 128 + signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum, self.exit_code = signum, 128 + signum


class Interrupt:
    """Ctrl-C (SIGINT) and SIGTERM (what `timeout`, schedulers and container runtimes send) set `requested`; the
    loop finishes its step, checkpoints and raises KeyboardInterrupt, which leaves this block as Stopped naming the
    signal. A second signal raises at once (the checkpoint being written is temporary until renamed, so nothing
    breaks)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.requested, self.signum, self.previous = False, None, {}
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise Stopped(f"{signal.Signals(signum).name} again: stopped at once", signum)
        self.requested, self.signum = True, signum

    def __exit__(self, exc_type, exc, tb):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        if exc_type is KeyboardInterrupt and self.signum is not None:
            name = signal.Signals(self.signum).name
            raise Stopped(f"{name}: {exc}" if str(exc) else name, self.signum) from None


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
    write_atomic(png_path, lambda f: fig.savefig(f, format="png"))
    return png_path


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports peak RSS in KiB
