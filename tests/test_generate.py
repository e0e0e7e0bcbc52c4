"""Decoding against transformers' `generate`: greedy tokens (batch 1 and left-padded batches), seeded sampling,
top-k/top-p filtering, and text streaming over multi-byte characters; the fast loop (decode.py, static_cache.py)
against the readable one and against recomputing the whole sequence: logits, greedy and sampled tokens, chunked stop
checks, left padding, LoRA unmerged and merged, a 4-bit model, torch.compile, Decoder reuse and bad input.

Leaves out CUDA graphs (tests/cuda/test_generate_cuda.py: the same step replayed on a GPU).
"""

import pytest
import tokenizers
import torch
from tokenizers import decoders, models, pre_tokenizers, trainers

from hf_helpers import unit_scale_
from minqlora.decode import Decoder
from minqlora.generate import GenerationConfig, IncrementalDecoder, filter_logits, generate, stream_text
from minqlora.lora import add_lora, merge_lora
from minqlora.model import KVCache, Llama
from minqlora.sampling import _groups, argmax_in_groups
from minqlora.static_cache import StaticKVCache
from minqlora.tokenizer import Tokenizer
from test_lora import quantize_projections, randomize_adapters
from test_model import hf_pair, tiny_config

LOOPS = ("eager", "static")


@pytest.fixture(scope="module")
def pair():
    return hf_pair(tiny_config(num_attention_heads=4, num_key_value_heads=2, vocab_size=64), seed=5)


def prompt(n: int, seed: int, vocab: int = 64) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("loop", LOOPS)
def test_greedy_equals_transformers(pair, loop):
    hf, ours = pair
    ids = prompt(7, 0)
    free = generate(ours, ids, GenerationConfig(max_new_tokens=20, decode=loop))
    ones = torch.ones_like(ids)  # else transformers masks prompt tokens equal to pad_token_id
    expected = hf.generate(ids, attention_mask=ones, do_sample=False, max_new_tokens=20, min_new_tokens=20,
                           eos_token_id=None, pad_token_id=0)
    assert torch.equal(free, expected)
    # Stop on a token the model emits mid-way, given as a set with an id that never appears.
    stop = int(free[0, 7 + 6])
    got = generate(ours, ids, GenerationConfig(max_new_tokens=20, stop_ids={stop, 999}, decode=loop, check_every=4))
    expected = hf.generate(ids, attention_mask=ones, do_sample=False, max_new_tokens=20, eos_token_id=stop,
                           pad_token_id=0)
    assert torch.equal(got, expected)
    assert got.shape[1] < free.shape[1] and int(got[0, -1]) == stop


@pytest.mark.parametrize("loop", LOOPS)
def test_greedy_left_padded_batch_equals_transformers(pair, loop):
    hf, ours = pair
    g = torch.Generator().manual_seed(1)
    lengths = [9, 4, 6]
    ids = torch.zeros(3, 9, dtype=torch.long)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, 9 - n:] = torch.randint(1, 64, (n,), generator=g)
        mask[i, 9 - n:] = 1
    free = generate(ours, ids, GenerationConfig(max_new_tokens=12, decode=loop), attention_mask=mask)
    stop = int(free[1, 9 + 3])  # row 1 stops early; the others keep going
    cfg = GenerationConfig(max_new_tokens=12, stop_ids=stop, pad_token_id=0, decode=loop, check_every=5)
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
                                 dict(max_new_tokens=-1), dict(decode="fast"), dict(check_every=0)])
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


# -- the fast loop (decode.py) against the readable one ----------------------------------------------------------

def random_llama(seed: int = 3, **overrides) -> Llama:
    cfg = tiny_config(num_attention_heads=4, num_key_value_heads=2, vocab_size=64, **overrides)
    torch.manual_seed(seed)
    return unit_scale_(Llama(cfg)).eval()


def left_padded(lengths: list[int], seed: int = 4, vocab: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.zeros(len(lengths), t, dtype=torch.long)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, t - n:] = torch.randint(1, vocab, (n,), generator=g)
        mask[i, t - n:] = 1
    return ids, mask


