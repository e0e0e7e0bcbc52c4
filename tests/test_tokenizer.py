"""Tokenizer against its oracles: sentencepiece and `tokenizers` for encode/decode, transformers for chat templates.

Covers tiny tokenizers trained inside the tests (a sentencepiece BPE model and a byte-level BPE tokenizer.json),
special-token handling, BOS/EOS defaults, the three fallback chat formats and missing-file errors.
Leaves out real model vocabularies (nothing is downloaded).
"""

import json
import random

import jinja2
import pytest
import sentencepiece
import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from minqlora.tokenizer import Tokenizer

WORDS = ["the", "cat", "sat", "on", "a", "mat", "quantized", "weights", "adapter", "low", "rank", "café", "naïve",
         "日本語", "テキスト", "emoji🙂", "x=1+2", "\tindent", "new\nline"]
SAMPLES = ["the cat sat on the mat", "  leading spaces", "café naïve 日本語 🙂", "unseen zebra quokka", "a\nb\tc",
           "", "quantized   weights"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is NF4?"}]


def corpus(n: int = 400) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sp")
    (root / "corpus.txt").write_text("\n".join(corpus()), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(root / "corpus.txt"), model_prefix=str(root / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, minloglevel=2)
    return root


def bpe_dir(root, specials, post_bos=False, config=None):
    """A byte-level BPE tokenizer.json trained on the corpus, with the given special tokens and tokenizer_config."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    if post_bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{specials[0]} $A",
                                                           special_tokens=[(specials[0], tok.token_to_id(specials[0]))])
    tok.save(str(root / "tokenizer.json"))
    if config is not None:
        (root / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return root


def test_sentencepiece_agrees_with_sentencepiece(sp_dir):
    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    tok = Tokenizer.from_pretrained(sp_dir)
    assert (tok.bos_id, tok.eos_id, tok.unk_id) == (sp.bos_id(), sp.eos_id(), sp.unk_id())
    assert tok.vocab_size == sp.get_piece_size()
    for text in SAMPLES:
        ids = sp.encode(text)
        assert tok.encode(text, add_bos=False) == ids
        assert tok.encode(text) == [sp.bos_id(), *ids]  # LlamaTokenizer default: BOS on, EOS off
        assert tok.encode(text, add_eos=True)[-1] == sp.eos_id()
        assert tok.decode(ids) == sp.decode(ids)
        assert tok.decode([sp.bos_id(), *ids, sp.eos_id()]) == sp.decode(ids)


def test_sentencepiece_special_tokens_in_text(sp_dir, tmp_path):
    for name in ("tokenizer.model",):
        (tmp_path / name).write_bytes((sp_dir / name).read_bytes())
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    n = sp.get_piece_size()
    config = {"add_bos_token": False, "pad_token": {"content": "<pad>"},
              "added_tokens_decoder": {str(n): {"content": "<pad>", "special": True}}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.pad_id == n and tok.vocab_size == n + 1
    ids = tok.encode("<s>the cat</s><pad>")
    assert ids == [sp.bos_id(), *sp.encode("the cat"), sp.eos_id(), n]
    assert tok.decode(ids) == "the cat"
    assert tok.decode(ids, skip_special_tokens=False) == "<s>the cat</s><pad>"


def test_tokenizer_json_agrees_with_tokenizers(tmp_path):
    root = bpe_dir(tmp_path, ["<s>", "</s>"], post_bos=True, config={"bos_token": "<s>", "eos_token": "</s>"})
    ref = tokenizers.Tokenizer.from_file(str(root / "tokenizer.json"))
    tok = Tokenizer.from_pretrained(root)
    assert (tok.bos_id, tok.eos_id) == (ref.token_to_id("<s>"), ref.token_to_id("</s>"))
    assert tok.add_bos and not tok.add_eos  # read from the post-processor
    for text in SAMPLES + ["<s>special</s> inside"]:
        assert tok.encode(text) == ref.encode(text).ids
        ids = ref.encode(text, add_special_tokens=False).ids
        assert tok.encode(text, add_bos=False) == ids
        assert tok.decode(ids) == ref.decode(ids)
        assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)


TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}{% endif %}"
    "{{ bos_token }}{% for m in messages %}{% if loop.first %}{{ '[SYS]' + m['content'] | tojson }}\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_matches_transformers(tmp_path, add_generation_prompt):
    config = {"bos_token": "<s>", "eos_token": "<|im_end|>", "chat_template": TEMPLATE,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    root = bpe_dir(tmp_path, ["<s>", "<|im_start|>", "<|im_end|>"], config=config)
    ours = Tokenizer.from_pretrained(root)
    ref = transformers.AutoTokenizer.from_pretrained(str(root))
    text = ours.apply_chat_template(CHAT, add_generation_prompt=add_generation_prompt)
    assert text == ref.apply_chat_template(CHAT, add_generation_prompt=add_generation_prompt, tokenize=False)
    ids = ours.apply_chat_template(CHAT, add_generation_prompt=add_generation_prompt, tokenize=True)
    expected = ref.apply_chat_template(CHAT, add_generation_prompt=add_generation_prompt, tokenize=True,
                                       return_dict=False)
    assert ids == list(expected)
    with pytest.raises(jinja2.TemplateError, match="system first"):
        ours.apply_chat_template(CHAT[1:])


def test_chat_template_file_wins_and_named_templates(tmp_path):
    config = {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}
    root = bpe_dir(tmp_path, ["<s>"], config=config)
    assert Tokenizer.from_pretrained(root).apply_chat_template(CHAT) == "D"
    (root / "chat_template.jinja").write_text("{{ messages | length }}{% generation %}!{% endgeneration %}")
    assert Tokenizer.from_pretrained(root).apply_chat_template(CHAT) == "4!"


def test_fallback_llama3(tmp_path):
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    root = bpe_dir(tmp_path, specials, config={"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"})
    tok = Tokenizer.from_pretrained(root)
    text = tok.apply_chat_template(CHAT[:2], add_generation_prompt=True)
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = tok.apply_chat_template(CHAT[:2], add_generation_prompt=True, tokenize=True)
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id
    assert tok.stop_ids == {tok.eos_id, tok.token_to_id("<|eot_id|>")}


def test_fallback_chatml(tmp_path):
    root = bpe_dir(tmp_path, ["<|im_start|>", "<|im_end|>"], config={"eos_token": "<|im_end|>"})
    tok = Tokenizer.from_pretrained(root)
    assert tok.bos_id is None and tok.encode("a cat") == tok.encode("a cat", add_bos=False)
    text = tok.apply_chat_template(CHAT[1:3], add_generation_prompt=True)
    assert text == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n" \
                   "<|im_start|>assistant\n"


def test_fallback_llama2(sp_dir):
    tok = Tokenizer.from_pretrained(sp_dir)
    text = tok.apply_chat_template(CHAT)
    assert text == ("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST] Hello! </s>"
                    "<s>[INST] What is NF4? [/INST]")
    assert tok.apply_chat_template(CHAT[1:2]) == "<s>[INST] Hi there [/INST]"
    ids = tok.apply_chat_template(CHAT, tokenize=True)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 2 and ids.count(tok.eos_id) == 1
    with pytest.raises(jinja2.TemplateError, match="alternating"):
        tok.apply_chat_template([{"role": "assistant", "content": "x"}])


def test_missing_files_name_directory_and_files(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        Tokenizer.from_pretrained(tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and "tokenizer.json" in message and "tokenizer.model" in message
