"""Multi-process training (distributed.py, fsdp4bit.py) on CPUs: gloo, 2 ranks launched by torchrun.

- DDP over 2 ranks at batch B trains the same LoRA weights as one process at batch 2B (dropout 0, fp32, relative
  2e-5), FSDP2 the same as DDP, and the adapter files match the one-process file, on a tiny random Llama (with a
  global batch of one row, so a rank trains on an empty share) and on the real SmolLM2-135M the demo uses.
- Killing one rank ends the run with a non-zero exit within 3 minutes; the run resumes with the same number of
  ranks to the uninterrupted run's adapter; another number of ranks is refused.
- Bad input: --parallel fsdp2 on a model whose layers cannot be sharded, NCCL on CPUs, --parallel without torchrun,
  LoRA outside the decoder layers: each a clear error.
- In one process: shard_batch's shares and Packed4bit's row ops (what FSDP2 calls), ShardableLinear4bit == Linear4bit.
Leaves out the GPU (tests/cuda/test_distributed_cuda.py) and more than one machine.
"""

import dataclasses
import json
import os
import runpy
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minqlora import cli, distributed, fsdp4bit, layout
from minqlora.checkpoint import save_pretrained
from minqlora.data import IGNORE_INDEX, collate, shard_batch, tokenize_record
from minqlora.linear4bit import Linear4bit
from minqlora.lora import CONFIG_NAME, WEIGHTS_NAME
from minqlora.sft_state import ADAPTER_DIR
from minqlora.model import Llama
from minqlora.tokenizer import Tokenizer
from test_sft_helpers import counting_records, one_thread, sentencepiece_dir, tiny_model, write_jsonl  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node"]
DRIVER = """
import copy, json, os, signal, sys
import torch
from minqlora import distributed
from minqlora.checkpoint import load_pretrained
from minqlora.cli_commands import load_tokenizer
from minqlora.sft import TrainConfig, train

torch.set_num_threads(1)
specs, kill_rank, kill_at = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
configs = [TrainConfig(**{k: v for k, v in c.items() if k != "load_rows"}) for c in specs]
rank, calls = int(os.environ.get("RANK", 0)), 0

def hook(module, args):  # counts training forwards of the decoder stack; SIGKILLs rank kill_rank at call kill_at
    global calls
    if type(module).__name__.endswith("LlamaModel") and module.training:
        calls += 1
        if rank == kill_rank and calls == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

torch.nn.modules.module.register_module_forward_pre_hook(hook)
first = configs[0]
tokenizer = load_tokenizer(first.model, first.tokenizer)
device = distributed.rank_device(first.device, first.parallel)
base = load_pretrained(first.model, quantize="nf4", device=device, dtype=torch.float32)  # fp32 throughout
try:
    for spec, config in zip(specs, configs):  # one after another in the same process group
        if spec.get("load_rows"):  # as sft.run loads for FSDP2: each rank quantizes only its own rows
            par = distributed.setup(config.parallel, device, config.dist_backend, config.dist_timeout)
            model = load_pretrained(config.model, quantize="nf4", device=device, dtype=torch.float32,
                                    shard=par.row_shard())
        else:
            model = copy.deepcopy(base)  # a fresh copy of the base loaded whole
        train(model, tokenizer, config)
finally:
    distributed.shutdown()
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama with a sentencepiece tokenizer, its data (21 training rows after the eval split: the
    last global batch of 4 holds one row) and the driver script."""
    root = tmp_path_factory.mktemp("dist")
    tok_dir = sentencepiece_dir(root)
    save_pretrained(tiny_model(Tokenizer.from_pretrained(tok_dir).vocab_size), root / "model")
    write_jsonl(root / "train.jsonl", counting_records(24))
    (root / "driver.py").write_text(DRIVER)
    return root


