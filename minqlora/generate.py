"""Autoregressive decoding with a KV cache: greedy or sampled (temperature, top-k, top-p), token and text streams.

Covers `generate` (prompt + new tokens as one tensor), `generate_tokens` (an iterator over new token columns),
`stream_text` (an iterator over decoded text pieces, batch 1) and the `IncrementalDecoder` behind it. Batches
may be left-padded with an attention mask; rows that hit a stop id emit `pad_token_id` until every row stopped.
The loop below is the readable one (config.decode="eager"); the others (static cache, CUDA graph, torch.compile)
live in decode.py and are dispatched to from `generate_tokens`; they give the same greedy tokens.

Leaves out: beam search, repetition penalties, speculative decoding, chat formatting (tokenizer.py), sampling and
the generation config (sampling.py) and model loading (checkpoint.py). Works on any `Llama` whose projections were
swapped for quantized or LoRA modules.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from minqlora.decode import Decoder
from minqlora.model import KVCache, Llama
from minqlora.sampling import GenerationConfig, filter_logits, last_logits, next_token

__all__ = ["GenerationConfig", "filter_logits", "next_token", "generate_tokens", "generate", "IncrementalDecoder",
           "stream_text"]


def _eager_tokens(model: Llama, input_ids: torch.Tensor, config: GenerationConfig,
                  attention_mask: torch.Tensor | None, generator: torch.Generator | None) -> Iterator[torch.Tensor]:
    # The readable loop: the KVCache grows by one position per step and the mask by one column.
    b, t = input_ids.shape
    stops = torch.tensor(sorted(config.stop_set), dtype=torch.long, device=input_ids.device)
    cache = KVCache(len(model.model.layers), max_len=t + config.max_new_tokens)
    logits = last_logits(model, input_ids, attention_mask, cache)
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
        logits = last_logits(model, token[:, None], attention_mask, cache)


@torch.inference_mode()
def generate_tokens(model: Llama, input_ids: torch.Tensor, config: GenerationConfig,
                    attention_mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
                    decoder: Decoder | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,) per step, until all rows stopped or max_new_tokens.

    input_ids (B, T) long; attention_mask (B, T) of 1/0 for left-padded batches (right padding would put pad tokens
    between prompt and continuation); generator seeds sampling and must live on the model's device. config.decode
    picks the loop; `decoder` reuses a decode.Decoder (and its captured graphs) across calls, else each call that
    does not run eagerly builds one sized for this prompt.
    """
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
    if config.max_new_tokens == 0:
        return
    # "auto" keeps the eager loop on the CPU: its 16-bit greedy tokens stay exactly what they were (the static cache
    # attends over masked slots too, which can flip a near-tie), and there is no graph to win there.
    cpu = next(model.parameters()).device.type != "cuda"
    if decoder is None and (config.decode == "eager" or (config.decode == "auto" and cpu)):
        yield from _eager_tokens(model, input_ids, config, attention_mask, generator)
        return
    if decoder is None:
        b, t = input_ids.shape
        decoder = Decoder(model, b, t + config.max_new_tokens, config.decode)
    for chunk in decoder.generate_chunks(input_ids, config, attention_mask, generator):
        yield from chunk.unbind(1)


def generate(model: Llama, input_ids: torch.Tensor, config: GenerationConfig | None = None,
             attention_mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
             decoder: Decoder | None = None) -> torch.Tensor:
    """Prompt plus continuation, (B, T + new) long, like transformers' `generate` output."""
    config = config or GenerationConfig()
    tokens = list(generate_tokens(model, input_ids, config, attention_mask, generator, decoder))
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
                generator: torch.Generator | None = None, decoder: Decoder | None = None) -> Iterator[str]:
    """Yield text pieces as they decode, batch 1; stop tokens end the stream and are not part of the text."""
    config = config or GenerationConfig()
    if input_ids.shape[0] != 1:
        raise ValueError(f"stream_text decodes one sequence; got batch size {input_ids.shape[0]}")
    text, stops = IncrementalDecoder(tokenizer), config.stop_set
    for token in generate_tokens(model, input_ids, config, generator=generator, decoder=decoder):
        if int(token[0]) in stops:
            break
        if piece := text.push(token[0]):
            yield piece
    if piece := text.flush():
        yield piece
