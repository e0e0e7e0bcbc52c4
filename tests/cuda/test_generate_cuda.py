"""The decode step replayed from a CUDA graph (decode.py) against the same step run eagerly and against the readable
loop (generate.py), on tiny random models on the GPU: bf16 and NF4 (bf16 compute), batch 1 and a left-padded batch
of 4, with an unmerged LoRA adapter, greedy and seeded sampling, stops inside a chunk, torch.compile, Decoder reuse,
the Decoder's 4-bit copy of the head (lm_head_4bit) in the decode layout.

A graph replays the very kernels of the eager static step, so their tokens must be identical. The readable loop
attends over fewer keys with other SDPA kernels; in fp32 its tokens must be identical too, in bf16 they must agree up
to the first step whose two best logits are within bf16 rounding of each other (a tie either side may break).
Capturing also proves the step has no host sync: a sync inside torch.cuda.graph raises.
"""

import copy

import pytest
import torch
from torch import nn

from hf_helpers import unit_scale_
from minqlora import layout
from minqlora.decode import Decoder
from minqlora.generate import GenerationConfig, generate
from minqlora.linear4bit import Linear4bit
from minqlora.lora import add_lora
from minqlora.model import Llama
from test_lora import quantize_projections, randomize_adapters
from test_model import tiny_config

DEVICE = torch.device("cuda")
NEW = 24


def model_on_gpu(kind: str, dtype: torch.dtype, lora: bool, seed: int = 0) -> Llama:
    cfg = tiny_config(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=256, num_hidden_layers=3)
    torch.manual_seed(seed)
    model = unit_scale_(Llama(cfg)).to(DEVICE, dtype)
    if kind == "nf4":
        quantize_projections(model, compute_dtype=dtype)
    if lora:
        add_lora(model, r=8, alpha=16, dropout=0.0)
        randomize_adapters(model, std=0.1)
    return model.eval()


