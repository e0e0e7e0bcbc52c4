"""sft.py on tiny random Llamas (2 layers, hidden 64) on the CPU: the loss, packing, gradient accumulation, the
schedule, NaN steps, output-directory and resume checks, and exact resumption after SIGKILL and Ctrl-C.

Crash tests run training in subprocesses (a driver script written to tmp_path that calls sft.run on a tiny model
saved with checkpoint.save_pretrained and loaded back in NF4) and kill them from inside at a fixed forward call, so
the kill lands at the same point every time. Everything else runs train() in this process with one thread.
Leaves out CUDA (bf16 autocast, paging: tests/cuda) and wall-clock speed (benchmarks/).
"""

import copy
import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import minqlora.host_layers
import minqlora.model
from minqlora.checkpoint import save_pretrained
from minqlora.data import IGNORE_INDEX, collate, make_rows, tokenize_record
from minqlora.lora import add_lora, lora_modules
from minqlora.sft import TrainConfig, lr_at, token_loss_sum, train
from minqlora.tokenizer import Tokenizer
from test_sft_helpers import one_thread  # noqa: F401  (autouse fixture)
from test_sft_helpers import counting_records, sentencepiece_dir, tiny_model, write_jsonl

CPU = torch.device("cpu")
TIMING = ("tokens_per_s", "mem_gb")  # the only metrics that may differ between identical runs


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return sentencepiece_dir(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.from_pretrained(tok_dir)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", counting_records(60))


def config(tmp_path, data_file, **overrides) -> TrainConfig:
    base = dict(data=str(data_file), output_dir=str(tmp_path / "run"), seq_len=64, batch_size=4, grad_accum=1,
                max_steps=4, lr=3e-3, lora_r=4, lora_dropout=0.0, eval_fraction=0.0, checkpoint_every=0,
                gradient_checkpointing=False, progress=False)
    return TrainConfig(**{**base, **overrides})


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def lora_model(vocab_size: int, seed: int = 0) -> minqlora.model.Llama:
    """A tiny model with LoRA whose B is random too, so every adapter parameter gets a gradient."""
    model = add_lora(tiny_model(vocab_size, seed), r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.05)
    return model


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_loss_counts_only_trained_tokens(tok):
    model = lora_model(tok.vocab_size)
    records = counting_records(3)
    batch = collate([[tokenize_record(r, tok)] for r in records], pad_id=0)
    n_completion = [len(tok.encode(r["prompt"] + r["completion"], add_eos=True)) - len(tok.encode(r["prompt"]))
                    for r in records]
    assert batch.num_label_tokens == sum(n_completion)  # completion + EOS, nothing of the prompt or padding

    loss = token_loss_sum(model, batch, CPU, bf16=False)
    loss.backward()
    grads = lora_grads(model)
    model.zero_grad()
    # Reference: full (B, T, V) logits from Llama.forward, HF's shifted cross-entropy over the labelled positions.
    logits = model(batch.input_ids, attention_mask=batch.attention_mask)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch.labels[:, 1:].reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="sum")
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    for name, g in lora_grads(model).items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6)

    # Masked tokens get no loss: changing what sits at prompt and padding positions of the labels (so long as
    # they stay masked) or the padding inputs changes neither the loss nor the gradients; changing one trained
    # label does.
    masked = batch.labels == IGNORE_INDEX
    noisy = copy.deepcopy(batch)
    noisy.input_ids[batch.attention_mask == 0] = 7
    noisy.labels[masked] = -100 - torch.randint(0, 5, (int(masked.sum()),)) * 0  # still ignored
    model.zero_grad()
    loss2 = token_loss_sum(model, noisy, CPU, bf16=False)
    loss2.backward()
    assert torch.equal(loss2, loss.detach())
    assert all(torch.equal(grads[n], g) for n, g in lora_grads(model).items())
    noisy.labels[0, (~masked[0]).nonzero()[-1]] = 5
    assert token_loss_sum(model, noisy, CPU, bf16=False) != loss


