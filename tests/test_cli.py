"""cli.py: --help of every subcommand, rejected flags and user errors (exit 2, one line, no traceback), the flag ->
TrainConfig mapping, and every subcommand end to end on a tiny random Llama saved as a Hugging Face directory with a
tiny ChatML tokenizer (CPU, in-process through main(argv); one subprocess checks `python -m minqlora`).

Leaves out what new users trip over (test_cli_errors.py), the numbers the commands compute (test_report.py,
test_sft.py, ...) and the real model (test_demo.py).
"""

import json
import subprocess
import sys

import pytest
import torch

from cli_helpers import files, run  # noqa: F401  (files: a fixture)
from minqlora.checkpoint import load_pretrained
from minqlora.cli import main
from minqlora import cli_args, lora_fused, quant, sampling
from minqlora.cli_args import build_parser
from minqlora.linear4bit import Linear4bit
from minqlora.sft import TrainConfig
from test_sft_helpers import one_thread  # noqa: F401  (autouse fixture)

COMMANDS = ("quantize", "finetune", "generate", "merge", "export-gguf", "eval", "report")


# -- help and argument errors -----------------------------------------------------------------------------------------

def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(c in out for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_subcommand_help_has_examples(capsys, command):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: minqlora {command}")
    assert "examples:\n  minqlora " + command in out
    assert "--device" in out


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().err


@pytest.mark.parametrize("command", COMMANDS)
def test_unknown_flag_rejected(capsys, files, command):
    required = {"quantize": [files["model"], files["root"] / "q"],
                "finetune": ["--model", files["model"], "--data", files["data"], "--out", files["root"] / "x"],
                "generate": ["--model", files["model"], "--prompt", "hi"],
                "merge": ["--model", files["model"], "--adapter", files["model"], "--out", files["root"] / "x"],
                "export-gguf": ["--model", files["model"], "--out", files["root"] / "x.gguf"],
                "eval": ["--model", files["model"], "--data", files["data"]],
                "report": ["--model", files["model"], "--out", files["root"] / "x"]}[command]
    with pytest.raises(SystemExit) as e:
        main([command, *map(str, required), "--learning-rate", "1"])
    assert e.value.code == 2
    assert "unrecognized arguments: --learning-rate" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["generate", "--model", "/no/such/model", "--prompt", "x"], "argument --model: no such file or directory"),
    (["eval", "--model", "{model}", "--data", "/no/such.jsonl"], "argument --data: no such file"),
    (["eval", "--model", "{model}"], "one of the arguments --data --text is required"),
    (["eval", "--model", "{model}", "--data", "{data}", "--text", "{text}"], "not allowed with argument"),
    (["finetune", "--model", "{model}", "--data", "{data}"], "the following arguments are required: --out"),
    (["finetune", "--model", "{model}", "--data", "{data}", "--out", "o", "--r", "0"], "argument --r: must be >= 1"),
    (["finetune", "--model", "{model}", "--data", "{data}", "--out", "o", "--optim-bits", "4"], "invalid choice"),
    (["generate", "--model", "{model}", "--prompt", "x", "--quantize", "int4"], "invalid choice"),
    (["export-gguf", "--model", "{model}", "--out", "f.gguf", "--dtype", "q4_0"], "invalid choice"),
])
def test_argument_errors_exit_2(capsys, files, argv, message):
    with pytest.raises(SystemExit) as e:
        main([a.format(**files) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_user_errors_exit_2_naming_the_thing(capsys, files, tmp_path):
    code, _, err = run(capsys, "eval", "--model", files["model"], "--data", files["data"], "--device", "potato")
    assert code == 2 and "--device 'potato'" in err and "Traceback" not in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{oops\n')
    code, _, err = run(capsys, "eval", "--model", files["model"], "--data", bad)
    assert code == 2 and f"{bad}:2: malformed JSON" in err
    code, _, err = run(capsys, "generate", "--model", files["model"], "--adapter", tmp_path, "--prompt", "x")
    assert code == 2 and "adapter_config.json" in err and err.count("\n") == 1
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "f").write_text("x")
    code, _, err = run(capsys, "quantize", files["model"], tmp_path / "taken")
    assert code == 2 and "--overwrite" in err and str(tmp_path / "taken") in err
    with pytest.raises(ValueError, match="malformed JSON"):  # --traceback: the exception propagates
        main(["--traceback", "eval", "--model", files["model"], "--data", str(bad)])


def test_torch_free_flag_tables_match_the_package():
    """cli_args.py names its choices without importing torch (fast --help); they must be the package's."""
    assert cli_args.LORA_PATHS == lora_fused.LORA_PATHS
    assert cli_args.DECODE_MODES == sampling.DECODE_MODES
    assert cli_args.BLOCKSIZES == tuple(quant.BLOCKSIZES)
    assert set(cli_args.STORAGE_NAMES) == {str(d).removeprefix("torch.") for d in quant.STORAGE_DTYPES}


def test_finetune_flags_map_onto_train_config():
    parser = build_parser(TrainConfig())
    args = parser.parse_args(["finetune", "--model", ".", "--data", __file__, "--out", "o", "--r", "8", "--alpha",
                              "4", "--dropout", "0", "--lr", "1e-3", "--steps", "7", "--seq-len", "99",
                              "--batch-size", "3", "--grad-accum", "2", "--eval-every", "5", "--save-every", "6",
                              "--optim-bits", "8", "--paging", "none", "--quantize", "none", "--seed", "3",
                              "--resume", "--no-gradient-checkpointing", "--targets", "q_proj, v_proj"])
    fields = {f: getattr(args, f) for f in TrainConfig.__dataclass_fields__ if hasattr(args, f)}
    assert set(fields) == set(TrainConfig.__dataclass_fields__) - {"min_lr_ratio", "betas", "eps", "max_bad_steps"}
    assert (args.lora_r, args.lora_alpha, args.lora_dropout, args.lr, args.max_steps, args.seq_len) == (
        8, 4.0, 0.0, 1e-3, 7, 99)
    assert (args.batch_size, args.grad_accum, args.eval_every, args.checkpoint_every) == (3, 2, 5, 6)
    assert (args.optim_bits, args.paging, args.quantize, args.seed, args.resume) == (8, None, None, 3, True)
    assert args.gradient_checkpointing is False and args.output_dir == "o"
    defaults = parser.parse_args(["finetune", "--model", ".", "--data", __file__, "--out", "o"])
    d = TrainConfig()
    for field in fields:
        if field not in ("model", "data", "output_dir", "lora_targets"):
            assert getattr(defaults, field) == getattr(d, field), field
    assert defaults.lora_targets == ",".join(d.lora_targets)


# -- every subcommand end to end --------------------------------------------------------------------------------------

def test_end_to_end(capsys, files):
    root, model = files["root"], files["model"]

    code, out, _ = run(capsys, "quantize", model, root / "q4", "--blocksize", "32")
    assert code == 0 and str(root / "q4") in out
    q = load_pretrained(root / "q4", quantize=None)  # the stored 4-bit bytes, dequantized
    assert (root / "q4" / "tokenizer.json").is_file()
    again = load_pretrained(root / "q4", quantize="nf4")
    lin = again.model.layers[0].self_attn.q_proj
    assert isinstance(lin, Linear4bit) and lin.blocksize == 32 and lin.weight_nested_absmax is not None
    assert q.config.vocab_size == again.config.vocab_size

    run_dir = root / "run"
    code, out, _ = run(capsys, "finetune", "--model", root / "q4", "--data", files["data"], "--out", run_dir,
                       "--steps", "3", "--batch-size", "4", "--grad-accum", "1", "--seq-len", "48", "--r", "4",
                       "--alpha", "8", "--lr", "3e-3", "--eval-every", "3", "--save-every", "0", "--no-progress",
                       "--no-gradient-checkpointing")
    assert code == 0 and str(run_dir) in out
    saved = json.loads((run_dir / "train_config.json").read_text())
    assert (saved["lora_r"], saved["lora_alpha"], saved["max_steps"], saved["seq_len"]) == (4, 8, 3, 48)
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file() and (run_dir / "metrics.jsonl").is_file()
    code, _, err = run(capsys, "finetune", "--model", root / "q4", "--data", files["data"], "--out", run_dir,
                       "--steps", "3")
    assert code == 2 and "holds another run" in err  # a second run into the same directory is refused

    code, out, err = run(capsys, "generate", "--model", model, "--adapter", run_dir, "--prompt", "repeat the cat :",
                         "--max-new-tokens", "6")
    assert code == 0 and out.endswith("\n") and "chat prompt" in err
    code, out2, _ = run(capsys, "generate", "--model", model, "--prompt", "the cat", "--no-chat",
                        "--max-new-tokens", "6", "--temperature", "0.9", "--top-k", "20", "--top-p", "0.9",
                        "--seed", "1")
    code, out3, err = run(capsys, "generate", "--model", model, "--prompt", "the cat", "--no-chat",
                          "--max-new-tokens", "6", "--temperature", "0.9", "--top-k", "20", "--top-p", "0.9",
                          "--seed", "1")
    assert code == 0 and out2 == out3 and "plain prompt" in err  # seeded sampling repeats
    for mode in ("eager", "static"):  # on a CPU: the readable loop and the static-cache step, the same greedy text
        code, out4, _ = run(capsys, "generate", "--model", model, "--prompt", "the cat", "--no-chat",
                            "--max-new-tokens", "6", "--decode", mode)
        assert code == 0 and (mode == "eager" or out4 == greedy)
        greedy = out4
    code, _, err = run(capsys, "generate", "--model", model, "--prompt", "x", "--decode", "graph")
    assert code == 2 and "--decode graph needs a CUDA device" in err

    code, out, _ = run(capsys, "merge", "--model", model, "--adapter", run_dir, "--out", root / "merged",
                       "--dtype", "float32")
    assert code == 0 and str(root / "merged") in out
    merged = load_pretrained(root / "merged", quantize=None, dtype=None)
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    assert (root / "merged" / "tokenizer_config.json").is_file()

    code, out, _ = run(capsys, "export-gguf", "--model", root / "merged", "--out", root / "m.gguf", "--dtype", "f16")
    assert code == 0 and str(root / "m.gguf") in out and (root / "m.gguf").stat().st_size > 0
    code, _, err = run(capsys, "export-gguf", "--model", root / "merged", "--out", root / "m.gguf")
    assert code == 2 and "--overwrite" in err

    # eval: the adapter's loss on its own training data is below the base model's.
    code, base_out, _ = run(capsys, "eval", "--model", model, "--data", files["data"], "--seq-len", "48")
    code2, tuned_out, _ = run(capsys, "eval", "--model", model, "--adapter", run_dir, "--data", files["data"])
    assert code == code2 == 0
    base_loss, tuned_loss = (float(o.split()[1]) for o in (base_out, tuned_out))
    assert tuned_loss < base_loss
    code, out, _ = run(capsys, "eval", "--model", root / "m.gguf", "--text", files["text"], "--seq-len", "32",
                       "--quantize", "none", "--max-tokens", "100")
    assert code == 0 and "perplexity" in out

    code, out, _ = run(capsys, "report", "--model", model, "--text", files["text"], "--seq-len", "32",
                       "--out", root / "report")
    assert code == 0 and "| NF4 + DQ | 4.127 |" in out
    assert {p.name for p in (root / "report").iterdir()} == {"report.md", "summary.csv", "layers.csv", "report.png"}


def test_python_dash_m_runs_the_cli():
    proc = subprocess.run([sys.executable, "-m", "minqlora", "report", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: minqlora report")
    proc = subprocess.run([sys.executable, "-m", "minqlora", "eval", "--bogus"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