def prompts(batch: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch: row i has 11 - 3i real tokens (batch 1: one unpadded row of 11)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(batch, 11, dtype=torch.long)
    mask = torch.zeros(batch, 11, dtype=torch.long)
    for i in range(batch):
        n = 11 - 3 * i
        ids[i, 11 - n:] = torch.randint(1, 256, (n,), generator=g)
        mask[i, 11 - n:] = 1
    return ids.to(DEVICE), mask.to(DEVICE)


def run(model, ids, mask, mode, **cfg):
    return generate(model, ids, GenerationConfig(max_new_tokens=NEW, decode=mode, **cfg), attention_mask=mask)


@torch.no_grad()
def agree_until_near_tie(model, ids, mask, got, want, tol):
    """got == want, except from a step where want's continuation had its two best logits within `tol`."""
    t = ids.shape[1]
    full_mask = torch.cat([mask, torch.ones_like(want[:, t:])], 1)
    logits = model(want, attention_mask=full_mask)[:, t - 1:-1].float()  # (B, NEW, V): what chose each new token
    top2 = logits.topk(2, dim=-1).values
    gap = top2[..., 0] - top2[..., 1]
    for r in range(want.shape[0]):
        diff = (got[r, t:] != want[r, t:]).nonzero()
        if len(diff):
            j = int(diff[0])
            assert gap[r, :j + 1].min() <= tol, f"row {r} differs at new token {j} without a near tie"


@pytest.mark.parametrize("kind", ["bf16", "nf4"])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
def test_graph_tokens_equal_eager(kind, batch, lora):
    model = model_on_gpu(kind, torch.bfloat16, lora)
    ids, mask = prompts(batch)
    graph = run(model, ids, mask, "graph", check_every=5)
    static = run(model, ids, mask, "static")
    assert torch.equal(graph, static)
    eager = run(model, ids, mask, "eager")
    # Logits of magnitude ~5-10 carry bf16 rounding of ~0.03-0.06 per op (ulp 0.03125-0.0625); 0.25 leaves room for
    # the few ops where the two loops round differently, and still fails a wrong cache or mask at once.
    agree_until_near_tie(model, ids, mask, graph, eager, tol=0.25)
    # Stops: one row's token mid-way, and a set every row reaches inside a chunk.
    stops = {int(graph[r, 11 + 4 + 2 * r]) for r in range(batch)}
    cfg = dict(stop_ids=stops, pad_token_id=0, check_every=7)
    assert torch.equal(run(model, ids, mask, "graph", **cfg), run(model, ids, mask, "static", **cfg))


@pytest.mark.parametrize("kind", ["bf16", "nf4"])
def test_graph_tokens_equal_readable_loop_fp32(kind):
    model = model_on_gpu(kind, torch.float32, lora=True)
    ids, mask = prompts(4)
    assert torch.equal(run(model, ids, mask, "graph"), run(model, ids, mask, "eager"))


def run_4bit_head(model, ids, mask, mode, **cfg):
    """Tokens of a Decoder with lm_head_4bit, and the Decoder."""
    decoder = Decoder(model, ids.shape[0], ids.shape[1] + NEW, mode, lm_head_4bit=True)
    config = GenerationConfig(max_new_tokens=NEW, **cfg)
    return generate(model, ids, config, attention_mask=mask, decoder=decoder), decoder


@pytest.mark.parametrize("batch", [1, 4])
def test_graph_tokens_with_the_4bit_head_equal_static(batch):
    # The head's copy (256 x 128: it tiles) replayed from the graph runs the eager static step's kernels.
    model = model_on_gpu("nf4", torch.bfloat16, lora=False)
    ids, mask = prompts(batch)
    graph, decoder = run_4bit_head(model, ids, mask, "graph", check_every=5)
    assert layout.is_tiles(decoder.head.weight) and type(model.lm_head) is nn.Linear  # the model keeps its head
    assert torch.equal(graph, run_4bit_head(model, ids, mask, "static")[0])
    stops = {int(graph[r, 11 + 4 + 2 * r]) for r in range(batch)}
    cfg = dict(stop_ids=stops, pad_token_id=0, check_every=7)
    assert torch.equal(run_4bit_head(model, ids, mask, "graph", **cfg)[0],
                       run_4bit_head(model, ids, mask, "static", **cfg)[0])


def test_graph_tokens_with_the_4bit_head_equal_readable_loop_fp32():
    # The readable loop on a copy whose head is quantized the same way, in rows (tiles give the same outputs bit for
    # bit, test_gemv_cuda.py): identical tokens in fp32.
    model = model_on_gpu("nf4", torch.float32, lora=False)
    ids, mask = prompts(4)
    reference = copy.deepcopy(model)  # before the Decoder regroups and tiles the model
    reference.lm_head = Linear4bit.from_linear(model.lm_head, quant_type="nf4", double_quant=True, blocksize=64,
                                               compute_dtype=torch.float32)
    graph, _ = run_4bit_head(model, ids, mask, "graph")
    assert torch.equal(graph, run(reference, ids, mask, "eager"))


def test_graph_sampling_equals_static_with_the_same_seed():
    model = model_on_gpu("nf4", torch.bfloat16, lora=True)
    ids, mask = prompts(4)
    cfg = GenerationConfig(max_new_tokens=NEW, do_sample=True, temperature=0.9, top_k=40, top_p=0.95)
    out = {}
    for mode in ("graph", "static"):
        cfg.decode = mode
        out[mode] = generate(model, ids, cfg, attention_mask=mask,
                             generator=torch.Generator(DEVICE).manual_seed(5))
    assert torch.equal(out["graph"], out["static"])
    greedy = run(model, ids, mask, "static")
    assert not torch.equal(out["graph"], greedy)


def test_decoder_reuse_keeps_its_graph():
    model = model_on_gpu("nf4", torch.bfloat16, lora=False)
    decoder = Decoder(model, batch_size=4, max_len=11 + NEW + 8, mode="graph")
    for seed in (1, 2, 3):
        ids, mask = prompts(4, seed)
        want = run(model, ids, mask, "static")
        got = generate(model, ids, GenerationConfig(max_new_tokens=NEW), attention_mask=mask, decoder=decoder)
        assert torch.equal(got, want)
    assert len(decoder._runners) == 1  # one capture served all three calls


def test_compile_tokens_agree_with_static():
    # Inductor fuses RMSNorm, RoPE and SwiGLU and keeps their intermediates in fp32, so its bf16 logits round
    # differently from the eager kernels': the same near-tie rule as the readable loop (measured on the H200: the
    # first difference at new token 5 of 24, at a near tie). In fp32 the tokens must be identical.
    model = model_on_gpu("nf4", torch.bfloat16, lora=True)
    ids, mask = prompts(4)
    static = run(model, ids, mask, "static")
    agree_until_near_tie(model, ids, mask, run(model, ids, mask, "compile", check_every=6), static, tol=0.25)
    model = model_on_gpu("nf4", torch.float32, lora=True)
    assert torch.equal(run(model, ids, mask, "compile", check_every=6), run(model, ids, mask, "static"))


def test_argmax_rows_equals_argmax_on_the_gpu():
    # The two-pass greedy pick (sampling.argmax_rows) on Llama-3's vocabulary, ties and NaN included.
    from minqlora.sampling import argmax_rows
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randint(-50, 50, (8, 128256), generator=g, device="cuda").float()  # every row ties many times
    x[1, [127000, 3]] = 99.0
    x[2, [500, 501]] = 99.0
    x[3, 90000] = float("nan")
    x[4, [7, 100000]] = float("nan")
    x[5] = float("-inf")
    assert torch.equal(argmax_rows(x), x.argmax(-1))