def settings(root: Path, out: str, parallel: str, batch: int, **extra) -> dict:
    """TrainConfig fields of a short fp32 run. eps=1: Adam's step is then nearly lr x gradient. With the usual
    eps=1e-8 it is +-lr for any gradient element however small, so an element whose gradient is at float rounding
    level (a sum that cancels) moves by a different +-lr under any other summation order: the weights would compare
    the rounding of such sums, not whether the ranks computed the one-process gradient."""
    base = dict(model=str(root / "model"), tokenizer=str(root), data=str(root / "train.jsonl"),
                output_dir=str(root / out), device="cpu", parallel=parallel, precision="fp32", seq_len=64,
                batch_size=batch, grad_accum=2, max_steps=3, lr=0.1, eps=1.0, lora_r=4, lora_dropout=0.0,
                eval_fraction=0.1, eval_every=2, eval_batches=1, checkpoint_every=1, progress=False)
    return {**base, **extra}


def launch(root: Path, cfgs: list[dict], ranks: int = 0, kill: tuple[int, int] = (-1, 0), timeout: int = 300):
    """The driver (runs `cfgs` in turn) in one plain process (ranks=0) or under torchrun with `ranks` processes."""
    cmd = (TORCHRUN + [str(ranks)] if ranks else [sys.executable]) + [str(root / "driver.py"), json.dumps(cfgs),
                                                                       *map(str, kill)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ,
                                                                                     "OMP_NUM_THREADS": "1"})


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / ADAPTER_DIR / WEIGHTS_NAME)


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r.get("loss", r.get("eval_loss")) for r in rows]


def assert_same_adapter(a: Path, b: Path, rtol: float = 2e-5) -> None:
    """Same PEFT config file, same keys/shapes/dtypes, values within rtol of the larger weights."""
    assert (a / ADAPTER_DIR / CONFIG_NAME).read_text() == (b / ADAPTER_DIR / CONFIG_NAME).read_text()
    wa, wb = adapter(a), adapter(b)
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        assert wa[k].shape == wb[k].shape and wa[k].dtype == wb[k].dtype, k
        torch.testing.assert_close(wa[k], wb[k], rtol=rtol, atol=rtol * float(wb[k].abs().max()), msg=k)
    assert any(float(w.abs().max()) > 0 for k, w in wb.items() if "lora_B" in k)  # training moved B off zero