def test_packing_gives_the_same_loss_and_gradients(tok):
    model = lora_model(tok.vocab_size)
    examples = [tokenize_record(r, tok) for r in counting_records(12)]
    packed_rows = make_rows(examples, seq_len=128, packing=True, seed=0)
    assert len(packed_rows) < len(examples) / 2
    packed = collate(packed_rows, pad_id=0)
    unpacked = collate(make_rows(examples, 128, packing=False), pad_id=0)
    assert packed.packed and packed.num_label_tokens == unpacked.num_label_tokens
    results = []
    for batch in (packed, unpacked):
        model.zero_grad()
        loss = token_loss_sum(model, batch, CPU, bf16=False)
        loss.backward()
        results.append((loss.detach(), lora_grads(model)))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-4)
    for name, g in results[0][1].items():
        torch.testing.assert_close(g, results[1][1][name], rtol=1e-4, atol=1e-5)
    # Without the block-diagonal mask, later examples would see earlier ones: the loss would change.
    leaky = copy.deepcopy(packed)
    leaky.packed = False
    assert not torch.allclose(token_loss_sum(model, leaky, CPU, bf16=False), results[0][0], rtol=1e-4)


def test_gradient_accumulation_equals_one_big_batch(tmp_path, tok):
    # Four examples of very different lengths; each run's one step sees all four, split differently.
    records = [{"text": "the cat"}, {"text": " ".join(["the red ball ran to the mat"] * 4)},
               {"prompt": "repeat one two :", "completion": " one two"}, {"text": "a dog sat on a blue mat now"}]
    data = write_jsonl(tmp_path / "four.jsonl", records)
    base = lora_model(tok.vocab_size)
    # A large eps makes Adam's first step lr * g / (|g| + eps) ~ g * lr / eps: linear in the gradient, so the
    # parameter change compares gradients (a plain first Adam step would compare only their signs).
    results = {}
    for b, k in ((4, 1), (1, 4), (2, 2)):
        model = copy.deepcopy(base)
        cfg = config(tmp_path / f"{b}x{k}", data, batch_size=b, grad_accum=k, max_steps=1, lr=1.0, eps=100.0,
                     warmup_ratio=0.0, max_grad_norm=0.0, seq_len=128)
        train(model, tok, cfg)
        results[(b, k)] = {n: p.detach() - base.get_parameter(n).detach()
                           for n, p in model.named_parameters() if p.requires_grad}
    for split in ((1, 4), (2, 2)):
        for name, delta in results[(4, 1)].items():
            torch.testing.assert_close(results[split][name], delta, rtol=2e-4, atol=1e-8)
    # The step is -g / 100 for g the per-token gradient, and the common mistake (averaging per-micro-batch means)
    # would have moved the parameters visibly differently.
    batches = [collate([[tokenize_record(r, tok)]], 0) for r in records]
    n_tokens = sum(x.num_label_tokens for x in batches)
    expected = {}
    for scale in ("token", "micro-batch mean"):
        base.zero_grad()
        for x in batches:
            loss = token_loss_sum(base, x, CPU, False)
            (loss / n_tokens if scale == "token" else loss / x.num_label_tokens / len(batches)).backward()
        expected[scale] = {n: -g / 100 for n, g in lora_grads(base).items()}
    for name, delta in results[(4, 1)].items():
        torch.testing.assert_close(delta, expected["token"][name], rtol=2e-3, atol=1e-8)
    assert not all(torch.allclose(d, expected["micro-batch mean"][n], rtol=0.05) for n, d in results[(4, 1)].items())


