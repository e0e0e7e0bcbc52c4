"""data.py: every JSONL shape, prompt masking, truncation, the eval split, padding, packing and the resumable loader.

Covers a sentencepiece tokenizer without a template of its own (plain prompt format, Llama-2 fallback for messages)
and a tokenizer.json with its own ChatML template, both trained in a temporary directory; every bad-input error.
Leaves out the loss on those batches (test_sft.py).
"""

import json

import pytest
import torch

from minqlora.data import (ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, IGNORE_INDEX, BatchLoader, collate,
                           has_own_chat_template, iter_batches, load_sft_data, make_rows, packed_attention_mask,
                           read_jsonl, split_eval, tokenize_record)
from minqlora.tokenizer import Tokenizer
from test_sft_helpers import chatml_dir, counting_records, sentencepiece_dir, write_jsonl

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the cat sat"},
        {"role": "assistant", "content": "on the mat"}, {"role": "user", "content": "what color"},
        {"role": "assistant", "content": "red ball"}]


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    return Tokenizer.from_pretrained(sentencepiece_dir(tmp_path_factory.mktemp("sp")))


@pytest.fixture(scope="module")
def chat_tok(tmp_path_factory):
    return Tokenizer.from_pretrained(chatml_dir(tmp_path_factory.mktemp("chatml")))


def trained_text(tok, ex) -> list[str]:
    """The trained tokens of an example, decoded as contiguous runs."""
    runs, run = [], []
    for i, label in zip(ex.input_ids, ex.labels):
        if label == IGNORE_INDEX:
            if run:
                runs.append(tok.decode(run, skip_special_tokens=False))
            run = []
        else:
            assert label == i
            run.append(i)
    return runs + ([tok.decode(run, skip_special_tokens=False)] if run else [])


def test_text_trains_every_token_but_the_first(sp_tok):
    ex = tokenize_record({"text": "the cat sat"}, sp_tok)
    assert ex.input_ids == sp_tok.encode("the cat sat", add_eos=True)
    assert ex.input_ids[0] == sp_tok.bos_id and ex.input_ids[-1] == sp_tok.eos_id
    assert ex.labels == [IGNORE_INDEX, *ex.input_ids[1:]]


def test_prompt_completion_plain(sp_tok):
    assert not has_own_chat_template(sp_tok)  # the Llama-2 fallback is a guess: "auto" uses the plain format
    ex = tokenize_record({"prompt": "repeat the cat :", "completion": " the cat"}, sp_tok)
    assert ex.input_ids == sp_tok.encode("repeat the cat : the cat", add_eos=True)
    assert trained_text(sp_tok, ex) == ["the cat</s>"]
    n_prompt = len(sp_tok.encode("repeat the cat :"))
    assert ex.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt and IGNORE_INDEX not in ex.labels[n_prompt:]


def test_alpaca_plain_uses_the_alpaca_prompts(sp_tok):
    with_input = {"instruction": "count", "input": "one two", "output": "three"}
    ex = tokenize_record(with_input, sp_tok)
    prompt = ALPACA_PROMPT.format(instruction="count", input="one two")
    assert ex.input_ids == sp_tok.encode(prompt + "three", add_eos=True)
    assert trained_text(sp_tok, ex) == ["three</s>"]
    ex = tokenize_record({"instruction": "count", "input": "", "output": "one"}, sp_tok)
    assert ex.input_ids == sp_tok.encode(ALPACA_PROMPT_NO_INPUT.format(instruction="count") + "one", add_eos=True)
    assert tokenize_record({"instruction": "count", "output": "one"}, sp_tok).input_ids == ex.input_ids
    assert tokenize_record({"instruction": "count", "input": None, "output": "one"}, sp_tok).input_ids == ex.input_ids