def check_ok(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.fixture(scope="module")
def runs(tiny):
    """One process at batch 4; then DDP and FSDP2, 2 ranks at batch 2 each, in one torchrun launch."""
    check_ok(launch(tiny, [settings(tiny, "one", "none", batch=4)]))
    check_ok(launch(tiny, [settings(tiny, mode, mode, batch=2) for mode in ("ddp", "fsdp2")]
                    + [settings(tiny, "fsdp2-rows", "fsdp2", batch=2, load_rows=True)], ranks=2))
    return tiny


def test_ddp_and_fsdp2_match_one_process(runs):
    tiny = runs
    for mode in ("ddp", "fsdp2", "fsdp2-rows"):  # fsdp2-rows: each rank loaded and quantized only its rows
        assert_same_adapter(tiny / mode, tiny / "one")
        torch.testing.assert_close(losses(tiny / mode), losses(tiny / "one"), rtol=2e-5, atol=0)
        # rank 0 alone wrote: one metrics line per step and evaluation, one checkpoint per saving step
        assert len(losses(tiny / mode)) == len(losses(tiny / "one")) == 3 + 3
        assert sorted(p.name for p in (tiny / mode / "checkpoints").iterdir()) == ["step-00000002",
                                                                                   "step-00000003"]
    assert_same_adapter(tiny / "fsdp2", tiny / "ddp")
    assert_same_adapter(tiny / "fsdp2-rows", tiny / "fsdp2", rtol=0)  # the same bytes, the same arithmetic


def test_killed_rank_ends_the_run_and_resumes_with_the_same_ranks(runs):
    tiny = runs
    cfg = settings(tiny, "ddp-kill", "ddp", batch=2)  # the "ddp" run of `runs` in another directory
    tick = time.monotonic()
    killed = launch(tiny, [cfg], ranks=2, kill=(1, 5), timeout=180)  # rank 1, first micro-batch of step 3
    assert killed.returncode != 0 and time.monotonic() - tick < 180
    assert "Signal 9 (SIGKILL)" in killed.stderr and "local_rank: 1" in killed.stderr, killed.stderr[-3000:]
    assert sorted(p.name for p in (tiny / "ddp-kill" / "checkpoints").iterdir())[-1] == "step-00000002"

    other = launch(tiny, [{**cfg, "resume": True}], ranks=1)  # one rank instead of two: refused
    assert other.returncode != 0
    assert "written by a run of 2 rank(s); this run has 1" in other.stderr, other.stderr[-3000:]

    resumed = launch(tiny, [{**cfg, "resume": True}], ranks=2)
    check_ok(resumed)
    assert "resuming from" in resumed.stdout
    assert adapter(tiny / "ddp-kill").keys() == adapter(tiny / "ddp").keys()
    for k, w in adapter(tiny / "ddp").items():
        assert torch.equal(adapter(tiny / "ddp-kill")[k], w), k  # exactly the uninterrupted run
    assert losses(tiny / "ddp-kill") == losses(tiny / "ddp")


def test_fsdp2_refuses_layers_it_cannot_shard(tiny):
    """hidden_size 40: half of q_proj's rows hold 20 x 40 = 800 values, not a whole number of 64-blocks."""
    config = tiny_model(Tokenizer.from_pretrained(tiny).vocab_size).config
    torch.manual_seed(0)
    save_pretrained(Llama(dataclasses.replace(config, hidden_size=40, head_dim=None)), tiny / "model40")
    proc = subprocess.run(TORCHRUN + ["2", "-m", "minqlora", "finetune", "--model", str(tiny / "model40"),
                                      "--tokenizer", str(tiny), "--data", str(tiny / "train.jsonl"), "--out",
                                      str(tiny / "bad"), "--device", "cpu", "--parallel", "fsdp2", "--steps", "1",
                                      "--seq-len", "32", "--no-progress"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    # found while loading: each rank would quantize only its own rows (sft.run, fsdp4bit.RowShard)
    assert ("--parallel fsdp2: model.layers.0.self_attn.q_proj (40x40, blocksize 64) cannot be split into 2 "
            "shards") in proc.stderr, proc.stderr[-3000:]
    assert not (tiny / "bad" / ADAPTER_DIR / WEIGHTS_NAME).exists()


def test_bad_input_in_one_process(tiny, monkeypatch, capsys):
    common = ["finetune", "--model", str(tiny / "model"), "--tokenizer", str(tiny), "--data",
              str(tiny / "train.jsonl"), "--out", str(tiny / "never"), "--device", "cpu", "--steps", "1"]
    for var in distributed.TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)
    assert cli.main(common + ["--parallel", "ddp"]) == 2
    assert "--parallel ddp runs one process per rank under torchrun" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")  # as torchrun sets them; setup refuses before joining any group
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    assert cli.main(common + ["--parallel", "ddp", "--dist-backend", "nccl"]) == 2
    assert "--dist-backend nccl needs CUDA devices, but this run trains on cpu" in capsys.readouterr().err
    model = tiny_model(64)
    model.lm_head.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="--parallel fsdp2: trainable parameters outside the decoder layers"):
        distributed.check_trainable_in_layers(model, "fsdp2")


def test_shard_batch_splits_the_global_batch(tiny):
    tok = Tokenizer.from_pretrained(tiny)
    rows = [[tokenize_record(r, tok)] for r in counting_records(5)]
    batch = collate(rows, pad_id=0)
    shares = [shard_batch(batch, r, 2) for r in range(2)]
    assert [s.input_ids.shape[0] for s in shares] == [2, 3]
    assert sum(s.num_label_tokens for s in shares) == batch.num_label_tokens
    assert sum(s.num_tokens for s in shares) == batch.num_tokens
    for s, lo in zip(shares, (0, 2)):
        width = s.input_ids.shape[1]
        assert torch.equal(s.input_ids, batch.input_ids[lo:lo + s.input_ids.shape[0], :width])
        assert torch.equal(batch.attention_mask[lo:lo + s.input_ids.shape[0], width:].sum(), torch.tensor(0))
    one = collate(rows[:1], pad_id=0)
    empty, full = shard_batch(one, 0, 2), shard_batch(one, 1, 2)
    assert full.num_label_tokens == one.num_label_tokens and empty.num_label_tokens == 0
    assert (empty.labels == IGNORE_INDEX).all() and empty.input_ids.shape[0] == 1


def test_packed4bit_row_ops_and_forward():
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 8, bias=True)
    for double_quant in (True, False):
        q = Linear4bit.from_linear(lin, double_quant=double_quant, compute_dtype=torch.float32)
        w = fsdp4bit.Packed4bit.from_linear4bit(q)
        assert w.shape == (8, 128) and w.dtype == torch.uint8 and w.rows == 8
        halves = torch.chunk(w, 2, dim=0)  # what fully_shard does to it
        assert [h.rows for h in halves] == [4, 4]
        padded = halves[1].new_zeros((4, 128))
        padded.narrow(0, 0, 4).copy_(halves[1])
        assert torch.equal(padded.codes, q.weight.view(-1)[256:]) and torch.equal(padded.absmax, q.weight_absmax[8:])
        (first,), meta = halves[0].fsdp_pre_all_gather(None)
        (second,), _ = padded.fsdp_pre_all_gather(None)
        assert first.dtype == torch.uint8  # float32 absmax travels as its bytes
        gathered = torch.cat([first, second])  # what the all-gather hands back: rank 0's bytes, then rank 1's
        whole, _ = halves[0].fsdp_post_all_gather((gathered,), meta, torch.uint8)
        assert torch.equal(whole.codes, q.weight.view(-1)) and torch.equal(whole.absmax, q.weight_absmax)
        whole.codes.zero_()
        halves[0].fsdp_post_all_gather((gathered,), meta, torch.uint8, out=whole)  # later gathers refill in place
        assert torch.equal(whole.codes, q.weight.view(-1))
        x = torch.randn(3, 128)
        shardable = fsdp4bit.ShardableLinear4bit(q)
        assert torch.equal(shardable(x), q(x))
    with pytest.raises(ValueError, match="cannot be split into 3 shards"):
        fsdp4bit.check_shardable(torch.nn.Sequential(q), 3)
    # a weight held in decode tiles (layout.py) shards as the same rows
    q = Linear4bit.from_linear(torch.nn.Linear(128, 16, bias=False))
    rows = q.weight.clone()
    q._buffers["weight"] = layout.to_tiles(rows, (16, 128))
    assert torch.equal(fsdp4bit.Packed4bit.from_linear4bit(q).codes, rows.view(-1))