def test_schedule_warmup_then_cosine():
    cfg = TrainConfig(lr=1e-3, warmup_ratio=0.1, max_steps=100)
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[:10] == pytest.approx([1e-3 * (s + 1) / 10 for s in range(10)])
    assert lrs[10] == pytest.approx(1e-3) and lrs[55] == pytest.approx(5e-4) and lrs[-1] < 1e-6
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    const = TrainConfig(lr=1e-3, lr_schedule="constant", warmup_ratio=0.0)
    assert {lr_at(s, 100, const) for s in range(100)} == {1e-3}
    for bad in (dict(precision="fp16"), dict(optim_bits=4), dict(batch_size=0), dict(lr_schedule="linear")):
        with pytest.raises(ValueError, match="TrainConfig"):
            TrainConfig(**bad)


def test_training_lowers_eval_loss(tmp_path, tok, data_file):
    model = tiny_model(tok.vocab_size)
    cfg = config(tmp_path, data_file, max_steps=30, eval_fraction=0.15, eval_every=10, lr=1e-2, lora_r=8,
                 gradient_checkpointing=True, lora_dropout=0.05)
    result = train(model, tok, cfg)
    rows = metrics(tmp_path / "run")
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 10, 20, 30]
    assert evals[-1] < evals[0] - 0.5, evals
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 31))
    assert {"loss", "grad_norm", "lr", "tokens", "tokens_per_s", "mem_gb", "epoch"} <= train_rows[0].keys()
    assert result["eval_loss"] == evals[-1] and result["step"] == 30
    out = tmp_path / "run"
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the final adapter alone in adapter/, the resumable checkpoints beside it
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert result["adapter_dir"] == str(out / "adapter")
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000030"]


def test_nan_steps_are_skipped_then_stop(tmp_path, tok, data_file):
    model = tiny_model(tok.vocab_size)
    calls = []

    def poison(module, args, output):  # NaN activations on the second training forward only
        calls.append(1)
        return output * float("nan") if len(calls) == 2 else output

    handle = model.model.register_forward_hook(poison)
    out = tmp_path / "run"
    train(model, tok, config(tmp_path, data_file, max_steps=4, checkpoint_every=1, keep_checkpoints=10))
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[1]["skipped"] == "non-finite loss"
    assert "skipped" not in rows[2] and math.isfinite(rows[2]["loss"])
    ckpt = [load_file(out / "checkpoints" / f"step-{s:08d}" / "adapter_model.safetensors") for s in (1, 2, 3)]
    assert all(torch.equal(ckpt[0][k], ckpt[1][k]) for k in ckpt[0])  # the skipped step changed nothing
    assert not all(torch.equal(ckpt[1][k], ckpt[2][k]) for k in ckpt[0])  # the next one trained
    handle.remove()

    model = tiny_model(tok.vocab_size)
    model.model.register_forward_hook(lambda m, a, o: o * float("nan"))
    with pytest.raises(FloatingPointError, match="stopping at step 3: 3 consecutive steps with a NaN/Inf loss"):
        train(model, tok, config(tmp_path, data_file, max_steps=10, max_bad_steps=3, overwrite=True))
    assert [r.get("skipped") for r in metrics(out)] == ["non-finite loss"] * 3


def test_host_layers_train_the_same_adapter(tmp_path, tok, data_file, monkeypatch):
    """host_layers parks saved tensors in host memory and back unchanged: the same adapter bytes and losses, with
    dropout on and full checkpointing of the layer that is not parked; a run may resume with another host_layers."""
    monkeypatch.setattr(minqlora.host_layers, "MIN_PARK_BYTES", 0)  # the tiny model's tensors are all small
    runs = {}
    for host in (0, 1):
        model = tiny_model(tok.vocab_size)
        cfg = config(tmp_path / str(host), data_file, max_steps=3, lora_dropout=0.1, gradient_checkpointing="full",
                     host_layers=host)
        train(model, tok, cfg)
        assert (model.model.host_stats is not None) == bool(host)
        out = tmp_path / str(host) / "run"
        runs[host] = (out / "adapter" / "adapter_model.safetensors").read_bytes(), [
            {k: v for k, v in r.items() if k not in TIMING} for r in metrics(out)]
    assert runs[1] == runs[0]
    train(tiny_model(tok.vocab_size), tok, config(tmp_path / "0", data_file, max_steps=3, lora_dropout=0.1,
                                                  gradient_checkpointing="full", host_layers=1, resume=True))
    with pytest.raises(ValueError, match="host_layers=2 with keep_last_layers=1"):
        train(tiny_model(tok.vocab_size), tok, config(tmp_path / "2", data_file, gradient_checkpointing="full",
                                                      host_layers=2, keep_last_layers=1))
    with pytest.raises(ValueError, match="TrainConfig.host_prefetch must be an int >= 0"):
        config(tmp_path / "3", data_file, host_layers=1, host_prefetch=-1)


