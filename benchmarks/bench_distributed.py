"""QLoRA steps under --parallel none, ddp and fsdp2 in one torchrun process group: same losses, tok/s, peak memory.

Each mode builds the same random-weight Llama (seeded; the projections quantized to NF4 + double quantization layer
by layer on the device, so the 16-bit model never exists whole), adds LoRA (r=16, alpha=32, dropout 0, all seven
projections), wraps it as sft.train does (distributed.Parallel.wrap) and runs --steps optimizer steps of the same
batch through sft.token_loss_sum, PagedAdamW and the global-norm clip. It prints each mode's losses, the median
step's tokens/s, the peak memory and the largest loss difference against --parallel none. With one rank the three
must agree to float rounding (DDP and FSDP2 only add collectives over one rank); with N ranks each rank trains on
its share of an N x --batch global batch, so the losses are those of one process at N x --batch.

    torchrun --nproc-per-node 1 benchmarks/bench_distributed.py                # Llama-3-8B shape, 2 x 1024 tokens
    torchrun --nproc-per-node 1 benchmarks/bench_distributed.py --shape tiny --device cpu   # a quick check on a CPU
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch
from torch import nn

from minqlora import distributed
from minqlora.checkpoint import PROJECTIONS
from minqlora.data import Example, collate, shard_batch
from minqlora.linear4bit import Linear4bit
from minqlora.lora import add_lora
from minqlora.model import Llama, LlamaConfig
from minqlora.optim import PagedAdamW
from minqlora.sft import token_loss_sum

SHAPES = {  # Llama-3-8B, and a small one for a CPU
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0),
    "tiny": dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2),
}


def random_qlora_model(config: LlamaConfig, device: torch.device, seed: int) -> Llama:
    """Random bf16 weights (normal, std 0.02) made on `device`, each projection quantized in turn (peak: the bf16
    model, 16 GB for the 8B shape, then its 4-bit form)."""
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("meta"):
        model = Llama(config)
    torch.set_default_dtype(default)
    model.to_empty(device=device)
    model.init_rope(device)
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in PROJECTIONS:
            with torch.no_grad():
                m.weight.normal_(0, 0.02)
            model.set_submodule(name, Linear4bit.from_linear(m, compute_dtype=torch.bfloat16))
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 0.02)
        if model.lm_head.weight is not model.model.embed_tokens.weight:
            model.lm_head.weight.normal_(0, 0.02)
        for n, p in model.named_parameters():
            if "norm" in n:
                p.fill_(1.0)
    model.to(torch.bfloat16)
    return model


def run_mode(mode: str, args, config: LlamaConfig, device: torch.device, batch) -> dict:
    par = distributed.setup(mode, device, timeout_s=600)  # "none": each process alone on the whole global batch
    model = random_qlora_model(config, device, args.seed)
    add_lora(model, r=16, alpha=32, dropout=0.0)
    model.gradient_checkpointing = True
    model.train()
    net = par.wrap(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = par.optimizer(params, lambda ps: PagedAdamW(ps, lr=2e-4))
    tokens = batch.num_label_tokens
    share = shard_batch(batch, par.rank, par.world_size)
    losses, times = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tick = time.perf_counter()
        loss = token_loss_sum(net, share, device, bf16=True) / tokens
        loss.backward()
        par.clip_grad_norm(params, 0.3)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(par.sum(loss.detach()).item())  # SYNC
        times.append(time.perf_counter() - tick)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    result = {"mode": mode, "losses": losses, "tok_s": batch.num_tokens / statistics.median(times[1:] or times),
              "peak_gb": peak}
    del net, optimizer, model, params
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="8b", choices=tuple(SHAPES))
    p.add_argument("--batch", type=int, default=2, help="rows per rank")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    config = LlamaConfig(**SHAPES[args.shape])
    device = distributed.rank_device(args.device, "ddp")
    distributed.setup("ddp", device, timeout_s=600)  # joins torchrun's group once; every mode reuses it
    world = torch.distributed.get_world_size()
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for _ in range(args.batch * world):
        ids = torch.randint(0, config.vocab_size, (args.seq_len,), generator=gen).tolist()
        rows.append([Example(ids, [-100] + ids[1:], "random")])
    batch = collate(rows, pad_id=0)  # the global batch
    results = [run_mode(mode, args, config, device, batch) for mode in ("none", "ddp", "fsdp2")]
    if torch.distributed.get_rank() == 0:
        print(f"{args.shape} shape, {world} rank(s) x {args.batch} x {args.seq_len} tokens, r=16 all projections, "
              f"gradient checkpointing, torch {torch.__version__}")
        ref = results[0]["losses"]
        for r in results:
            diff = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], ref))
            print(f"{r['mode']:>6}: losses {' '.join(f'{x:.6f}' for x in r['losses'])}  {r['tok_s']:,.0f} tok/s  "
                  f"peak {r['peak_gb']:.2f} GB  max relative loss difference vs none {diff:.2e}")
    distributed.shutdown()


if __name__ == "__main__":
    main()