def test_quantize_rows_gives_the_one_process_bytes():
    """Two ranks' quantize_rows of a 12 x 128 weight: 12 blocks of 64 each, so double quantization's one 256-block
    group spans both ranks (the gathered absmax makes it exact)."""
    torch.manual_seed(0)
    w = torch.randn(12, 128)
    packed, state = fsdp4bit.ops.quantize_4bit(w, 64, "nf4", True)
    whole = torch.cat([fsdp4bit.ops.quantize_4bit_raw(w[r * 6:(r + 1) * 6], 64, "nf4")[1] for r in range(2)])
    for r in range(2):
        shard = fsdp4bit.RowShard(r, 2, lambda t: whole)  # what the all-gather hands every rank
        assert shard.rows(12, 128, 64) == slice(6 * r, 6 * r + 6)
        p = fsdp4bit.quantize_rows(w[shard.rows(12, 128, 64)], 12, shard)
        assert p.partial and p.shape == (12, 128) and p.start == 6 * r and p.rows == 6
        assert torch.equal(p.codes, packed.view(-1)[384 * r:384 * (r + 1)])
        assert torch.equal(p.absmax, state.absmax[12 * r:12 * (r + 1)])
        assert torch.equal(p.meta.nested_absmax, state.nested_absmax) and p.meta.nested_offset == state.nested_offset
        chunks = torch.chunk(p, 2)  # what fully_shard does: this rank's chunk is the real one
        assert torch.equal(chunks[r].codes, p.codes) and chunks[1 - r].codes.is_meta and chunks[1 - r].rows == 6
        with pytest.raises(ValueError, match="one whole chunk"):
            torch.chunk(p, 3)  # a share made for two ranks
        with pytest.raises(RuntimeError, match="holds one rank's rows"):
            fsdp4bit.ShardableLinear4bit(weight=p, compute_dtype=torch.float32)(torch.randn(2, 128))
        with pytest.raises(NotImplementedError, match="partial"):
            p.clone()
        with pytest.raises(ValueError, match="a share for 2 ranks, but this run has 3"):
            fsdp4bit.check_shardable(torch.nn.Sequential(fsdp4bit.ShardableLinear4bit(weight=p)), 3)
    with pytest.raises(ValueError, match=r"q \(12x128, blocksize 64\) cannot be split into 5 shards"):
        fsdp4bit.RowShard(0, 5, None).rows(12, 128, 64, "q")