@torch.no_grad()
def greedy_full_recompute(model: Llama, ids: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """No cache at all: every step runs the whole sequence (prompt + tokens so far) through the model."""
    for _ in range(n):
        token = model(ids, attention_mask=mask)[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    return ids


@torch.no_grad()
def test_static_cache_logits_equal_dynamic_cache_and_full_recompute():
    model = random_llama()
    ids, mask = left_padded([7, 3, 5])
    steps = torch.randint(0, 64, (3, 6), generator=torch.Generator().manual_seed(0))  # tokens fed after the prompt
    static = StaticKVCache.for_model(model, batch_size=3, max_len=20)  # room to spare: slots past the end stay unused
    dynamic = KVCache(len(model.model.layers), max_len=13)
    got_static = model(ids, attention_mask=mask, cache=static)[:, -1]
    got_dynamic = model(ids, attention_mask=mask, cache=dynamic)[:, -1]
    for j in range(steps.shape[1] + 1):
        full_mask = torch.cat([mask, torch.ones(3, j, dtype=torch.long)], 1)
        expected = model(torch.cat([ids, steps[:, :j]], 1), attention_mask=full_mask)[:, -1]
        assert expected.abs().max() > 1.0
        assert (got_static - expected).abs().max() <= 1e-4, j
        assert (got_dynamic - expected).abs().max() <= 1e-4, j
        if j < steps.shape[1]:
            got_static = model(steps[:, j:j + 1], cache=static)[:, -1]
            grown = torch.cat([full_mask, torch.ones(3, 1, dtype=torch.long)], 1)  # the dynamic mask covers the past
            got_dynamic = model(steps[:, j:j + 1], attention_mask=grown, cache=dynamic)[:, -1]
    assert static.next_slot.tolist() == [13] and static.next_position.tolist() == [13, 9, 11]
    assert static.written.sum(1).tolist() == [13, 9, 11]


def test_argmax_in_groups_equals_argmax_ties_and_nan_included():
    # The first maximum wins, within a group and across groups; a NaN counts as the maximum (the first NaN wins).
    assert (_groups(128256), _groups(128256 // 501), _groups(509)) == (1002, 2, 1)  # 509 is prime: one pass
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-3, 4, (6, 1002), generator=g).float()  # many ties: only 7 distinct values
    x[1, 700] = x[1, 5] = 9.0  # ties in different groups
    x[2, 40] = x[2, 41] = 9.0  # ties in one group
    x[3, 900] = float("nan")
    x[4, [300, 600]] = float("nan")
    x[5] = float("-inf")
    for groups in (2, 3, 6, 501):
        assert torch.equal(argmax_in_groups(x, groups), x.argmax(-1)), groups


def test_static_cache_mask_is_additive_in_the_cache_dtype():
    # What SDPA would make of the boolean mask, made once per forward: 0 = attend, -inf = not.
    cache = StaticKVCache(1, 2, 1, 6, 4, torch.bfloat16, "cpu")
    _, mask = cache.begin(torch.tensor([[0, 1, 1], [1, 1, 1]]), 3)
    assert mask.dtype == torch.bfloat16 and mask.shape == (2, 1, 3, 6)
    allowed = torch.tensor([[[1, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0]],  # slot 0 is padding
                            [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]]], dtype=torch.bool)
    assert torch.equal(mask[:, 0] == 0, allowed) and torch.equal(mask[:, 0] == float("-inf"), ~allowed)


@pytest.mark.parametrize("check_every", [1, 4, 32])
def test_static_equals_eager_equals_full_recompute_left_padded(check_every):
    model = random_llama()
    ids, mask = left_padded([8, 2, 5])
    eager = generate(model, ids, GenerationConfig(max_new_tokens=14, decode="eager"), attention_mask=mask)
    assert torch.equal(eager, greedy_full_recompute(model, ids, mask, 14))
    static = generate(model, ids, GenerationConfig(max_new_tokens=14, decode="static", check_every=check_every),
                      attention_mask=mask)
    assert torch.equal(static, eager)
    # Stops: row 0 stops early, then a stop every row reaches: the output ends exactly where the eager one does,
    # even inside a chunk of check_every tokens.
    for stop in (int(eager[0, 8 + 2]), {int(eager[r, 8 + 5 + r]) for r in range(3)}):
        cfg = dict(max_new_tokens=14, stop_ids=stop, pad_token_id=63)
        want = generate(model, ids, GenerationConfig(**cfg, decode="eager"), attention_mask=mask)
        got = generate(model, ids, GenerationConfig(**cfg, decode="static", check_every=check_every),
                       attention_mask=mask)
        assert torch.equal(got, want)
    assert want.shape[1] < eager.shape[1] and (want[:, 8:] == 63).any()


def test_static_equals_eager_with_lora_unmerged_and_merged():
    model = random_llama()
    add_lora(model, r=4, alpha=8, dropout=0.0)
    randomize_adapters(model, std=0.3)
    model.eval()
    ids, mask = left_padded([6, 4])
    cfg = dict(max_new_tokens=10)
    unmerged = generate(model, ids, GenerationConfig(**cfg, decode="eager"), attention_mask=mask)
    assert torch.equal(generate(model, ids, GenerationConfig(**cfg, decode="static"), attention_mask=mask), unmerged)
    plain = generate(random_llama(), ids, GenerationConfig(**cfg, decode="eager"), attention_mask=mask)
    assert not torch.equal(plain, unmerged)  # the adapter changes the continuation
    merge_lora(model)
    merged = generate(model, ids, GenerationConfig(**cfg, decode="eager"), attention_mask=mask)
    assert torch.equal(generate(model, ids, GenerationConfig(**cfg, decode="static"), attention_mask=mask), merged)


def test_static_equals_eager_4bit_model():
    model = quantize_projections(random_llama())
    ids, mask = left_padded([5, 9, 1])
    cfg = dict(max_new_tokens=12)
    eager = generate(model, ids, GenerationConfig(**cfg, decode="eager"), attention_mask=mask)
    assert torch.equal(eager, greedy_full_recompute(model, ids, mask, 12))
    assert torch.equal(generate(model, ids, GenerationConfig(**cfg, decode="static", check_every=5),
                                attention_mask=mask), eager)


def test_static_sampling_equals_eager_with_the_same_seed():
    # Both loops draw the Exp(1) race noise from the generator in the same order: same seed, same tokens.
    model = random_llama()
    ids, mask = left_padded([6, 3])
    cfg = dict(max_new_tokens=16, do_sample=True, temperature=1.3, top_k=30, top_p=0.9)
    runs = [generate(model, ids, GenerationConfig(**cfg, decode=loop), attention_mask=mask,
                     generator=torch.Generator().manual_seed(11)) for loop in LOOPS]
    assert torch.equal(runs[0], runs[1])
    other = generate(model, ids, GenerationConfig(**cfg, decode="static"), attention_mask=mask,
                     generator=torch.Generator().manual_seed(12))
    assert not torch.equal(other, runs[1])


def test_decoder_reused_across_calls_and_modes():
    model = random_llama()
    decoder = Decoder(model, batch_size=2, max_len=24)
    assert decoder.mode == "static"  # "auto" on a CPU
    for lengths, new in (([7, 2], 10), ([3, 3], 16), ([9, 4], 6)):
        ids, mask = left_padded(lengths, seed=sum(lengths))
        want = generate(model, ids, GenerationConfig(max_new_tokens=new, decode="eager"), attention_mask=mask)
        for check_every in (3, 16):
            cfg = GenerationConfig(max_new_tokens=new, check_every=check_every)
            assert torch.equal(generate(model, ids, cfg, attention_mask=mask, decoder=decoder), want)
        sampled = GenerationConfig(max_new_tokens=new, do_sample=True, top_k=5)
        seeded = [generate(model, ids, sampled, attention_mask=mask, generator=torch.Generator().manual_seed(1),
                           decoder=d) for d in (decoder, None)]
        assert torch.equal(seeded[0], seeded[1])


def test_compile_mode_equals_eager():
    # torch.compile of the decode step (inductor on a CPU: the graph is traced whole, fullgraph=True).
    model = random_llama()
    ids, mask = left_padded([5, 2])
    want = generate(model, ids, GenerationConfig(max_new_tokens=8, decode="eager"), attention_mask=mask)
    got = generate(model, ids, GenerationConfig(max_new_tokens=8, decode="compile", check_every=3),
                   attention_mask=mask)
    assert torch.equal(got, want)


def test_fast_loop_bad_input():
    model = random_llama()
    decoder = Decoder(model, batch_size=2, max_len=10)
    ids, mask = left_padded([4, 2])
    with pytest.raises(ValueError, match="batch size 3"):
        generate(model, ids.repeat(2, 1)[:3], GenerationConfig(max_new_tokens=2), decoder=decoder)
    with pytest.raises(ValueError, match="max_len 10"):
        generate(model, ids, GenerationConfig(max_new_tokens=7), attention_mask=mask, decoder=decoder)
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        generate(model, ids, GenerationConfig(max_new_tokens=2), attention_mask=mask[:, 1:], decoder=decoder)
    with pytest.raises(ValueError, match="needs a CUDA model"):
        Decoder(model, batch_size=1, max_len=8, mode="graph")
    with pytest.raises(ValueError, match="over the new tokens"):
        model(ids, attention_mask=mask[:, 1:], cache=StaticKVCache.for_model(model, 2, 8))
    with pytest.raises(ValueError, match="position_ids itself"):
        model(ids, position_ids=mask, cache=StaticKVCache.for_model(model, 2, 8))
