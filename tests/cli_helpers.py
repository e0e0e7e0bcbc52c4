"""Shared by test_cli.py and test_cli_errors.py: a tiny HF model directory with a ChatML tokenizer, data and text
files, and in-process runs of the command line. No tests here."""

import pytest

from minqlora.checkpoint import save_pretrained
from minqlora.cli import main
from minqlora.tokenizer import Tokenizer
from test_sft_helpers import chatml_dir, corpus, counting_records, tiny_model, write_jsonl


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny HF model directory (config.json, model.safetensors, tokenizer.json + template), data and text."""
    root = tmp_path_factory.mktemp("cli")
    model_dir = root / "model"
    model_dir.mkdir()
    chatml_dir(model_dir)
    tok = Tokenizer.from_pretrained(model_dir)
    save_pretrained(tiny_model(tok.vocab_size, layers=2), model_dir)
    data = write_jsonl(root / "train.jsonl", counting_records(24))
    text = root / "text.txt"
    text.write_text(" ".join(corpus(30)), encoding="utf-8")
    return {"root": root, "model": str(model_dir), "data": str(data), "text": str(text)}


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err
