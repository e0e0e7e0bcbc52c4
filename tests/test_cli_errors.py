"""The command line as a new user meets it (issue 11's list): every user error exits with 2 and ONE line naming
the flag or file as typed, with a pointer to --help and no traceback or usage block; empty prompts; corrupt GGUF
files through every command that reads one; SIGTERM (like Ctrl-C) leaving a checkpoint that --resume continues
bit-identically; the run directory's layout and file modes; the CPU cost note; a fast `minqlora --help`; a quiet
build. Leaves out the successful paths (test_cli.py).
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cli_helpers import files, run  # noqa: F401  (files: a fixture)
from minqlora import gguf_io
from minqlora.checkpoint import load_pretrained, save_pretrained
from minqlora.cli_commands import cpu_cost_note
from minqlora.safetensors_io import umask_mode
from minqlora.sft import TrainConfig
from minqlora.tokenizer import Tokenizer
from test_sft_helpers import one_thread  # noqa: F401  (autouse fixture)
from test_sft_helpers import sentencepiece_dir, tiny_model, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
TINY_RUN = ["--steps", "3", "--batch-size", "4", "--grad-accum", "1", "--seq-len", "48", "--r", "4", "--alpha", "8",
            "--lr", "3e-3", "--eval-every", "0", "--save-every", "0", "--no-progress", "--no-gradient-checkpointing"]


def assert_one_line(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err and "usage:" not in err, err
    assert "--help" in err, err
    for needle in needles:
        assert needle in err, (needle, err)


def parse_error(capsys, argv) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        run(capsys, *argv)
    return e.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def ggufs(files):
    """A real GGUF of the tiny model, the same cut to half its bytes (`head -c`), and a 100-byte stub."""
    root = files["root"]
    good = gguf_io.export_gguf(load_pretrained(files["model"], quantize=None), Tokenizer.from_pretrained(
        files["model"]), root / "good.gguf", "f16")
    data = good.read_bytes()
    (root / "half.gguf").write_bytes(data[: len(data) // 2])
    (root / "stub.gguf").write_bytes(data[:100])
    return {"good": good, "half": root / "half.gguf", "stub": root / "stub.gguf"}


# -- 3: argument values, in the user's words ------------------------------------------------------------------------

@pytest.mark.parametrize("argv, needles", [
    (["generate", "--model", "{model}", "--prompt", "x", "--temperature", "-1"],
     ["argument --temperature: must be >= 0.0, got -1"]),
    (["generate", "--model", "{model}", "--prompt", "x", "--top-p", "0"], ["argument --top-p: must be > 0.0"]),
    (["finetune", "--model", "{model}", "--data", "{data}", "--out", "o", "--lr", "-1"],
     ["argument --lr: must be >= 0.0, got -1"]),
    (["finetune", "--model", "{model}", "--data", "{data}", "--out", "o", "--steps", "ten"],
     ["argument --steps: expected an integer, got 'ten'"]),
    (["finetune", "--model", "{model}", "--data", "{data}", "--out", "o", "--eval-fraction", "1.5"],
     ["argument --eval-fraction: must be < 1.0"]),
    (["finetune", "--model", "{model}", "--data", "{data}", "--out", "o", "--epochs", "nan"],
     ["argument --epochs: expected a finite number, got 'nan'"]),
    (["eval", "--model", "{model}", "--data", "{data}", "--seq-len", "1"], ["argument --seq-len: must be >= 2"]),
    (["finetune", "--model", "{model}", "--data", "{data}"], ["the following arguments are required: --out"]),
    (["frobnicate"], ["argument COMMAND: invalid choice: 'frobnicate'"]),
])
def test_argument_errors_are_one_line_naming_the_flag(capsys, files, argv, needles):
    code, err = parse_error(capsys, [a.format(**files) for a in argv])
    assert_one_line(code, err, *needles)


def test_outputs_that_cannot_be_written_are_named(capsys, files, tmp_path):
    a_file = tmp_path / "taken.txt"
    a_file.write_text("mine")
    for argv, needle in [
        (["export-gguf", "--model", files["model"], "--out", tmp_path / "nodir" / "m.gguf"],
         f"the folder {tmp_path / 'nodir'} does not exist"),
        (["export-gguf", "--model", files["model"], "--out", tmp_path], "is a directory; it must name a file"),
        (["merge", "--model", files["model"], "--adapter", files["model"], "--out", a_file], "is a file"),
        (["quantize", files["model"], a_file], f"{a_file} is a file"),
        (["finetune", "--model", files["model"], "--data", files["data"], "--out", a_file], f"--out {a_file} is a file"),
        (["report", "--model", files["model"], "--out", a_file / "sub"], f"{a_file} is a file"),
    ]:
        code, _, err = run(capsys, *argv)
        assert_one_line(code, err, needle)
        assert ".tmp" not in err
    assert a_file.read_text() == "mine" and not list(tmp_path.glob("**/*.tmp*"))


def test_finetune_data_errors_name_the_record(capsys, files, tmp_path):
    one = write_jsonl(tmp_path / "one.jsonl", [{"question": "a", "answer": "b"}])
    code, _, err = run(capsys, "finetune", "--model", files["model"], "--data", one, "--out", tmp_path / "r")
    assert_one_line(code, err, f"{one}:1")  # the record's own problem, not the eval split's
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "a", "completion": "b"}])
    code, _, err = run(capsys, "finetune", "--model", files["model"], "--data", good, "--out", tmp_path / "r")
    assert_one_line(code, err, f"--data {good} has 1 record: too few to hold out --eval-fraction 0.05",
                    "--eval-fraction 0")
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_another_run_is_refused_in_flag_words(capsys, files, tmp_path):
    out = tmp_path / "run"
    code, _, err = run(capsys, "finetune", "--model", files["model"], "--data", files["data"], "--out", out,
                       *TINY_RUN)
    assert code == 0, err
    code, _, err = run(capsys, "finetune", "--model", files["model"], "--data", files["data"], "--out", out,
                       *TINY_RUN[:-1])
    assert_one_line(code, err, "holds another run", "--resume", "--overwrite")
    assert "resume=True" not in err.split("--resume")[0]  # the flag comes first, the API word only as an aside


# -- 1: empty prompts ------------------------------------------------------------------------------------------------

def test_empty_prompt_starts_from_bos_or_is_refused(capsys, files, tmp_path):
    """An empty --no-chat prompt tokenizes to nothing: it starts from BOS (unconditional generation); a tokenizer
    without BOS (the ChatML one here) has nothing to start from, and the command says so."""
    code, _, err = run(capsys, "generate", "--model", files["model"], "--no-chat", "--prompt", "")
    assert_one_line(code, err, "--prompt is empty and the tokenizer has no BOS token")
    spm = sentencepiece_dir(tmp_path)
    save_pretrained(tiny_model(Tokenizer.from_pretrained(spm).vocab_size), spm)
    code, out, err = run(capsys, "generate", "--model", spm, "--no-chat", "--prompt", "", "--max-new-tokens", "4")
    assert code == 0 and "plain prompt of 1 tokens" in err and "Traceback" not in err


# -- 2: corrupt GGUF files, one message through every command --------------------------------------------------------

@pytest.mark.parametrize("which", ["half", "stub"])
def test_corrupt_gguf_is_one_message_in_every_command(capsys, files, ggufs, tmp_path, which):
    bad = str(ggufs[which])
    for argv in (["generate", "--model", bad, "--prompt", "x"], ["eval", "--model", bad, "--data", files["data"]],
                 ["export-gguf", "--model", bad, "--out", tmp_path / "x.gguf"], ["quantize", bad, tmp_path / "q"],
                 ["finetune", "--model", bad, "--data", files["data"], "--out", tmp_path / "f", *TINY_RUN]):
        code, _, err = run(capsys, *argv)
        assert_one_line(code, err, f"{bad}: not a readable GGUF file (truncated or corrupt?)")
    assert run(capsys, "eval", "--model", ggufs["good"], "--text", files["text"], "--seq-len", "16",
               "--max-tokens", "32", "--quantize", "none")[0] == 0


# -- 4: SIGTERM like Ctrl-C, and --resume ---------------------------------------------------------------------------

DRIVER = textwrap.dedent("""
    import os, signal, sys
    import torch
    from minqlora.cli import main

    torch.set_num_threads(1)
    at, calls = int(sys.argv[1]), 0

    def hook(module, args):  # SIGTERM to itself at the `at`-th training forward of the decoder stack
        global calls
        if type(module).__name__ == "LlamaModel" and module.training:
            calls += 1
            if calls == at:
                os.kill(os.getpid(), signal.SIGTERM)

    torch.nn.modules.module.register_module_forward_pre_hook(hook)
    sys.exit(main(sys.argv[2:]))
