"""Fast decoding: a static KV cache, the decode step captured in a CUDA graph, sampling on the device.

At batch 1 a decode step of an 8B model is a few hundred small kernels; launched one by one from Python they cost
more than they compute (about 25 µs of dispatch per 4-bit matmul in bitsandbytes, reference/fast-paths.md §1).
`Decoder` runs the step the same way every time (static_cache.py keeps all per-token state on the device), so it
can be recorded once and replayed:

    mode "graph"    torch.cuda.CUDAGraph: one replay per token, no Python in between
    mode "compile"  torch.compile(mode="reduce-overhead"): inductor kernels inside cudagraph trees
    mode "static"   the same step run eagerly (CPU, or for comparison)

The only host sync is the stop check every `config.check_every` tokens: one copy of the new tokens to the host.
Tokens past the point where every row has stopped are dropped, so the output equals the readable loop's
(generate.py), token for token under greedy decoding in fp32. In bf16 the two differ by rounding (attention runs
over all max_len slots here, over the filled prefix there), so a near-tie between two tokens may break differently;
a graph replay and the eager "static" step run the same kernels and agree exactly.

A Decoder also gives the model's sibling 4-bit projections (q/k/v, gate/up) a proj_group.ProjectionGroup, so each
set runs as one kernel launch at decode: the same outputs bit for bit, five launches a layer fewer.

With `lm_head_4bit=True` a Decoder quantizes a private copy of a 16-bit lm_head once (NF4, double quantization,
blocksize 64, in the decode layout on a GPU) and computes logits with it: at the Llama-3-8B shape the head is 1.05 GB
of bf16 read per token, about 8 % of a replayed step on the H200 (246 of 2,960 µs), and 0.27 GB in 4 bits through
the fused GEMV. The model is not modified (its head stays 16-bit, for training and saving); the copy costs those
0.27 GB beside it. Greedy tokens then equal those of the model with its head quantized the same way
(Linear4bit.from_linear), not those of the 16-bit head. A head that is already 4-bit is used as it is.

A Decoder owns buffers for one batch size and context length and keeps its captured graphs (one per sampling
setup) across calls. A graph holds the model's tensors and control flow as they were at capture: in-place weight
updates are seen, module swaps (add_lora, merge_lora, unmerge) are not — build a new Decoder after them. In
"compile" mode each Decoder compiles its own step (dynamo guards on the instance; past its recompile limit, 8 by
default, further Decoders would run uncompiled), so reuse one rather than making many.

Leaves out: the readable loop and streaming (generate.py), sampling itself (sampling.py), prefill in a graph
(prompt lengths vary; it runs eagerly once per call), speculative decoding.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from minqlora import layout
from minqlora.linear4bit import Linear4bit
from minqlora.model import Llama
from minqlora.proj_group import group_projections
from minqlora.sampling import GenerationConfig, last_logits, next_token
from minqlora.static_cache import StaticKVCache

WARMUP_STEPS = 3  # eager steps on a side stream before capture: cuBLAS handles, workspaces, lazy inits (torch docs)
# The 4-bit head's format: the model's projections' default (QLoRA's NF4 + DQ), 4.127 bits per weight.
HEAD_QUANT = dict(quant_type="nf4", double_quant=True, blocksize=64)


def resolve_mode(mode: str, device: torch.device) -> str:
    """'auto' -> 'graph' on CUDA, 'static' elsewhere; graph and compile need CUDA ('compile' on CPU is inductor
    without cudagraphs, which is allowed and tested)."""
    if mode == "auto":
        return "graph" if device.type == "cuda" else "static"
    if mode == "graph" and device.type != "cuda":
        raise ValueError(f"decode mode 'graph' needs a CUDA model; this one is on {device} (use 'static')")
    if mode not in ("static", "graph", "compile"):
        raise ValueError(f"Decoder mode must be 'auto', 'static', 'graph' or 'compile', got {mode!r}")
    return mode


def quantized_head(head: nn.Module) -> Linear4bit | None:
    """A 4-bit copy of a 16-bit lm_head (HEAD_QUANT, computing in the head's dtype, in the decode layout on a GPU);
    None for a head that is already 4-bit. The head itself is left as it is."""
    if isinstance(head, Linear4bit):
        return None
    if not isinstance(head, nn.Linear):  # a LoRA-wrapped head would lose its adapter in a plain copy
        raise ValueError(f"lm_head_4bit needs the model's lm_head to be an nn.Linear or a Linear4bit, got "
                         f"{type(head).__name__}")
    head4 = Linear4bit.from_linear(head, compute_dtype=head.weight.dtype, **HEAD_QUANT)
    head4.use_tiles()  # a no-op off the GPU, as for the model's weights (layout.use_tiles)
    return head4


class Decoder:
    """Static buffers and captured decode steps for `model` at one batch size and up to `max_len` positions.

    max_len bounds prompt length + max_new_tokens of every call; batch_size is fixed (pad a short batch).
    lm_head_4bit: compute logits with a private NF4 + DQ copy of a 16-bit lm_head (module docstring).
    """

    @torch.inference_mode()
    def __init__(self, model: Llama, batch_size: int, max_len: int, mode: str = "auto", lm_head_4bit: bool = False):
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"batch_size and max_len must be >= 1, got {batch_size} and {max_len}")
        self.model, self.batch_size, self.max_len = model, batch_size, max_len
        group_projections(model)  # q/k/v and gate/up in one launch each (bit-identical; proj_group.py)
        layout.use_tiles(model)  # GPU weights in the decode layout: the same results, faster GEMVs (layout.py)
        self.head = quantized_head(model.lm_head) if lm_head_4bit else None  # None: the model's own head
        emb = model.model.embed_tokens  # a HostEmbedding (host_embedding.py) keeps its table on the host
        self.device = getattr(emb, "device", emb.weight.device)
        self.mode = resolve_mode(mode, self.device)
        self.cache = StaticKVCache.for_model(model, batch_size, max_len)
        b, dev = batch_size, self.device
        self.token = torch.zeros(b, dtype=torch.long, device=dev)  # the token fed to the next step
        self.finished = torch.zeros(b, dtype=torch.bool, device=dev)  # rows that emitted a stop id
        self.out = torch.zeros(b, max_len, dtype=torch.long, device=dev)  # new tokens, column = step
        self.step_idx = torch.zeros(1, dtype=torch.long, device=dev)  # the next column of `out`
        self.noise = None  # (B, V) fp32 Exp(1) draws for sampling, refilled eagerly before each step
        self.stops = torch.zeros(0, dtype=torch.long, device=dev)  # stop ids of the setup being decoded
        self._stop_list: list[int] = []  # the same, on the host
        self._runners: dict[tuple, object] = {}  # sampling setup -> graph replay / compiled step / eager step

    # -- the step ---------------------------------------------------------------------------------------------

    def _state(self):
        return (self.token, self.finished, self.out, self.step_idx)

    def _reset(self) -> None:
        self.cache.reset()
        for t in self._state():
            t.zero_()

    def _emit(self, logits: torch.Tensor, config: GenerationConfig) -> None:
        # (B, V) logits -> the next token of every row, recorded in place; rows already stopped emit pad_id.
        noise = self.noise if config.do_sample else None
        token = next_token(logits, config, noise=noise).masked_fill(self.finished, config.pad_id)
        self.finished |= (token[:, None] == self.stops).any(-1)
        self.token.copy_(token)
        self.out.index_copy_(1, self.step_idx, token[:, None])
        self.step_idx += 1

    def _logits(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """(B, T) ids through the decoder stack into the cache -> (B, V) logits of the last position."""
        if self.head is None:
            return last_logits(self.model, ids, mask, self.cache)
        return self.head(self.model.model(ids, attention_mask=mask, cache=self.cache)[:, -1])  # as last_logits

    def _step(self, config: GenerationConfig) -> None:
        """One decode step on device state only: feed `token`, emit the next one. This is what gets captured."""
        self._emit(self._logits(self.token[:, None], None), config)

    def _runner(self, config: GenerationConfig):
        """A callable running one step for this sampling setup: captured (and cached) on first use."""
        key = (config.do_sample, config.temperature, config.top_k, config.top_p, tuple(sorted(config.stop_set)),
               config.pad_id)
        if key in self._runners:
            return self._runners[key]
        if self.mode == "static":
            runner = lambda: self._step(config)  # noqa: E731
        elif self.mode == "compile":
            for t in (*self._state(), *self.cache.keys, *self.cache.values, self.cache.next_slot,
                      self.cache.written, self.cache.next_position, self.stops, self.noise):
                if t is not None:  # in-place updates of these are allowed inside the captured graphs
                    torch._dynamo.mark_static_address(t)
            compiled = torch.compile(self._step, mode="reduce-overhead", fullgraph=True)
            runner = lambda: compiled(config)  # noqa: E731
        else:
            runner = self._capture(config)
        self._runners[key] = runner
        return runner

    def _capture(self, config: GenerationConfig):
        # Warm up on a side stream, then record one step. They run on scratch state (each from an empty cache, so
        # even max_len 1 has room), which generate_chunks resets before real use.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self._reset()
                self._step(config)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self._reset()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step(config)
        return graph.replay

    # -- the loop ---------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate_chunks(self, input_ids: torch.Tensor, config: GenerationConfig,
                        attention_mask: torch.Tensor | None = None,
                        generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
        """Yield the new tokens, (B, n) long on the device, n <= config.check_every per chunk, until every row
        stopped or max_new_tokens; the same tokens, in order, as generate.generate_tokens' columns.

        input_ids (B, T) with B = batch_size; attention_mask (B, T) of 1/0 for left padding; generator seeds
        sampling and must live on the model's device.
        """
        b, t = input_ids.shape
        total = config.max_new_tokens
        if b != self.batch_size:
            raise ValueError(f"input_ids has batch size {b}; this Decoder was built for {self.batch_size}")
        if t + total > self.max_len:
            raise ValueError(f"prompt length {t} + max_new_tokens {total} > the Decoder's max_len {self.max_len}")
        if attention_mask is not None and tuple(attention_mask.shape) != (b, t):
            raise ValueError(f"attention_mask must have the shape of input_ids {(b, t)}, got "
                             f"{tuple(attention_mask.shape)}")
        if total == 0:
            return
        stops = sorted(config.stop_set)
        if self._stop_list != stops:
            self.stops, self._stop_list = torch.tensor(stops, dtype=torch.long, device=self.device), stops
            self._runners.clear()  # graphs read the stop ids from the old tensor
        if config.do_sample and self.noise is None:
            vocab = self.model.lm_head.out_features
            self.noise = torch.ones(b, vocab, device=self.device)
            self._runners.clear()
        step = self._runner(config)  # may capture, which runs on scratch state: before the prefill
        host_stops = torch.tensor(stops, dtype=torch.long)
        self._reset()
        if config.do_sample:
            self.noise.exponential_(generator=generator)
        self._emit(self._logits(input_ids, attention_mask), config)  # prefill, eager
        done, emitted = 1, 0
        finished = torch.zeros(b, dtype=torch.bool)  # host copy, as of the last chunk
        while True:
            end = min(total, emitted + config.check_every)
            while done < end:
                if config.do_sample:
                    self.noise.exponential_(generator=generator)
                step()
                done += 1
            chunk = self.out[:, emitted:end].clone()
            host = chunk.cpu()  # SYNC: the one host read of the loop, every check_every tokens
            # A row has finished at column j if it emitted a stop at or before j; the loop ends at the first column
            # where every row has (the readable loop's check, replayed on the host).
            fin = finished[:, None] | (torch.isin(host, host_stops).long().cumsum(1) > 0)  # (B, n)
            all_done = fin.all(0).nonzero()
            if len(all_done):
                yield chunk[:, :int(all_done[0]) + 1]
                return
            yield chunk
            finished, emitted = fin[:, -1], end
            if emitted == total:
                return
