"""Decode tokens/s of a random-weight Llama-3-8B-shaped model: minqlora against transformers + bitsandbytes.

Rows, each at batch 1 and 8, all in one process on the same GPU:
- minqlora NF4 + double quant, the decode step in a CUDA graph ("graph") and without one ("static": the same
  static-cache step launched kernel by kernel from Python), optionally through torch.compile (--compile);
- with --lm-head-4bit, the same NF4 + DQ graph decode once more with the Decoder's NF4 + DQ copy of the bf16 lm_head
  (decode.py's lm_head_4bit: 0.27 GB read per token instead of 1.05 GB at the 8B shape), its ratio to the bf16 head;
- minqlora NF4 + DQ with an unmerged LoRA adapter (r=16, all seven projections, float32 A/B as add_lora makes them)
  through the fused branch (lora_fused.py), as the CLI runs adapters, and on a GPU once more with the few-row
  LoRA decode kernels (lora_fused.DECODE_KERNELS) switched the other way;
- minqlora bf16 (16 GB), CUDA graph;
- transformers `generate` with bitsandbytes NF4 + DQ Linear4bit layers (its default dynamic cache).

Every model is built directly on the GPU, one decoder layer at a time: the layer is made in bf16 with random
weights, its seven projections are quantized as they are made and the bf16 copy freed, so the 4-bit model (about 5.7
GB with the bf16 embedding and head) never exists in 16 bits. Greedy decoding of a 16-token random prompt for
--new-tokens tokens with no stop id; the wall time of the whole call (prefill included), median of --runs after one
untimed call (which also captures the graphs). tokens/s = batch · new tokens / time.

    python3 benchmarks/bench_generate.py            # GPU, 8B shape, 256 new tokens, median of 5
    python3 benchmarks/bench_generate.py --quick    # GPU, 64 new tokens, median of 2
    python3 benchmarks/bench_generate.py --quick --lm-head-4bit --skip-bf16   # the 4-bit head against the bf16 one
    .venv/bin/python benchmarks/bench_generate.py --cpu --tiny   # a tiny shape on the CPU, to check it runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import bitsandbytes as bnb
import torch
import transformers
from torch import nn
from transformers.models.llama import modeling_llama

from minqlora.decode import Decoder
from minqlora.generate import GenerationConfig, generate
from minqlora.linear4bit import Linear4bit
from minqlora.lora import DEFAULT_TARGETS, add_lora
from minqlora import lora_fused
from minqlora.lora_fused import set_lora_path
from minqlora.model import DecoderLayer, Llama, LlamaConfig

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, rms_norm_eps=1e-5,
                 max_position_embeddings=8192, bos_token_id=128000, eos_token_id=128001)
TINY = dict(LLAMA3_8B, vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
PROMPT_LEN = 16


# -- building the models layer by layer ---------------------------------------------------------------------------

def minqlora_model(cfg: LlamaConfig, device: torch.device, quantize: bool) -> Llama:
    """Llama on `device` in bf16, its projections NF4 + DQ when `quantize`, built one decoder layer at a time."""
    with torch.device("meta"):
        model = Llama(cfg)
    with torch.device(device):
        model.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=torch.bfloat16)
        model.model.norm.weight = nn.Parameter(torch.ones(cfg.hidden_size, dtype=torch.bfloat16))
        model.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=torch.bfloat16)
        for i in range(cfg.num_hidden_layers):
            layer = DecoderLayer(cfg, i).to(torch.bfloat16)  # random (nn.Linear's init), about 0.4 GB in bf16
            if quantize:
                for name in DEFAULT_TARGETS:
                    lin = layer.get_submodule(_path(name))
                    layer.set_submodule(_path(name), Linear4bit.from_linear(lin, compute_dtype=torch.bfloat16))
                    del lin  # the bf16 weight goes once the layer no longer holds it
            model.model.layers[i] = layer
    model.init_rope(device)
    return model.requires_grad_(False).eval()


def hf_bnb_model(cfg: LlamaConfig, device: torch.device) -> transformers.LlamaForCausalLM:
    """transformers' LlamaForCausalLM, bitsandbytes NF4 + DQ projections, built one decoder layer at a time."""
    hf_cfg = transformers.LlamaConfig(**cfg.to_hf())
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(hf_cfg)
    with torch.device(device):
        hf.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=torch.bfloat16)
        hf.model.norm = modeling_llama.LlamaRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps).to(torch.bfloat16)
        hf.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=torch.bfloat16)
        hf.model.rotary_emb = modeling_llama.LlamaRotaryEmbedding(hf_cfg)
        for i in range(cfg.num_hidden_layers):
            layer = modeling_llama.LlamaDecoderLayer(hf_cfg, i).to(torch.bfloat16)
            for name in DEFAULT_TARGETS:
                lin = layer.get_submodule(_path(name))
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.bfloat16,
                                      compress_statistics=True, quant_type="nf4", device="meta")
                # Params4bit quantizes when moved to a device (bitsandbytes' own loading path).
                q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=True,
                                             quant_type="nf4", blocksize=64, module=q).to(device)
                layer.set_submodule(_path(name), q)
                del lin
            hf.model.layers[i] = layer
    hf.config.dtype = torch.bfloat16
    return hf.requires_grad_(False).eval()