def test_host_stride_reaches_the_model(tmp_path, tok, data_file, monkeypatch):
    monkeypatch.setattr(minqlora.host_layers, "MIN_PARK_BYTES", 0)
    model = tiny_model(tok.vocab_size)  # 2 layers: stride 2 parks layer 0 alone, and a second parked layer is none
    train(model, tok, config(tmp_path / "1", data_file, max_steps=1, gradient_checkpointing="full", host_layers=1,
                             host_stride=2))
    assert model.model.host_stride == 2 and model.model.host_stats.layers == 1
    with pytest.raises(ValueError, match="host_layers=2 with keep_last_layers=0 and host_stride=2 .* 2 layers"):
        train(tiny_model(tok.vocab_size), tok, config(tmp_path / "2", data_file, gradient_checkpointing="full",
                                                      host_layers=2, host_stride=2))
    with pytest.raises(ValueError, match="TrainConfig.host_stride must be an int >= 1"):
        config(tmp_path / "3", data_file, host_layers=1, host_stride=0)


def test_embed_on_host_trains_the_same_adapter(tmp_path, tok, data_file):
    """The embedding's rows gathered from a host table are the same bytes: the same adapter and losses; a run may
    resume with embed_on_host changed."""
    runs = {}
    for on_host in (False, True):
        model = tiny_model(tok.vocab_size)
        train(model, tok, config(tmp_path / str(on_host), data_file, max_steps=3, lora_dropout=0.1,
                                 embed_on_host=on_host))
        assert (type(model.model.embed_tokens).__name__ == "HostEmbedding") == on_host
        out = tmp_path / str(on_host) / "run"
        runs[on_host] = (out / "adapter" / "adapter_model.safetensors").read_bytes(), [
            {k: v for k, v in r.items() if k not in TIMING} for r in metrics(out)]
    assert runs[True] == runs[False]
    train(tiny_model(tok.vocab_size), tok, config(tmp_path / "False", data_file, max_steps=3, lora_dropout=0.1,
                                                  embed_on_host=True, resume=True))


def test_output_dir_with_another_run_is_refused(tmp_path, tok, data_file):
    train(tiny_model(tok.vocab_size), tok, config(tmp_path, data_file, max_steps=1))
    with pytest.raises(FileExistsError, match=r"run holds another run \(train_config.json, metrics.jsonl, checkpoints"):
        train(tiny_model(tok.vocab_size), tok, config(tmp_path, data_file, max_steps=1))
    with pytest.raises(ValueError, match=r"cannot resume in .*: it holds a run with other settings: lr=0.003 \(now "
                                         r"0.001\), max_steps=1 \(now 2\)"):
        train(tiny_model(tok.vocab_size), tok, config(tmp_path, data_file, max_steps=2, lr=1e-3, resume=True))
    (tmp_path / "run" / "notes.txt").write_text("mine")
    train(tiny_model(tok.vocab_size), tok, config(tmp_path, data_file, max_steps=2, overwrite=True))
    assert [r["step"] for r in metrics(tmp_path / "run")] == [1, 2]
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"  # overwrite removes only a run's own files