def test_messages_train_only_assistant_turns(chat_tok):
    assert has_own_chat_template(chat_tok)
    ex = tokenize_record({"messages": CHAT}, chat_tok)
    assert ex.input_ids == chat_tok.apply_chat_template(CHAT, tokenize=True)
    # Each assistant turn trains its text, end-of-turn token and the template's newline; nothing else trains.
    assert trained_text(chat_tok, ex) == ["on the mat<|im_end|>\n", "red ball<|im_end|>\n"]


def test_messages_with_fallback_template(sp_tok):
    ex = tokenize_record({"messages": CHAT}, sp_tok)  # Llama-2 [INST] format: BOS per turn, EOS after answers
    assert ex.input_ids == sp_tok.apply_chat_template(CHAT, tokenize=True)
    runs = trained_text(sp_tok, ex)
    assert [t.replace(" ", "") for t in runs] == ["onthemat</s>", "redball</s>"]
    assert [i for i, label in zip(ex.input_ids, ex.labels) if label != IGNORE_INDEX].count(sp_tok.eos_id) == 2


@pytest.mark.parametrize("record, user, answer", [
    ({"prompt": "the cat", "completion": "sat"}, "the cat", "sat"),
    ({"instruction": "count", "input": "one two", "output": "three"}, "count\n\none two", "three"),
])
def test_prompt_completion_and_alpaca_as_chat(chat_tok, sp_tok, record, user, answer):
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    ex = tokenize_record(record, chat_tok)  # "auto": the tokenizer has its own template
    assert ex.input_ids == chat_tok.apply_chat_template(messages, tokenize=True)
    assert trained_text(chat_tok, ex) == [f"{answer}<|im_end|>\n"]
    assert tokenize_record(record, chat_tok, "chat").input_ids == ex.input_ids
    assert tokenize_record(record, chat_tok, "plain").input_ids != ex.input_ids
    forced = tokenize_record(record, sp_tok, "chat")  # "chat" uses even a fallback template
    assert forced.input_ids == sp_tok.apply_chat_template(messages, tokenize=True)


def test_all_shapes_load_from_one_file(tmp_path, sp_tok):
    records = [{"text": "the cat"}, {"prompt": "a", "completion": " b"}, {"messages": CHAT},
               {"instruction": "count", "input": "", "output": "one", "extra": 1}]
    path = write_jsonl(tmp_path / "mixed.jsonl", records, raw_lines=["", "   "])  # blank lines are skipped
    data = load_sft_data(path, sp_tok, seq_len=512)
    assert [ex.source for ex in data.train] == [f"{path}:{i}" for i in range(1, 5)]
    assert data.train_stats.records == data.train_stats.examples == 4 and data.eval == []
    assert data.train_stats.label_tokens == sum(sum(x != IGNORE_INDEX for x in ex.labels) for ex in data.train)


def test_truncation_is_counted(tmp_path, sp_tok):
    long = {"prompt": "repeat", "completion": " the cat sat on the mat" * 8}
    path = write_jsonl(tmp_path / "d.jsonl", [long, {"text": "the cat"}, long])
    data = load_sft_data(path, sp_tok, seq_len=20)
    assert data.train_stats.truncated == 2 and data.train_stats.dropped == 0
    assert [len(ex.input_ids) for ex in data.train] == [20, len(sp_tok.encode("the cat", add_eos=True)), 20]
    assert data.train[0].input_ids == sp_tok.encode("repeat" + long["completion"], add_eos=True)[:20]
    dropped = load_sft_data(path, sp_tok, seq_len=20, overflow="drop")
    assert (dropped.train_stats.dropped, len(dropped.train)) == (2, 1)
    with pytest.raises(ValueError, match=rf"{path}:1: example has \d+ tokens > seq_len 20 \(overflow='error'"):
        load_sft_data(path, sp_tok, seq_len=20, overflow="error")


