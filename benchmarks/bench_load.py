"""Peak host memory (RSS) while loading a sharded safetensors checkpoint into 4 bits, against the stated bound.

checkpoint.load_pretrained reads one group of tensors at a time (the embedding, one decoder layer, the final norm,
the head), quantizes it on the target device and frees it, so host memory should grow by about the largest group,
not by the model. The bound checked here, over the RSS of the process just before loading:

    peak − before ≤ 4 × largest group (bf16) + the 4-bit model if it lands in host memory (--device cpu) + 256 MiB

4 × the group: the memory-mapped file pages it is read from (counted in RSS until the shard is closed),
safetensors' copy out of the map, the copy in the target dtype and device (on a CPU a second host copy), and the
quantizer's temporaries; 256 MiB: allocator and interpreter slack. Measured on a CPU (2 cores, 1024-wide 24-layer
model, 0.53 GiB of bf16): 0.25 GiB over the baseline with the 0.16 GiB 4-bit model, against a 0.45 GiB bound.
A Llama-3-8B shape's largest group is its 1.05 GB embedding, so loading it onto a GPU should stay under 4.2 GiB
over the baseline (the 4-bit model lives on the GPU), against the checkpoint's 15 GiB.

1. A synthetic Hugging Face checkpoint of the shape is written to --dir unless one is there: bf16, sharded at
   --shard-gb, values N(0, 1/fan_in) drawn once per tensor name and repeated in every layer (for memory the values
   do not matter, and drawing 8 B values would take longer than the load), never more than one shard in memory.
2. A fresh process imports everything, warms the device up, resets its RSS high-water mark (/proc/self/clear_refs),
   loads with quantize="nf4" and reads the mark (VmHWM).

    python3 benchmarks/bench_load.py --shape llama-3-8b --dir /tmp/ckpt-8b --device cuda   # writes 16 GB first
    python3 benchmarks/bench_load.py --shape tiny --hidden 1024 --intermediate 2816 --layers 8 --vocab 8000 \\
        --dir /tmp/ckpt-small --device cpu
Prints one line per phase and, last, "peak ... bound ... within bound: True/False"; --json writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from minqlora import ops
from minqlora.checkpoint import load_pretrained
from minqlora.model import Llama
from minqlora.shapes import SHAPES, shape_config

SLACK = 256 << 20


def layer_groups(config) -> list[dict[str, tuple]]:
    """The checkpoint's tensors as load_pretrained groups them: {name: shape} per group, in file order."""
    with torch.device("meta"):
        model = Llama(config)
    groups: dict[str, dict[str, tuple]] = {}
    for name, p in model.state_dict().items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        key = ".".join(name.split(".")[:3]) if name.startswith("model.layers.") else name.rsplit(".", 1)[0]
        groups.setdefault(key, {})[name] = tuple(p.shape)
    return list(groups.values())