def test_fsdp2_parameter_proxy_freezes_integer_data_only():
    """The stand-in for nn.Parameter that allow_integer_parameters gives torch 2.11's FSDP2 (fsdp4bit.py): integer
    data becomes a frozen parameter instead of raising, floating-point data is untouched, isinstance still holds."""
    P = fsdp4bit._FSDPParamNN().Parameter
    packed = P(torch.zeros(4, dtype=torch.uint8))
    assert type(packed) is torch.nn.Parameter and not packed.requires_grad and isinstance(packed, P)
    assert P(torch.zeros(4)).requires_grad and not P(torch.zeros(4), requires_grad=False).requires_grad
    assert not isinstance(torch.zeros(4), P) and fsdp4bit._FSDPParamNN().Module is torch.nn.Module
    with pytest.raises(RuntimeError, match="floating point"):
        torch.nn.Parameter(torch.zeros(4, dtype=torch.uint8))  # what the proxy is for
    fsdp4bit.allow_integer_parameters()  # swaps only where torch needs it; twice is harmless
    fsdp4bit.allow_integer_parameters()


# -- the real model -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm(tiny):
    """SmolLM2-135M-Instruct (the demo's GGUF: fetched once into the demo's cache) and 4 of the demo's examples."""
    demo = runpy.run_path(str(ROOT / "scripts" / "demo.py"))
    gguf = demo["fetch_gguf"](demo["cache_dir"]())
    lines = (ROOT / "data" / "iso_dates_train.jsonl").read_text().splitlines()[:4]
    (tiny / "dates.jsonl").write_text("\n".join(lines) + "\n")
    return gguf


def test_real_model_ddp_and_fsdp2_match_one_process(tiny, smollm):
    def cfg(out, parallel, batch):
        return settings(tiny, out, parallel, batch, model=str(smollm), tokenizer=None, data=str(tiny / "dates.jsonl"),
                        seq_len=128, grad_accum=1, max_steps=2, eval_fraction=0.0, eval_every=0, checkpoint_every=0,
                        lora_r=8, gradient_checkpointing=False)  # 2 steps: the first moves only B (B starts at 0)

    check_ok(launch(tiny, [cfg("real-one", "none", 2)]))
    # FSDP2 here loads as sft.run does, each rank reading and quantizing only its rows of the GGUF's projections
    check_ok(launch(tiny, [cfg("real-ddp", "ddp", 1), {**cfg("real-fsdp2", "fsdp2", 1), "load_rows": True}], ranks=2))
    for mode in ("ddp", "fsdp2"):
        assert_same_adapter(tiny / f"real-{mode}", tiny / "real-one")
        torch.testing.assert_close(losses(tiny / f"real-{mode}"), losses(tiny / "real-one"), rtol=2e-5, atol=0)
