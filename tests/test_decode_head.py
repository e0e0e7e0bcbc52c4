"""decode.Decoder(lm_head_4bit=True): logits from a private NF4 + DQ copy of the 16-bit head. Its tokens against the
readable loop (generate.py) on a copy of the model whose head was quantized the same way (fp32: identical), greedy
and sampled, with stops; the model left as it was; the flag off, a head already 4-bit, a head it cannot copy; and
`minqlora generate --lm-head-4bit` reaching the Decoder.

Leaves out CUDA graphs and the decode layout of the copy (tests/cuda/test_generate_cuda.py).
"""

import copy

import pytest
import torch
from torch import nn

from cli_helpers import files, run  # noqa: F401  (files: a fixture)
from minqlora import cli_commands
from minqlora.decode import Decoder
from minqlora.generate import GenerationConfig, generate
from minqlora.linear4bit import Linear4bit
from minqlora.lora import add_lora
from test_generate import left_padded, random_llama
from test_sft_helpers import one_thread  # noqa: F401  (autouse fixture)

LENGTHS = [8, 2, 5]
NEW = 14


def with_quantized_head(model):
    """A deep copy of `model` whose lm_head is Linear4bit.from_linear of the same weight, as the Decoder makes it."""
    other = copy.deepcopy(model)
    other.lm_head = Linear4bit.from_linear(model.lm_head, quant_type="nf4", double_quant=True, blocksize=64,
                                           compute_dtype=torch.float32)
    return other


def eager(model, ids, mask, **cfg):
    return generate(model, ids, GenerationConfig(max_new_tokens=NEW, decode="eager", **cfg), attention_mask=mask)


def fast(model, ids, mask, decoder, **cfg):
    return generate(model, ids, GenerationConfig(max_new_tokens=NEW, **cfg), attention_mask=mask, decoder=decoder)


def test_4bit_head_tokens_equal_the_readable_loop_with_the_head_quantized():
    model = random_llama()
    head, weight = model.lm_head, model.lm_head.weight.detach().clone()
    ids, mask = left_padded(LENGTHS, seed=13)  # a prompt whose first new token already depends on the head
    decoder = Decoder(model, len(LENGTHS), max(LENGTHS) + NEW, mode="static", lm_head_4bit=True)
    assert isinstance(decoder.head, Linear4bit) and decoder.head.weight_nested_absmax is not None
    want = eager(with_quantized_head(model), ids, mask)
    got = fast(model, ids, mask, decoder)
    assert torch.equal(got, want)
    # The 4-bit head changes the tokens, from the prefill's on: it is the one both the prefill and the steps use.
    t = max(LENGTHS)
    assert not torch.equal(want[:, t], eager(model, ids, mask)[:, t])
    # Stops inside a chunk end every row exactly where the readable loop's do.
    stops = {int(want[r, t + 3 + 2 * r]) for r in range(len(LENGTHS))}
    cfg = dict(stop_ids=stops, pad_token_id=63, check_every=5)
    assert torch.equal(fast(model, ids, mask, decoder, **cfg), eager(with_quantized_head(model), ids, mask, **cfg))
    # The model keeps its own 16-bit head, unchanged.
    assert model.lm_head is head and type(model.lm_head) is nn.Linear and torch.equal(model.lm_head.weight, weight)


def test_4bit_head_sampling_equals_the_readable_loop_with_the_same_seed():
    model = random_llama()
    ids, mask = left_padded(LENGTHS)
    decoder = Decoder(model, len(LENGTHS), max(LENGTHS) + NEW, mode="static", lm_head_4bit=True)
    cfg = dict(do_sample=True, temperature=1.3, top_k=30, top_p=0.9)
    got = generate(model, ids, GenerationConfig(max_new_tokens=NEW, **cfg), attention_mask=mask,
                   generator=torch.Generator().manual_seed(7), decoder=decoder)
    want = generate(with_quantized_head(model), ids, GenerationConfig(max_new_tokens=NEW, decode="eager", **cfg),
                    attention_mask=mask, generator=torch.Generator().manual_seed(7))
    assert torch.equal(got, want)


def test_flag_off_or_head_already_4bit_changes_nothing():
    model = random_llama()
    ids, mask = left_padded(LENGTHS)
    decoder = Decoder(model, len(LENGTHS), max(LENGTHS) + NEW, mode="static")
    assert decoder.head is None and torch.equal(fast(model, ids, mask, decoder), eager(model, ids, mask))
    quantized = with_quantized_head(model)
    head = quantized.lm_head
    decoder = Decoder(quantized, len(LENGTHS), max(LENGTHS) + NEW, mode="static", lm_head_4bit=True)
    assert decoder.head is None and quantized.lm_head is head  # the model's own 4-bit head, as it is
    assert torch.equal(fast(quantized, ids, mask, decoder), eager(quantized, ids, mask))


def test_a_head_it_cannot_copy_is_refused():
    model = add_lora(random_llama(), r=2, targets=("lm_head",))  # a plain 4-bit copy would drop the adapter
    with pytest.raises(ValueError, match="lm_head_4bit needs the model's lm_head to be an nn.Linear"):
        Decoder(model, 1, 8, mode="static", lm_head_4bit=True)


def test_cli_flag_reaches_the_decoder(capsys, files, monkeypatch):  # noqa: F811  (files: the fixture)
    made = []  # (keyword arguments, the Decoder) of each Decoder the command builds

    def spy(*args, **kwargs):
        made.append((kwargs, Decoder(*args, **kwargs)))
        return made[-1][1]

    monkeypatch.setattr(cli_commands, "Decoder", spy)
    argv = ["generate", "--model", files["model"], "--prompt", "the cat", "--no-chat", "--max-new-tokens", "6"]
    code, _, _ = run(capsys, *argv, "--decode", "static")
    assert code == 0 and made == []  # without the flag the command builds no Decoder of its own
    code, out, _ = run(capsys, *argv, "--lm-head-4bit")
    assert code == 0 and out.endswith("\n") and [kwargs for kwargs, _ in made] == [{"lm_head_4bit": True}]
    assert made[0][1].head is not None and made[0][1]._runners  # it decoded the reply (a step was made)
    code, _, err = run(capsys, *argv, "--lm-head-4bit", "--decode", "eager")
    assert code == 2 and "--lm-head-4bit runs in the fast decode loop" in err and len(made) == 1