def test_resume_from_another_model_is_refused(tmp_path, tok_dir, data_file):
    tok = Tokenizer.from_pretrained(tok_dir)
    cfg = config(tmp_path, data_file, max_steps=2, checkpoint_every=1)
    train(tiny_model(tok.vocab_size, seed=0), tok, cfg)
    cfg.resume = True
    with pytest.raises(ValueError, match="was trained on another base model .*embedding_sha256"):
        train(tiny_model(tok.vocab_size, seed=1), tok, cfg)
    with pytest.raises(ValueError, match="another base model .*config_sha256"):
        train(tiny_model(tok.vocab_size, seed=0, layers=3), tok, cfg)
    result = train(tiny_model(tok.vocab_size, seed=0), tok, cfg)  # the same model resumes (already finished)
    assert result["step"] == 2 and [r["step"] for r in metrics(tmp_path / "run")] == [1, 2]


DRIVER = textwrap.dedent("""
    import json, os, signal, sys
    import torch
    from minqlora.sft import TrainConfig, run

    torch.set_num_threads(1)
    config, mode, at = TrainConfig(**json.loads(sys.argv[1])), sys.argv[2], int(sys.argv[3])
    calls = 0

    def hook(module, args):  # counts training forwards of the decoder stack; signals itself at call `at`
        global calls
        if type(module).__name__ == "LlamaModel" and module.training:
            calls += 1
            if calls == at:
                os.kill(os.getpid(), signal.SIGKILL if mode == "kill" else signal.SIGINT)

    torch.nn.modules.module.register_module_forward_pre_hook(hook)
    run(config)
""")


def test_killed_and_interrupted_runs_resume_bit_identically(tmp_path, tok_dir, data_file):
    model_dir = tmp_path / "model"
    save_pretrained(tiny_model(Tokenizer.from_pretrained(tok_dir).vocab_size), model_dir)
    (tmp_path / "driver.py").write_text(DRIVER)

    def launch(name, mode="none", at=0, resume=False):
        cfg = dict(model=str(model_dir), tokenizer=str(tok_dir), data=str(data_file), output_dir=str(tmp_path / name),
                   quantize="nf4", device="cpu", seq_len=64, batch_size=2, grad_accum=2, max_steps=8, lr=1e-3,
                   lora_r=4, eval_fraction=0.1, eval_every=4, checkpoint_every=3, resume=resume, progress=False)
        return subprocess.run([sys.executable, str(tmp_path / "driver.py"), json.dumps(cfg), mode, str(at)],
                              capture_output=True, text=True, timeout=300)

    def final(name):
        rows = [{k: v for k, v in r.items() if k not in TIMING} for r in metrics(tmp_path / name)]
        return (tmp_path / name / "adapter" / "adapter_model.safetensors").read_bytes(), rows

    ref = launch("ref")
    assert ref.returncode == 0, ref.stderr
    ref_adapter, ref_rows = final("ref")
    assert [r["step"] for r in ref_rows if "loss" in r] == list(range(1, 9))

    # Ctrl-C during step 5 (training forward 9 = its first micro-batch): the step finishes, a checkpoint is
    # saved, KeyboardInterrupt ends the process.
    interrupted = launch("crash", "int", at=9)
    assert interrupted.returncode != 0 and "interrupted at step 5; checkpoint saved" in interrupted.stderr
    assert sorted(p.name for p in (tmp_path / "crash" / "checkpoints").iterdir()) == ["step-00000003",
                                                                                     "step-00000005"]
    # Resumed, then SIGKILLed during step 8 (its forward 5): the newest checkpoint is step 6 and metrics.jsonl
    # already holds step 7, which the next resumption must not write twice.
    killed = launch("crash", "kill", at=5, resume=True)
    assert killed.returncode == -9 and "resuming from" in killed.stdout
    assert sorted(p.name for p in (tmp_path / "crash" / "checkpoints").iterdir())[-1] == "step-00000006"
    assert metrics(tmp_path / "crash")[-1]["step"] == 7
    resumed = launch("crash", resume=True)
    assert resumed.returncode == 0, resumed.stderr
    adapter, rows = final("crash")
    assert rows == ref_rows  # no gap, no duplicate, the same numbers
    assert adapter == ref_adapter  # bit-identical final adapter