def write_checkpoint(config, out: Path, shard_bytes: int) -> None:
    """A bf16 HF checkpoint of `config` in shards of about shard_bytes; one shard in memory at a time."""
    out.mkdir(parents=True, exist_ok=True)
    drawn: dict[str, torch.Tensor] = {}  # one draw per tensor name with the layer index removed

    def tensor(name: str, shape) -> torch.Tensor:
        key = ".".join(p for p in name.split(".") if not p.isdigit())
        if key not in drawn:
            std = 1.0 if len(shape) == 1 or "embed" in name else shape[1] ** -0.5
            drawn[key] = (torch.ones(shape) if len(shape) == 1 else torch.randn(shape) * std).to(torch.bfloat16)
        return drawn[key]

    shards, current, size = [], {}, 0
    groups = layer_groups(config)
    for i, group in enumerate(groups):
        for name, shape in group.items():
            current[name] = tensor(name, shape).clone()  # safetensors refuses tensors sharing memory
            size += current[name].numel() * 2
        if size >= shard_bytes or i == len(groups) - 1:
            shards.append(current)
            n = len(shards)
            tmp = out / f".shard-{n}.tmp"
            save_file({k: v.contiguous() for k, v in current.items()}, tmp, metadata={"format": "pt"})
            tmp.rename(out / f"model-{n:05d}.safetensors")
            print(f"  wrote shard {n} ({size / 2**30:.2f} GiB)", flush=True)
            shards[-1] = list(current)
            current, size = {}, 0
    weight_map = {k: f"model-{i + 1:05d}.safetensors" for i, keys in enumerate(shards) for k in keys}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    hf = {**config.to_hf(), "torch_dtype": "bfloat16"}
    (out / ".config.tmp").write_text(json.dumps(hf, indent=1))
    (out / ".config.tmp").rename(out / "config.json")  # last: a directory with config.json is complete


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(path: Path, device: torch.device) -> dict:
    """Load `path` in 4 bits onto `device` in this process; RSS numbers in bytes."""
    ops.quantize_4bit(torch.randn(64, 64, device=device, dtype=torch.bfloat16), 64, "nf4", True)  # load kernels
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    before = rss_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        mark = "VmHWM"
    except OSError:
        mark = None
    tick = time.perf_counter()
    model = load_pretrained(path, quantize="nf4", device=device)
    seconds = time.perf_counter() - tick
    peak = rss_kib(mark) if mark else rss_kib("VmHWM")
    on_host = device.type == "cpu"
    model_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    largest = max(sum(torch.Size(s).numel() * 2 for s in g.values()) for g in layer_groups(model.config))
    bf16_total = sum(torch.Size(s).numel() * 2 for g in layer_groups(model.config) for s in g.values())
    bound = 4 * largest + (model_bytes if on_host else 0) + SLACK
    return {"device": str(device), "seconds": round(seconds, 2), "rss_before": before * 1024,
            "peak_over_before": (peak - before) * 1024, "bound": bound, "largest_group": largest,
            "model_4bit_bytes": model_bytes, "checkpoint_bf16_bytes": bf16_total,
            "hwm_reset": mark is not None, "within_bound": (peak - before) * 1024 <= bound}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3-8b", choices=sorted(SHAPES))
    ap.add_argument("--hidden", type=int, help="override hidden_size")
    ap.add_argument("--intermediate", type=int, help="override intermediate_size")
    ap.add_argument("--layers", type=int, help="override num_hidden_layers")
    ap.add_argument("--vocab", type=int, help="override vocab_size")
    ap.add_argument("--dir", required=True, help="checkpoint directory (written if it has no config.json)")
    ap.add_argument("--shard-gb", type=float, default=5.0, help="shard size when writing (GiB)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", help="write the measurement here")
    ap.add_argument("--measure-only", action="store_true", help=argparse.SUPPRESS)  # the fresh child process
    args = ap.parse_args()
    path, device = Path(args.dir), torch.device(args.device)

    if args.measure_only:
        print(json.dumps(measure(path, device)))
        return
    overrides = {k: v for k, v in (("hidden_size", args.hidden), ("intermediate_size", args.intermediate),
                                   ("num_hidden_layers", args.layers), ("vocab_size", args.vocab)) if v}
    if "hidden_size" in overrides:
        overrides.setdefault("num_attention_heads", max(overrides["hidden_size"] // 128, 1))
        overrides.setdefault("num_key_value_heads", max(overrides["num_attention_heads"] // 4, 1))
    config = shape_config(args.shape, **overrides)
    if not (path / "config.json").is_file():
        tick = time.perf_counter()
        print(f"writing a synthetic {args.shape} checkpoint to {path}", flush=True)
        write_checkpoint(config, path, int(args.shard_gb * 2**30))
        print(f"  written in {time.perf_counter() - tick:.1f} s")
    child = subprocess.run([sys.executable, __file__, "--dir", str(path), "--device", str(device), "--measure-only"],
                           capture_output=True, text=True)
    if child.returncode:
        raise SystemExit(f"the loading process failed:\n{child.stderr[-4000:]}")
    r = json.loads(child.stdout.strip().splitlines()[-1])
    gib = 2**30
    print(f"loaded {r['checkpoint_bf16_bytes'] / gib:.2f} GiB of bf16 onto {r['device']} as "
          f"{r['model_4bit_bytes'] / gib:.2f} GiB (4-bit + 16-bit rest) in {r['seconds']} s")
    print(f"peak RSS over before: {r['peak_over_before'] / gib:.3f} GiB; bound {r['bound'] / gib:.3f} GiB "
          f"(4 x largest group {r['largest_group'] / gib:.3f} GiB"
          f"{' + 4-bit model' if r['device'] == 'cpu' else ''} + 0.25); within bound: {r['within_bound']}"
          + ("" if r["hwm_reset"] else " (VmHWM could not be reset: the peak may predate loading)"))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
