"""SFT data: JSONL records -> token ids with labels on the trained tokens only; truncation, eval split, padding,
packing, and shuffled batches whose position (epoch, index) saves and restores for an exact resume.

Record shapes, one JSON object per line (blank lines are skipped):
- {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]}: the tokenizer's chat template;
  loss on every assistant turn (its text and the template's end-of-turn token), nothing else.
- {"prompt": str, "completion": str}: loss on the completion.
- {"instruction": str, "input": str (optional), "output": str} (Alpaca): loss on the output.
- {"text": str}: loss on every token (BOS ... EOS).
prompt/completion and Alpaca records become a user/assistant chat when the format is "chat" (or "auto" and the
tokenizer directory ships its own chat template); otherwise the PLAIN format: BOS + prompt + completion + EOS, where
an Alpaca prompt is the Stanford Alpaca template (ALPACA_PROMPT / ALPACA_PROMPT_NO_INPUT) and a prompt/completion
prompt is used verbatim (the record owns its separators).

Labels follow Hugging Face: labels[t] = input_ids[t] where trained, IGNORE_INDEX elsewhere, and the loss shifts
(logits at t predict labels[t + 1]). The first token of every example is always IGNORE_INDEX (nothing predicts it),
so (labels != IGNORE_INDEX).sum() counts the predicted tokens exactly, packed or not.

Leaves out: streaming data larger than memory (files are read and tokenized once, up front), dataset mixtures,
per-turn loss weights, ShareGPT's {"from", "value"} turns, and the loss itself (sft.py).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import numpy as np
import torch

from .tokenizer import CHATML_TEMPLATE, LLAMA2_TEMPLATE, LLAMA3_TEMPLATE, Tokenizer

IGNORE_INDEX = -100  # label value that F.cross_entropy(ignore_index=-100) skips
PROMPT_FORMATS = ("auto", "chat", "plain")
OVERFLOW_POLICIES = ("truncate", "drop", "error")
CHAT_ROLES = ("system", "user", "assistant", "tool")
FALLBACK_TEMPLATES = (LLAMA3_TEMPLATE, CHATML_TEMPLATE, LLAMA2_TEMPLATE)  # tokenizer.py's guesses, not the model's own
SHAPES = "messages; prompt + completion; instruction + output (+ input); text"

# Stanford Alpaca's prompts (github.com/tatsu-lab/stanford_alpaca, train.py PROMPT_DICT), used by the plain format.
ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                 "Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. "
                          "Write a response that appropriately completes the request.\n\n"
                          "### Instruction:\n{instruction}\n\n### Response:\n")


@dataclass
class Example:
    input_ids: list[int]  # token ids, BOS first when the tokenizer or template adds one
    labels: list[int]  # same length: the id where trained, IGNORE_INDEX elsewhere (always at position 0)
    source: str  # "file:line", for error messages and truncation reports


@dataclass
class DataStats:
    records: int = 0  # records read
    truncated: int = 0  # examples cut to seq_len that kept some trained tokens
    dropped: int = 0  # examples removed: longer than seq_len with overflow="drop", or truncated to no trained tokens
    examples: int = 0  # examples kept
    tokens: int = 0  # tokens in the kept examples
    label_tokens: int = 0  # trained tokens in the kept examples
    dropped_sources: list[str] = field(default_factory=list)  # "file:line" of the first few dropped examples


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) int64, right-padded
    labels: torch.Tensor  # (B, T) int64, IGNORE_INDEX on padding and untrained tokens
    attention_mask: torch.Tensor  # (B, T) int64, 1 = real token, 0 = padding
    position_ids: torch.Tensor  # (B, T) int64, restarting at 0 for every example (packing), 0 on padding
    segment_ids: torch.Tensor  # (B, T) int64, 1, 2, ... per example within a row, 0 on padding
    packed: bool  # some row holds more than one example: attention must be block-diagonal (packed_attention_mask)
    num_tokens: int  # real tokens, attention_mask.sum()
    num_label_tokens: int  # trained (predicted) tokens, (labels != IGNORE_INDEX).sum()


# -- reading -------------------------------------------------------------------------------------------------------

def read_jsonl(path) -> list[tuple[int, dict]]:
    """(line number, record) for every non-blank line; errors name the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
            records.append((line_no, record))
    if not records:
        raise ValueError(f"{path} holds no records (empty dataset)")
    return records