""")


def test_sigterm_checkpoints_and_resume_continues_bit_identically(capsys, files, tmp_path):
    argv = ["finetune", "--model", files["model"], "--data", files["data"], *TINY_RUN]
    argv[argv.index("--steps") + 1] = "6"
    code, _, err = run(capsys, *argv, "--out", tmp_path / "ref")
    assert code == 0, err
    reference = (tmp_path / "ref" / "adapter" / "adapter_model.safetensors").read_bytes()

    (tmp_path / "driver.py").write_text(DRIVER)
    proc = subprocess.run([sys.executable, str(tmp_path / "driver.py"), "3", *map(str, argv), "--out",
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 143, proc.stderr  # 128 + SIGTERM, after the checkpoint
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("minqlora finetune: SIGTERM: interrupted at step 3; checkpoint saved to"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-00000003"]
    assert not (tmp_path / "run" / "adapter").exists()

    code, out, err = run(capsys, *argv, "--out", tmp_path / "run", "--resume")
    assert code == 0, err
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").read_bytes() == reference


def test_resume_without_a_checkpoint_says_so(capsys, files, tmp_path):
    code, _, err = run(capsys, "finetune", "--model", files["model"], "--data", files["data"], "--out",
                       tmp_path / "fresh", "--resume", *TINY_RUN)
    assert code == 0 and f"resume: no checkpoint in {tmp_path / 'fresh' / 'checkpoints'}; starting from step 0" in err


# -- 5: outputs -----------------------------------------------------------------------------------------------------

def test_run_layout_and_file_modes(capsys, files, tmp_path):
    out = tmp_path / "run"
    code, stdout, err = run(capsys, "finetune", "--model", files["model"], "--data", files["data"], "--out", out,
                            *TINY_RUN)
    assert code == 0, err
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert {"checkpoints", "metrics.jsonl", "train_config.json", "adapter"} <= {p.name for p in out.iterdir()}
    assert str(out / "adapter") in stdout
    code, _, err = run(capsys, "merge", "--model", files["model"], "--adapter", out, "--out", tmp_path / "merged")
    assert code == 0, err  # --adapter accepts the run directory (its adapter/)
    written = [*out.rglob("*.safetensors"), *(tmp_path / "merged").iterdir()]
    assert any(p.suffix == ".safetensors" for p in written)
    for p in written:
        assert os.stat(p).st_mode & 0o777 == umask_mode(), p


# -- 6 and 7: CPU users, a fast --help, a quiet build ------------------------------------------------------------------

def test_cpu_cost_note():
    note = cpu_cost_note(TrainConfig())
    assert note.startswith("note: training on the CPU with up to 16,384 tokens per step (--seq-len 1024 x ")
    assert "--seq-len 128 --batch-size 8 --grad-accum 1 --no-gradient-checkpointing" in note
    assert cpu_cost_note(TrainConfig(seq_len=128, batch_size=8, grad_accum=1)) is None  # the demo's settings


def test_top_level_help_does_not_import_torch():
    script = ("import sys\nfrom minqlora.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit as e:\n"
              "    assert e.code == 0\nassert 'torch' not in sys.modules, 'torch was imported'\n"
              "assert main([]) == 2\nassert 'torch' not in sys.modules\nprint('ok')")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.endswith("ok\n"), proc.stderr
    assert "finetune" in proc.stdout and "export-gguf" in proc.stdout


def test_build_metadata_is_quiet():
    """setuptools' license deprecation box and torch's "Failed to initialize NumPy" were printed on every install."""
    proc = subprocess.run([sys.executable, "setup.py", "--name"], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("minqlora"), proc.stderr
    assert "license" not in proc.stderr.lower() and "NumPy" not in proc.stderr, proc.stderr