def _path(name: str) -> str:
    return ("self_attn." if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp.") + name


# -- timing ---------------------------------------------------------------------------------------------------------

def timed(run, runs: int, device: torch.device) -> float:
    """Median wall time of `run()` over `runs` calls after one untimed call (graph capture, cuBLAS warm-up)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    run()
    times = []
    for _ in range(runs):
        sync()
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def minqlora_run(model: Llama, ids: torch.Tensor, new: int, mode: str, lm_head_4bit: bool = False):
    config = GenerationConfig(max_new_tokens=new, decode=mode)
    decoder = None if mode == "eager" else Decoder(model, ids.shape[0], ids.shape[1] + new, mode,
                                                   lm_head_4bit=lm_head_4bit)

    def run():
        out = generate(model, ids, config, decoder=decoder)
        assert out.shape == (ids.shape[0], ids.shape[1] + new)
        return out

    return run


def hf_run(hf, ids: torch.Tensor, new: int):
    mask = torch.ones_like(ids)

    def run():
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new, min_new_tokens=new,
                              pad_token_id=0, eos_token_id=None)
        assert out.shape == (ids.shape[0], ids.shape[1] + new)
        return out

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (graph rows become the eager readable loop)")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer, 256-wide model instead of the 8B shape")
    ap.add_argument("--quick", action="store_true", help="64 new tokens, median of 2 (default: --new-tokens, --runs)")
    ap.add_argument("--new-tokens", type=int, default=256, help="tokens generated per row (default 256)")
    ap.add_argument("--runs", type=int, default=5, help="timed calls per row, median reported (default 5)")
    ap.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default 1,8)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(mode='reduce-overhead')")
    ap.add_argument("--lm-head-4bit", action="store_true",
                    help="also time NF4+DQ decode with the Decoder's 4-bit copy of the lm_head (decode.py)")
    ap.add_argument("--skip-bf16", action="store_true", help="leave out the bf16 model (16 GB at the 8B shape)")
    ap.add_argument("--out", help="also write the results as JSON here")
    args = ap.parse_args()
    device = torch.device("cpu" if args.cpu else "cuda")
    new, runs = (64, 2) if args.quick else (args.new_tokens, args.runs)
    batches = [int(b) for b in args.batches.split(",")]
    cfg = LlamaConfig(**(TINY if args.tiny else LLAMA3_8B))
    fast = "static" if device.type == "cpu" else "graph"
    ids = {b: torch.randint(0, cfg.vocab_size, (b, PROMPT_LEN), generator=torch.Generator().manual_seed(b)).to(device)
           for b in batches}
    results: dict[tuple[str, int], float] = {}

    def measure(name: str, make_run) -> None:
        for b in batches:
            results[name, b] = timed(make_run(ids[b]), runs, device)
            print(f"  {name:34s} batch {b}: {b * new / results[name, b]:9.1f} tok/s", flush=True)

    torch.manual_seed(0)
    model = minqlora_model(cfg, device, quantize=True)
    nf4_gb = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())) / 1e9
    print(f"minqlora NF4 + DQ model: {nf4_gb:.3f} GB on {device}", flush=True)
    modes = [fast, "static" if fast == "graph" else "eager"] + (["compile"] if args.compile else [])
    for mode in modes:
        measure(f"minqlora NF4+DQ {mode}", lambda x, m=mode: minqlora_run(model, x, new, m))
    head4 = f"minqlora NF4+DQ {fast}, 4-bit head"
    if args.lm_head_4bit:  # before add_lora: the same base model, only the head differs
        measure(head4, lambda x: minqlora_run(model, x, new, fast, lm_head_4bit=True))
    add_lora(model, r=16, alpha=32, dropout=0.0)
    set_lora_path(model, "fused")  # what training and the CLI use: one x·Aᵀ per shared input, casts kept (lora_fused.py)
    measure(f"minqlora NF4+DQ + LoRA r=16 {fast}", lambda x: minqlora_run(model, x, new, fast))
    if device.type == "cuda":  # the same adapter through cuBLAS + addmm_ instead of the few-row decode kernels
        kernels, lora_fused.DECODE_KERNELS = lora_fused.DECODE_KERNELS, not lora_fused.DECODE_KERNELS
        measure(f"minqlora NF4+DQ + LoRA r=16 {fast}, decode kernels {'on' if not kernels else 'off'}",
                lambda x: minqlora_run(model, x, new, fast))
        lora_fused.DECODE_KERNELS = kernels
    del model
    if not args.skip_bf16:
        model = minqlora_model(cfg, device, quantize=False)
        measure(f"minqlora bf16 {fast}", lambda x: minqlora_run(model, x, new, fast))
        del model
    hf = hf_bnb_model(cfg, device)
    measure("transformers + bitsandbytes NF4+DQ", lambda x: hf_run(hf, x, new))
    del hf

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    env = f"{gpu}, torch {torch.__version__}, transformers {transformers.__version__}, bitsandbytes {bnb.__version__}"
    shape = "tiny" if args.tiny else "Llama-3-8B"
    speed = {key: key[1] * new / t for key, t in results.items()}  # tokens/s
    names = list(dict.fromkeys(name for name, _ in results))
    hf_name, nf4 = "transformers + bitsandbytes NF4+DQ", f"minqlora NF4+DQ {fast}"
    print(f"\nGreedy decode, {shape} shape, random weights, prompt {PROMPT_LEN} + {new} new tokens, median of "
          f"{runs}; {env}")
    ratios = {f"NF4 {fast} / NF4 {modes[1]}": f"minqlora NF4+DQ {modes[1]}", "NF4 / bf16": f"minqlora bf16 {fast}"}
    for b in batches:
        line = [f"{label} {speed[nf4, b] / speed[other, b]:.2f}x" for label, other in ratios.items()
                if (other, b) in speed]
        if (head4, b) in speed:
            line.append(f"4-bit head / bf16 head {speed[head4, b] / speed[nf4, b]:.2f}x")
        for name in names:
            if name.startswith("minqlora NF4+DQ + LoRA"):
                line.append(f"{name[len('minqlora NF4+DQ + '):]} / NF4 {speed[name, b] / speed[nf4, b]:.2f}x")
        if b != batches[0]:
            line.append(f"tok/s of batch {b} / batch {batches[0]} {speed[nf4, b] / speed[nf4, batches[0]]:.2f}x")
        print(f"  batch {b}: " + ", ".join(line))
    print(f"\n| stack | {' | '.join(f'batch {b} tok/s | vs transformers+bnb' for b in batches)} |")
    print("|---|" + "---:|---:|" * len(batches))
    for name in names:
        cells = [f"{speed[name, b]:.1f} | {speed[name, b] / speed[hf_name, b]:.2f}x" for b in batches]
        print(f"| {name} | {' | '.join(cells)} |")
    if args.out:
        rows = [{"stack": n, "batch": b, "seconds": t, "tokens_per_s": speed[n, b]} for (n, b), t in results.items()]
        Path(args.out).write_text(json.dumps({"env": env, "shape": shape, "new_tokens": new, "runs": runs,
                                              "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
