"""Autoregressive decoding with a KV cache: greedy or sampled (temperature, top-k, top-p), token and text streams.

Covers `generate` (prompt + new tokens as one tensor), `generate_tokens` (an iterator over new token columns),
`stream_text` (an iterator over decoded text pieces, batch 1) and the `IncrementalDecoder` behind it. Batches
may be left-padded with an attention mask; rows that hit a stop id emit `pad_token_id` until every row stopped.

Leaves out: beam search, repetition penalties, speculative decoding, chat formatting (tokenizer.py) and model
loading (checkpoint.py). Works on any `Llama` whose projections were swapped for quantized or LoRA modules.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from minqlora.model import KVCache, Llama


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256  # tokens generated after the prompt, per row, at most
    do_sample: bool = False  # False: greedy argmax; True: sample from the temperature/top-k/top-p distribution
    temperature: float = 1.0  # logits are divided by this before filtering (sampling only); must be > 0
    top_k: int = 0  # keep only the k most likely tokens; 0 disables (sampling only)
    top_p: float = 1.0  # keep the smallest most-likely set with probability >= top_p; 1.0 disables (sampling only)
    stop_ids: int | Iterable[int] | None = None  # a row stops after emitting any of these (EOS, end-of-turn)
    pad_token_id: int | None = None  # emitted by rows that already stopped; None means the smallest stop id, or 0

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (use do_sample=False for greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def stop_set(self) -> set[int]:
        if self.stop_ids is None:
            return set()
        return {self.stop_ids} if isinstance(self.stop_ids, int) else {int(i) for i in self.stop_ids}

    @property
    def pad_id(self) -> int:
        if self.pad_token_id is not None:
            return self.pad_token_id
        return min(self.stop_set, default=0)


def filter_logits(logits: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    """Temperature, then top-k, then top-p (HF's order) on (B, V) fp32 logits; removed tokens become -inf."""
    logits = logits / config.temperature
    if config.top_k and config.top_k < logits.shape[-1]:
        kth = torch.topk(logits, config.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already reach top_p; the most likely token always stays.
        drop_sorted = (probs.cumsum(-1) - probs) >= config.top_p
        drop_sorted[:, 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits of the last position -> (B,) token ids."""
    logits = logits.float()
    if not config.do_sample:
        return logits.argmax(-1)  # ties go to the lowest id, as in transformers
    probs = filter_logits(logits, config).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _last_logits(model: Llama, ids: torch.Tensor, mask: torch.Tensor | None, cache: KVCache) -> torch.Tensor:
    # Only the last position needs the lm_head: a (B, T, vocab) prefill would cost T times the memory.
    hidden = model.model(ids, attention_mask=mask, cache=cache)  # (B, T, H)
    return model.lm_head(hidden[:, -1])  # (B, V)


@torch.inference_mode()
def generate_tokens(model: Llama, input_ids: torch.Tensor, config: GenerationConfig,
                    attention_mask: torch.Tensor | None = None,
                    generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,) per step, until all rows stopped or max_new_tokens.

    input_ids (B, T) long; attention_mask (B, T) of 1/0 for left-padded batches (right padding would put pad tokens
    between prompt and continuation); generator seeds sampling and must live on the model's device.
    """
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
    if config.max_new_tokens == 0:
        return
    b, t = input_ids.shape
    stops = torch.tensor(sorted(config.stop_set), dtype=torch.long, device=input_ids.device)
    cache = KVCache(len(model.model.layers), max_len=t + config.max_new_tokens)
    logits = _last_logits(model, input_ids, attention_mask, cache)
    finished = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
    for step in range(config.max_new_tokens):
        token = next_token(logits, config, generator)
        token = token.masked_fill(finished, config.pad_id)
        yield token
        finished |= torch.isin(token, stops)
        # CPU-GPU sync, once per token: decide whether every row has stopped.
        if step + 1 == config.max_new_tokens or bool(finished.all()):
            return
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(b, 1)], dim=1)
        logits = _last_logits(model, token[:, None], attention_mask, cache)


def generate(model: Llama, input_ids: torch.Tensor, config: GenerationConfig | None = None,
             attention_mask: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Prompt plus continuation, (B, T + new) long, like transformers' `generate` output."""
    config = config or GenerationConfig()
    tokens = list(generate_tokens(model, input_ids, config, attention_mask, generator))
    return torch.cat([input_ids, *(tok[:, None] for tok in tokens)], dim=1)


class IncrementalDecoder:
    """Turns a growing token list into text pieces whose concatenation is `tokenizer.decode(all_ids)`.

    Each push decodes the whole sequence and returns what is new past the text already returned, so tokens that
    only make sense together (sentencepiece's leading spaces, UTF-8 bytes of one character split over byte-level
    tokens) come out right. A piece is held back while the text ends in U+FFFD, the mark of a character whose
    remaining bytes are still to come. Decoding everything per token is O(n^2) in characters, negligible next to
    a forward pass for replies of a few thousand tokens.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") or len(text) <= len(self.emitted):
            return ""
        piece, self.emitted = text[len(self.emitted):], text
        return piece

    def flush(self) -> str:
        """The held-back rest; a character left incomplete at the end comes out as U+FFFD."""
        text = self.tokenizer.decode(self.ids)
        piece, self.emitted = text[len(self.emitted):], text
        return piece


def stream_text(model: Llama, tokenizer, input_ids: torch.Tensor, config: GenerationConfig | None = None,
                generator: torch.Generator | None = None) -> Iterator[str]:
    """Yield text pieces as they decode, batch 1; stop tokens end the stream and are not part of the text."""
    config = config or GenerationConfig()
    if input_ids.shape[0] != 1:
        raise ValueError(f"stream_text decodes one sequence; got batch size {input_ids.shape[0]}")
    decoder, stops = IncrementalDecoder(tokenizer), config.stop_set
    for token in generate_tokens(model, input_ids, config, generator=generator):
        if int(token[0]) in stops:
            break
        if piece := decoder.push(token[0]):
            yield piece
    if piece := decoder.flush():
        yield piece