def record_shape(record: dict, where: str) -> str:
    """"messages", "prompt_completion", "alpaca" or "text"; an unknown shape raises, naming the keys seen."""
    keys = set(record)
    if "messages" in keys:
        shape, fields = "messages", ()
    elif {"prompt", "completion"} <= keys:
        shape, fields = "prompt_completion", ("prompt", "completion")
    elif {"instruction", "output"} <= keys:
        shape, fields = "alpaca", ("instruction", "input", "output")
    elif "text" in keys:
        shape, fields = "text", ("text",)
    else:
        raise ValueError(f"{where}: unknown record shape, keys seen: {sorted(keys)}; expected one of: {SHAPES}")
    for name in fields:
        if name in record and not isinstance(record[name], str) and not (name == "input" and record[name] is None):
            raise ValueError(f"{where}: field {name!r} must be a string, got {type(record[name]).__name__}")
    if shape == "messages":
        _check_messages(record["messages"], where)
    return shape


def _check_messages(messages, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: messages[{i}] must be an object with string 'role' and 'content', got {m!r}")
        if m["role"] not in CHAT_ROLES:
            raise ValueError(f"{where}: messages[{i}] has role {m['role']!r}; expected one of {CHAT_ROLES}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: no assistant message, so nothing to train on")


# -- tokenizing ----------------------------------------------------------------------------------------------------

def has_own_chat_template(tokenizer: Tokenizer) -> bool:
    """True when the model directory ships a chat template (not one of tokenizer.py's vocabulary-based guesses)."""
    return tokenizer.chat_template not in FALLBACK_TEMPLATES


def tokenize_record(record: dict, tokenizer: Tokenizer, prompt_format: str = "auto", where: str = "") -> Example:
    """One record -> Example with labels on the trained tokens (see the module docstring for each shape)."""
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
    shape = record_shape(record, where)
    if shape == "text":
        ids = tokenizer.encode(record["text"], add_eos=True)
        return Example(ids, [IGNORE_INDEX, *ids[1:]], where)
    if shape == "messages":
        return _chat_example(record["messages"], tokenizer, where)
    if shape == "prompt_completion":
        prompt, completion = record["prompt"], record["completion"]
        user = prompt
    else:
        extra = record.get("input") or ""
        user = record["instruction"] + (f"\n\n{extra}" if extra else "")
        template = ALPACA_PROMPT if extra else ALPACA_PROMPT_NO_INPUT
        prompt, completion = template.format(instruction=record["instruction"], input=extra), record["output"]
    chat = prompt_format == "chat" or (prompt_format == "auto" and has_own_chat_template(tokenizer))
    if chat:
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": completion}]
        return _chat_example(messages, tokenizer, where)
    ids = tokenizer.encode(prompt + completion, add_eos=True)
    start = _common_prefix(tokenizer.encode(prompt, add_eos=False), ids)
    return Example(ids, _labels(ids, [(start, len(ids))]), where)


def _chat_example(messages: list[dict], tokenizer: Tokenizer, where: str) -> Example:
    """Render the whole chat once; each assistant turn is the text between the prompt that asks for it
    (messages before it + generation prompt) and the chat rendered through it."""
    try:
        full = tokenizer.apply_chat_template(messages)
        prefixes = [(i, tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True),
                     tokenizer.apply_chat_template(messages[:i + 1]))
                    for i, m in enumerate(messages) if m["role"] == "assistant"]
    except jinja2.TemplateError as e:  # e.g. Llama-2's template refuses roles that do not alternate
        raise ValueError(f"{where}: the chat template refused these messages: {e}") from None
    ids = tokenizer.encode(full, add_bos=False, add_eos=False)  # the template writes BOS itself
    spans = []
    for i, start_text, end_text in prefixes:
        if not (full.startswith(start_text) and full.startswith(end_text)):
            raise ValueError(f"{where}: the chat template does not render messages[:{i}] as a prefix of the whole "
                             "chat, so assistant turn boundaries cannot be found; use a prefix-stable template")
        spans.append((_token_boundary(tokenizer, start_text, ids), _token_boundary(tokenizer, end_text, ids)))
    return Example(ids, _labels(ids, spans), where)


def _token_boundary(tokenizer: Tokenizer, prefix_text: str, ids: list[int]) -> int:
    # Tokens of the whole text that the prefix's own encoding agrees with. A token that merges across the boundary
    # (rare: templates put special tokens there) falls after it, so it counts as the later part.
    return _common_prefix(tokenizer.encode(prefix_text, add_bos=False, add_eos=False), ids)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _labels(ids: list[int], spans: list[tuple[int, int]]) -> list[int]:
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        labels[max(start, 1):end] = ids[max(start, 1):end]  # position 0 is never predicted
    return labels


# -- loading: truncation and the eval split --------------------------------------------------------------------------

