"""What every decoding loop shares: the generation config, logit filtering, the choice of the next token, and the
logits of a prompt's last position.

The readable loop (generate.py) and the static-cache / CUDA-graph loop (decode.py) both call these, so greedy and
sampled tokens are chosen by one copy of the code. Everything here runs on the device without a host sync, so it can
sit inside a captured CUDA graph.

Leaves out: the loops themselves (generate.py, decode.py) and model loading (checkpoint.py).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from minqlora.model import KVCache, Llama
from minqlora.static_cache import StaticKVCache

DECODE_MODES = ("auto", "eager", "static", "graph", "compile")


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256  # tokens generated after the prompt, per row, at most
    do_sample: bool = False  # False: greedy argmax; True: sample from the temperature/top-k/top-p distribution
    temperature: float = 1.0  # logits are divided by this before filtering (sampling only); must be > 0
    top_k: int = 0  # keep only the k most likely tokens; 0 disables (sampling only)
    top_p: float = 1.0  # keep the smallest most-likely set with probability >= top_p; 1.0 disables (sampling only)
    stop_ids: int | Iterable[int] | None = None  # a row stops after emitting any of these (EOS, end-of-turn)
    pad_token_id: int | None = None  # emitted by rows that already stopped; None means the smallest stop id, or 0
    # How to run the loop (decode.py): "eager" is the readable loop with the growing KVCache (generate.py); "static"
    # uses the preallocated StaticKVCache with no per-token Python state; "graph" adds a torch.cuda.CUDAGraph of the
    # decode step (CUDA only); "compile" runs the step through torch.compile(mode="reduce-overhead") instead;
    # "auto" is "graph" on CUDA and "eager" on the CPU (generate.py; a Decoder built with "auto" on the CPU runs
    # "static"). Greedy tokens are the same in every mode in fp32; in 16-bit the
    # static modes attend over all max_len slots (masked), so rounding differs slightly and near-ties may break
    # the other way (as with transformers' static and dynamic caches).
    decode: str = "auto"
    # Fast modes: tokens decoded between two host checks of "has every row stopped?", the only CPU-GPU sync of the
    # loop. Stops stay exact (tokens past the last stop are dropped); larger values waste at most this many steps.
    check_every: int = 16

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (use do_sample=False for greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {DECODE_MODES}, got {self.decode!r}")
        if self.check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {self.check_every}")

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


@functools.lru_cache(maxsize=None)
def _groups(v: int) -> int:
    """The number of equal groups a row of v values is split into for argmax_rows: the largest divisor of v up
    to 1,024 that leaves groups of at least 128 (1 where none: one pass). 128,256 (Llama-3): 1,002 groups of 128."""
    return max((g for g in range(1, 1025) if v % g == 0 and v // g >= 128), default=1)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(-1) of (B, V) x, the same index (the first maximum; a NaN counts as the maximum), in two passes on a
    GPU: each of G groups' max and its index, then the first group holding the largest. PyTorch reduces a row in
    one CTA: 27.3 µs for one row of 128,256 on an H200, 0.9 % of a decode step; the two passes take 3.7 + 4.4 µs
    (profile_decode.py)."""
    if not x.is_cuda or torch.compiler.is_compiling():  # inductor plans its own reduction
        return x.argmax(-1)
    g = _groups(x.shape[-1])
    return argmax_in_groups(x, g) if g > 1 else x.argmax(-1)


def argmax_in_groups(x: torch.Tensor, g: int) -> torch.Tensor:
    """argmax_rows' two passes over (B, V) x in g groups (g divides V), on any device."""
    b, v = x.shape
    values, index = x.view(b, g, v // g).max(-1)  # (B, G): each group's first maximum
    best = values.argmax(-1, keepdim=True)  # (B, 1): the first group holding the row's maximum
    return (best * (v // g) + index.gather(-1, best)).squeeze(-1)


def next_token(logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None = None,
               noise: torch.Tensor | None = None) -> torch.Tensor:
    """(B, V) logits of the last position -> (B,) token ids.

    Sampling draws token i with probability p_i as argmax_i p_i / q_i with q_i ~ Exp(1) (the exponential race;
    torch.multinomial uses it for one sample too, but first checks the probabilities on the host, a sync that a CUDA
    graph cannot hold). `noise` (B, V) fp32 supplies the q_i, drawn outside a captured graph; without it they come
    from `generator`.
    """
    logits = logits.float()
    if not config.do_sample:
        return argmax_rows(logits)  # ties go to the lowest id, as in transformers
    probs = filter_logits(logits, config).softmax(-1)
    if noise is None:
        noise = torch.empty_like(probs).exponential_(generator=generator)
    # q = 0 (possible in fp32) would turn a removed token's 0 / 0 into NaN, which argmax would pick.
    return (probs / noise.clamp(min=torch.finfo(torch.float32).tiny)).argmax(-1)


def last_logits(model: Llama, ids: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | StaticKVCache) -> torch.Tensor:
    """(B, T) ids through the decoder stack into `cache` -> (B, V) logits of the last position."""
    # Only the last position needs the lm_head: a (B, T, vocab) prefill would cost T times the memory.
    hidden = model.model(ids, attention_mask=mask, cache=cache)  # (B, T, H)
    return model.lm_head(hidden[:, -1])  # (B, V)
