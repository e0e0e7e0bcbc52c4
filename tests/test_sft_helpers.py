"""Builders shared by test_data.py and test_sft.py: tiny tokenizers trained in a temporary directory, a tiny random
Llama, JSONL writers and record generators. No tests here; nothing is downloaded.
"""

import json
import random

import pytest
import sentencepiece
import tokenizers
import torch
from tokenizers import decoders, models, pre_tokenizers, trainers

from minqlora.model import Llama, LlamaConfig

WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "to", "red", "blue", "ball", "one", "two", "three",
         "four", "five", "answer", "is", "what", "color", "count", "next", "word"]
CHATML_TEMPLATE = (  # a template of the directory's own, as Qwen/SmolLM ship it
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def corpus(n: int = 400) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


def sentencepiece_dir(root):
    """A Llama-style sentencepiece tokenizer.model (BOS <s> = 1, EOS </s> = 2): no template of its own."""
    (root / "corpus.txt").write_text("\n".join(corpus()), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(root / "corpus.txt"), model_prefix=str(root / "tokenizer"), vocab_size=300, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, minloglevel=2)
    return root


def chatml_dir(root):
    """A byte-level BPE tokenizer.json with ChatML specials and its own chat template in tokenizer_config.json."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    tok.save(str(root / "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHATML_TEMPLATE}
    (root / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return root


def tiny_model(vocab_size: int, seed: int = 0, layers: int = 2) -> Llama:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    return Llama(config)


def write_jsonl(path, records, raw_lines=()):
    lines = [json.dumps(r) for r in records] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def counting_records(n: int, seed: int = 0) -> list[dict]:
    """prompt/completion pairs with a learnable rule: the completion repeats the prompt's last words."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 6))]
        out.append({"prompt": "repeat " + " ".join(words) + " :", "completion": " " + " ".join(words[-2:])})
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a busy machine OpenMP's spinning makes them 50x slower.
    Import it into a test module to run that module on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