def fit_to_length(examples: list[Example], seq_len: int, overflow: str, stats: DataStats) -> list[Example]:
    """Cut (truncate), remove (drop) or refuse (error) examples longer than seq_len; count what happened in stats.

    A truncated example left without trained tokens is dropped: it would only cost compute.
    """
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}, got {overflow!r}")
    kept = []
    for ex in examples:
        if len(ex.input_ids) > seq_len:
            if overflow == "error":
                raise ValueError(f"{ex.source}: example has {len(ex.input_ids)} tokens > seq_len {seq_len} "
                                 "(overflow='error'; use 'truncate' or 'drop', or raise seq_len)")
            if overflow == "truncate":
                ex = Example(ex.input_ids[:seq_len], ex.labels[:seq_len], ex.source)
            if overflow == "drop" or all(x == IGNORE_INDEX for x in ex.labels):
                stats.dropped += 1
                if len(stats.dropped_sources) < 5:
                    stats.dropped_sources.append(ex.source)
                continue
            stats.truncated += 1
        kept.append(ex)
        stats.tokens += len(ex.input_ids)
        stats.label_tokens += sum(x != IGNORE_INDEX for x in ex.labels)
    stats.examples += len(kept)
    return kept


def tokenize_records(records: list[tuple[int, dict]], source, tokenizer: Tokenizer, seq_len: int,
                     prompt_format: str = "auto", overflow: str = "truncate") -> tuple[list[Example], DataStats]:
    """(line, record) pairs read from `source` -> fitted Examples and their stats; refuses an empty result."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (one input and one predicted token), got {seq_len}")
    if prompt_format not in PROMPT_FORMATS or overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS} and overflow one of {OVERFLOW_POLICIES}, "
                         f"got {prompt_format!r} and {overflow!r}")
    stats = DataStats(records=len(records))
    examples = [tokenize_record(r, tokenizer, prompt_format, f"{source}:{line}") for line, r in records]
    kept = fit_to_length(examples, seq_len, overflow, stats)
    if not kept:
        raise ValueError(f"{source}: all {len(records)} examples were truncated away at seq_len={seq_len} (none "
                         f"keeps a trained token; first: {', '.join(stats.dropped_sources)}); raise seq_len")
    return kept, stats


@dataclass
class SFTData:
    train: list[Example]  # training examples, file order
    eval: list[Example]  # held-out examples (eval file, or the seeded split); may be empty
    train_stats: DataStats
    eval_stats: DataStats


def load_sft_data(path, tokenizer: Tokenizer, seq_len: int, prompt_format: str = "auto", overflow: str = "truncate",
                  eval_path=None, eval_fraction: float = 0.0, seed: int = 0) -> SFTData:
    """Read, split, tokenize and fit: `eval_path` when given, else `eval_fraction` of `path` held out by `seed`."""
    records = read_jsonl(path)
    if eval_path is not None:
        eval_records = read_jsonl(eval_path)
    else:
        records, eval_records = split_eval(records, eval_fraction, seed)
    train, train_stats = tokenize_records(records, path, tokenizer, seq_len, prompt_format, overflow)
    evals, eval_stats = [], DataStats()
    if eval_records:
        evals, eval_stats = tokenize_records(eval_records, eval_path or path, tokenizer, seq_len, prompt_format,
                                             overflow)
    return SFTData(train, evals, train_stats, eval_stats)


def split_eval(records: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """(train, eval): round(eval_fraction * n) records (at least 1 when the fraction is > 0) held out by a seeded
    permutation, so the split depends only on the file and the seed. Both keep file order."""
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n = len(records)
    n_eval = max(1, round(eval_fraction * n)) if eval_fraction > 0 else 0
    if n_eval >= n:
        raise ValueError(f"eval_fraction={eval_fraction} of {n} records leaves nothing to train on")
    held = set(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:n_eval].tolist())
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


# -- rows, batches and the resumable loader ------------------------------------------------------------------------

def make_rows(examples: list[Example], seq_len: int, packing: bool, seed: int = 0) -> list[list[Example]]:
    """One example per row, or (packing) examples in a seeded random order filled greedily into rows of at most
    seq_len tokens; a row closes when the next example does not fit."""
    if not packing:
        return [[ex] for ex in examples]
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    rows, row, used = [], [], 0
    for i in order:
        ex = examples[i]
        if row and used + len(ex.input_ids) > seq_len:
            rows.append(row)
            row, used = [], 0
        row.append(ex)
        used += len(ex.input_ids)
    return rows + [row] if row else rows


def collate(rows: list[list[Example]], pad_id: int) -> Batch:
    """Concatenate each row's examples and right-pad every row to the longest; CPU tensors."""
    width = max(sum(len(ex.input_ids) for ex in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    segment_ids = torch.zeros(shape, dtype=torch.long)
    for b, row in enumerate(rows):
        t = 0
        for k, ex in enumerate(row, 1):
            n = len(ex.input_ids)
            input_ids[b, t:t + n] = torch.tensor(ex.input_ids)
            labels[b, t:t + n] = torch.tensor(ex.labels)
            position_ids[b, t:t + n] = torch.arange(n)
            segment_ids[b, t:t + n] = k
            t += n
    attention_mask = (segment_ids > 0).long()
    return Batch(input_ids, labels, attention_mask, position_ids, segment_ids, packed=any(len(r) > 1 for r in rows),
                 num_tokens=int(attention_mask.sum()), num_label_tokens=int((labels != IGNORE_INDEX).sum()))


def shard_batch(batch: Batch, rank: int, world_size: int) -> Batch:
    """Rank `rank`'s share of a global batch (distributed.py): contiguous rows, shares differing by at most one
    row, trailing columns that none of its rows uses dropped. A rank left without a row (a global batch smaller
    than the world) gets the first row with every label ignored: it still runs forward and backward, as the
    collectives need, and adds nothing to the loss or the gradients."""
    if world_size == 1:
        return batch
    n = batch.input_ids.shape[0]
    lo, hi = rank * n // world_size, (rank + 1) * n // world_size
    rows = slice(lo, hi) if hi > lo else slice(0, 1)
    mask = batch.attention_mask[rows]
    width = int(mask.sum(0).nonzero().max()) + 1 if mask.any() else 1
    labels = batch.labels[rows, :width] if hi > lo else torch.full_like(batch.labels[rows, :width], IGNORE_INDEX)
    segments = batch.segment_ids[rows, :width]
    return Batch(batch.input_ids[rows, :width], labels, mask[:, :width], batch.position_ids[rows, :width], segments,
                 packed=bool((segments > 1).any()), num_tokens=int(mask[:, :width].sum()) if hi > lo else 0,
                 num_label_tokens=int((labels != IGNORE_INDEX).sum()))


def iter_batches(rows: list[list[Example]], batch_size: int, pad_id: int):
    """Batches of `batch_size` rows in order, once through (evaluation)."""
    for start in range(0, len(rows), batch_size):
        yield collate(rows[start:start + batch_size], pad_id)


def packed_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) segment ids -> (B, 1, T, T) boolean, True = attend: causal within each example, nothing across.

    Padding (segment 0) attends only to itself: a fully masked row would make SDPA return NaN.
    """
    t = segment_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
    allowed = same & causal & (segment_ids[:, :, None] > 0)
    return (allowed | torch.eye(t, dtype=torch.bool, device=segment_ids.device))[:, None]


def rows_fingerprint(rows: list[list[Example]]) -> str:
    """sha256 of every row's ids and labels: a resumed run must see exactly the data it was checkpointed on."""
    h = hashlib.sha256()
    for row in rows:
        for ex in row:
            h.update(np.asarray(ex.input_ids, dtype=np.int64).tobytes())
            h.update(np.asarray(ex.labels, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()


class BatchLoader:
    """Rows -> batches of `batch_size` rows, reshuffled every epoch by (seed, epoch); the last batch of an epoch
    may be smaller. `position` (epoch, index of the next batch in that epoch) is all the state there is:
    state_dict() / load_state_dict() restore it, so a resumed run draws exactly the batches it would have."""

    def __init__(self, rows: list[list[Example]], batch_size: int, pad_id: int, seed: int = 0, shuffle: bool = True):
        if not rows:
            raise ValueError("BatchLoader: no rows (empty dataset)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.rows, self.batch_size, self.pad_id = rows, batch_size, pad_id
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.index = 0, 0
        self.fingerprint = rows_fingerprint(rows)
        self._order_epoch, self._order = None, None

    def __len__(self) -> int:
        """Batches per epoch."""
        return math.ceil(len(self.rows) / self.batch_size)

    @property
    def position(self) -> tuple[int, int]:
        return self.epoch, self.index

    def order(self, epoch: int) -> list[int]:
        if self._order_epoch != epoch:
            if self.shuffle:
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._order = torch.randperm(len(self.rows), generator=gen).tolist()
            else:
                self._order = list(range(len(self.rows)))
            self._order_epoch = epoch
        return self._order

    def next_batch(self) -> Batch:
        start = self.index * self.batch_size
        picked = self.order(self.epoch)[start:start + self.batch_size]
        self.index += 1
        if self.index == len(self):
            self.epoch, self.index = self.epoch + 1, 0
        return collate([self.rows[i] for i in picked], self.pad_id)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "batch_size": self.batch_size,
                "num_rows": len(self.rows), "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        for key, ours in (("num_rows", len(self.rows)), ("batch_size", self.batch_size), ("seed", self.seed),
                          ("fingerprint", self.fingerprint)):
            if state[key] != ours:
                raise ValueError(f"data position was saved for different data: {key} {state[key]!r} != {ours!r} "
                                 "(the data file, tokenizer, seq_len, packing, batch size or seed changed)")
        self.epoch, self.index = state["epoch"], state["index"]
