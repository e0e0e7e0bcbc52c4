"""Decoding against transformers' `generate`: greedy tokens (batch 1 and left-padded batches), seeded sampling,
top-k/top-p filtering, and text streaming over multi-byte characters.

Leaves out quantized models (the same loop runs them; linear4bit's tests cover the modules).
"""

import pytest
import tokenizers
import torch
from tokenizers import decoders, models, pre_tokenizers, trainers

from minqlora.generate import GenerationConfig, IncrementalDecoder, filter_logits, generate, stream_text
from minqlora.tokenizer import Tokenizer
from test_model import hf_pair, tiny_config


@pytest.fixture(scope="module")
def pair():
    return hf_pair(tiny_config(num_attention_heads=4, num_key_value_heads=2, vocab_size=64), seed=5)


def prompt(n: int, seed: int, vocab: int = 64) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def test_greedy_equals_transformers(pair):
    hf, ours = pair
    ids = prompt(7, 0)
    free = generate(ours, ids, GenerationConfig(max_new_tokens=20))
    ones = torch.ones_like(ids)  # else transformers masks prompt tokens equal to pad_token_id
    expected = hf.generate(ids, attention_mask=ones, do_sample=False, max_new_tokens=20, min_new_tokens=20,
                           eos_token_id=None, pad_token_id=0)
    assert torch.equal(free, expected)
    # Stop on a token the model emits mid-way, given as a set with an id that never appears.
    stop = int(free[0, 7 + 6])
    got = generate(ours, ids, GenerationConfig(max_new_tokens=20, stop_ids={stop, 999}))
    expected = hf.generate(ids, attention_mask=ones, do_sample=False, max_new_tokens=20, eos_token_id=stop,
                           pad_token_id=0)
    assert torch.equal(got, expected)
    assert got.shape[1] < free.shape[1] and int(got[0, -1]) == stop


def test_greedy_left_padded_batch_equals_transformers(pair):
    hf, ours = pair
    g = torch.Generator().manual_seed(1)
    lengths = [9, 4, 6]
    ids = torch.zeros(3, 9, dtype=torch.long)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, 9 - n:] = torch.randint(1, 64, (n,), generator=g)
        mask[i, 9 - n:] = 1
    free = generate(ours, ids, GenerationConfig(max_new_tokens=12), attention_mask=mask)
    stop = int(free[1, 9 + 3])  # row 1 stops early; the others keep going
    cfg = GenerationConfig(max_new_tokens=12, stop_ids=stop, pad_token_id=0)
    got = generate(ours, ids, cfg, attention_mask=mask)
    expected = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=12, eos_token_id=stop,
                           pad_token_id=0)
    assert torch.equal(got, expected)
    # Each row alone, unpadded, continues the same way until it stops.
    for i, n in enumerate(lengths):
        alone = generate(ours, ids[i:i + 1, 9 - n:], cfg)
        assert torch.equal(alone[0, n:], got[i, 9:9 + alone.shape[1] - n])


def test_sampling_is_reproducible_with_a_seed(pair):
    _, ours = pair
    ids = prompt(5, 2)
    cfg = GenerationConfig(max_new_tokens=30, do_sample=True, temperature=1.5, top_k=20, top_p=0.95)
    runs = [generate(ours, ids, cfg, generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    greedy = generate(ours, ids, GenerationConfig(max_new_tokens=30))
    for narrow in (GenerationConfig(max_new_tokens=30, do_sample=True, top_k=1),
                   GenerationConfig(max_new_tokens=30, do_sample=True, top_p=1e-6)):
        assert torch.equal(generate(ours, ids, narrow, generator=torch.Generator().manual_seed(3)), greedy)


def test_filter_logits_top_k_top_p_temperature():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()

    def kept(**kw):
        return torch.isfinite(filter_logits(logits, GenerationConfig(do_sample=True, **kw)))[0].tolist()

    assert kept(top_k=2) == [True, True, False, False]
    assert kept(top_p=0.7) == [True, True, False, False]  # 0.5 < 0.7 <= 0.8
    assert kept(top_p=0.45) == [True, False, False, False]
    assert kept(top_p=0.96) == [True, True, True, True]
    assert kept(top_k=3, top_p=0.7) == [True, True, False, False]
    scaled = filter_logits(logits, GenerationConfig(do_sample=True, temperature=2.0))
    assert torch.allclose(scaled, logits / 2)


@pytest.mark.parametrize("bad", [dict(temperature=0.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1),
                                 dict(max_new_tokens=-1)])
def test_bad_generation_config(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        GenerationConfig(**bad)


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    # Byte-level BPE trained on ASCII only, so "日本語🙂" decodes from single-byte tokens.
    root = tmp_path_factory.mktemp("bytes")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["the cat sat on the mat"] * 20, trainer)
    tok.save(str(root / "tokenizer.json"))
    return Tokenizer.from_pretrained(root)


def test_incremental_decoder_holds_back_split_characters(byte_tokenizer):
    text = "the café 日本語 🙂 end"
    ids = byte_tokenizer.encode(text)
    assert len(ids) > len(text.split())  # multi-byte characters really span several tokens
    decoder = IncrementalDecoder(byte_tokenizer)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "日" in pieces or "日本語" in "".join(pieces)


def test_stream_text_concatenates_to_the_decoded_continuation(byte_tokenizer):
    cfg = tiny_config(vocab_size=byte_tokenizer.vocab_size)
    _, ours = hf_pair(cfg, seed=9)
    ids = torch.tensor([byte_tokenizer.encode("the cat")])
    stop = byte_tokenizer.token_to_id("<|im_end|>")
    gen = GenerationConfig(max_new_tokens=40, do_sample=True, stop_ids=stop)
    pieces = list(stream_text(ours, byte_tokenizer, ids, gen, generator=torch.Generator().manual_seed(0)))
    full = generate(ours, ids, gen, generator=torch.Generator().manual_seed(0))[0, ids.shape[1]:].tolist()
    full = full[:full.index(stop)] if stop in full else full
    assert "".join(pieces) == byte_tokenizer.decode(full)
    assert all(pieces)
    with pytest.raises(ValueError, match="batch size"):
        next(stream_text(ours, byte_tokenizer, ids.repeat(2, 1), gen))