def test_examples_losing_all_trained_tokens_are_dropped_and_all_gone_is_an_error(tmp_path, sp_tok):
    prompt_only = {"prompt": "the cat sat on the mat " * 6, "completion": " red"}
    path = write_jsonl(tmp_path / "d.jsonl", [prompt_only, {"text": "the cat"}])
    data = load_sft_data(path, sp_tok, seq_len=10)
    assert (data.train_stats.dropped, data.train_stats.dropped_sources, len(data.train)) == (1, [f"{path}:1"], 1)
    write_jsonl(path, [prompt_only, prompt_only])
    with pytest.raises(ValueError, match=rf"{path}: all 2 examples were truncated away at seq_len=10"):
        load_sft_data(path, sp_tok, seq_len=10)


def test_bad_input_errors_name_file_line_and_keys(tmp_path, sp_tok):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}], raw_lines=['{"text": "unterminated'])
    with pytest.raises(ValueError, match=rf"{path}:2: malformed JSON"):
        read_jsonl(path)
    write_jsonl(path, [{"text": "ok"}], raw_lines=["[1, 2]"])
    with pytest.raises(ValueError, match=rf"{path}:2: expected a JSON object, got list"):
        read_jsonl(path)
    write_jsonl(path, [{"text": "ok"}, {"question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match=rf"{path}:2: unknown record shape, keys seen: \['answer', 'question'\]"):
        load_sft_data(path, sp_tok, 64)
    cases = [({"text": 3}, "field 'text' must be a string, got int"),
             ({"messages": []}, "'messages' must be a non-empty list"),
             ({"messages": [{"role": "user"}]}, r"messages\[0\] must be an object with string 'role' and 'content'"),
             ({"messages": [{"role": "robot", "content": "x"}]}, r"messages\[0\] has role 'robot'"),
             ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message")]
    for record, message in cases:
        write_jsonl(path, [{"text": "ok"}, {"text": "ok"}, record])
        with pytest.raises(ValueError, match=rf"{path}:3: {message}"):
            load_sft_data(path, sp_tok, 64)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="empty.jsonl holds no records"):
        read_jsonl(tmp_path / "empty.jsonl")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="prompt_format must be one of"):
        tokenize_record({"text": "a"}, sp_tok, "fancy")
    write_jsonl(path, [{"messages": [{"role": "assistant", "content": "hi"}]}])  # Llama-2 needs a user first
    with pytest.raises(ValueError, match=rf"{path}:1: the chat template refused these messages: .*alternating"):
        load_sft_data(path, sp_tok, 64)
    write_jsonl(path, [{"text": "ok"}])
    with pytest.raises(ValueError, match="overflow one of .* got 'auto' and 'wrap'"):
        load_sft_data(path, sp_tok, 64, overflow="wrap")


def test_eval_split_is_deterministic_by_seed(tmp_path, sp_tok):
    path = write_jsonl(tmp_path / "d.jsonl", counting_records(40))
    a = load_sft_data(path, sp_tok, 64, eval_fraction=0.1, seed=3)
    b = load_sft_data(path, sp_tok, 64, eval_fraction=0.1, seed=3)
    c = load_sft_data(path, sp_tok, 64, eval_fraction=0.1, seed=4)
    sources = lambda d: [ex.source for ex in d.eval]  # noqa: E731
    assert len(a.eval) == 4 and len(a.train) == 36 and sources(a) == sources(b) != sources(c)
    assert not set(sources(a)) & {ex.source for ex in a.train}
    assert split_eval(list(range(5)), 0.01, 0)[1] != []  # a positive fraction holds out at least one record
    with pytest.raises(ValueError, match="leaves nothing to train on"):
        split_eval([1], 0.5, 0)
    other = write_jsonl(tmp_path / "eval.jsonl", counting_records(3, seed=9))
    d = load_sft_data(path, sp_tok, 64, eval_path=other, eval_fraction=0.5)
    assert len(d.train) == 40 and [ex.source for ex in d.eval] == [f"{other}:{i}" for i in (1, 2, 3)]


def test_collate_pads_right_with_masks(sp_tok):
    exs = [tokenize_record(r, sp_tok) for r in counting_records(3)]
    batch = collate([[ex] for ex in exs], pad_id=0)
    lengths = [len(ex.input_ids) for ex in exs]
    assert batch.input_ids.shape == (3, max(lengths)) and not batch.packed
    for b, ex in enumerate(exs):
        n = len(ex.input_ids)
        assert batch.input_ids[b, :n].tolist() == ex.input_ids and batch.labels[b, :n].tolist() == ex.labels
        assert batch.attention_mask[b].tolist() == [1] * n + [0] * (batch.input_ids.shape[1] - n)
        assert (batch.labels[b, n:] == IGNORE_INDEX).all() and (batch.input_ids[b, n:] == 0).all()
        assert batch.position_ids[b, :n].tolist() == list(range(n))
    assert batch.num_tokens == sum(lengths)
    assert batch.num_label_tokens == sum(sum(x != IGNORE_INDEX for x in ex.labels) for ex in exs)


def test_packing_rows_and_block_diagonal_mask(sp_tok):
    exs = [tokenize_record(r, sp_tok) for r in counting_records(30)]
    rows = make_rows(exs, seq_len=96, packing=True, seed=1)
    assert sorted(id(ex) for row in rows for ex in row) == sorted(id(ex) for ex in exs)  # each exactly once
    assert all(sum(len(ex.input_ids) for ex in row) <= 96 for row in rows) and len(rows) < len(exs) / 2
    assert make_rows(exs, 96, True, seed=1) == rows and len(rows[0]) > 1
    batch = collate(rows[:2], pad_id=0)
    assert batch.packed
    row, t = rows[0], 0
    for k, ex in enumerate(row, 1):
        n = len(ex.input_ids)
        assert batch.position_ids[0, t:t + n].tolist() == list(range(n))  # positions restart per example
        assert batch.segment_ids[0, t:t + n].tolist() == [k] * n
        t += n
    mask = packed_attention_mask(batch.segment_ids)
    assert mask.shape == (2, 1, batch.input_ids.shape[1], batch.input_ids.shape[1]) and mask.dtype == torch.bool
    seg = batch.segment_ids[0]
    for q in range(len(seg)):
        for k in range(len(seg)):
            expected = (k <= q and seg[q] == seg[k] and seg[q] > 0) or q == k
            assert mask[0, 0, q, k].item() == expected


def test_loader_order_is_seeded_and_position_resumes_exactly(sp_tok):
    rows = make_rows([tokenize_record(r, sp_tok) for r in counting_records(10)], 64, packing=False)
    ids = lambda b: [r[m.bool()].tolist() for r, m in zip(b.input_ids, b.attention_mask)]  # noqa: E731
    a = BatchLoader(rows, batch_size=3, pad_id=0, seed=7)
    assert len(a) == 4
    run = [ids(a.next_batch()) for _ in range(11)]  # crosses two epoch boundaries (the last batch holds one row)
    assert a.position == (2, 3)
    b = BatchLoader(rows, batch_size=3, pad_id=0, seed=7)
    first_epoch = [ids(b.next_batch()) for _ in range(4)]
    assert sorted(r for batch in first_epoch for r in batch) == sorted(ids(collate(rows, 0)))  # a permutation
    assert first_epoch == run[:4] and run[4:8] != run[:4]  # reshuffled each epoch
    state = json.loads(json.dumps(b.next_batch() and b.state_dict()))
    c = BatchLoader(rows, batch_size=3, pad_id=0, seed=7)
    c.load_state_dict(state)
    assert [ids(c.next_batch()) for _ in range(6)] == run[5:]
    other = BatchLoader(rows, batch_size=3, pad_id=0, seed=8)
    assert ids(other.next_batch()) != run[0]
    with pytest.raises(ValueError, match="data position was saved for different data: seed"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="fingerprint"):
        BatchLoader(rows[:-1] + [rows[0]], batch_size=3, pad_id=0, seed=7).load_state_dict(state)
    assert [ids(x) for x in iter_batches(rows, 4, 0)] == [ids(collate(rows[i:i + 4], 0)) for i in (0, 4, 8)]
