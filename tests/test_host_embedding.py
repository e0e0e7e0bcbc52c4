"""host_embedding.py on the CPU: HostEmbedding gathers the same rows as nn.Embedding, bit for bit (bf16 and fp32
tables, int64 and int32 ids); a model with its embedding swapped computes the same logits and LoRA gradients; the
state_dict keeps its keys and tensors and loads back (also with assign=True); .to() / dtype casts keep the table
in host memory; embed_on_device undoes the swap; a tied lm_head, a trainable table and parallel runs are refused.

Covers CPU, where the table stays where it is and nothing is pinned (the same forward without the pinned buffer).
Leaves out pinning, the non_blocking copy and GPU memory (tests/cuda/test_host_layers_cuda.py).
"""

import pytest
import torch
from torch import nn

from minqlora.cli_args import build_parser
from minqlora.host_embedding import HostEmbedding, embed_on_device, embed_on_host
from minqlora.lora import add_lora, lora_modules
from minqlora.shapes import random_model, shape_config
from minqlora.sft import TrainConfig

CPU = torch.device("cpu")


def lora_model(dtype=torch.float32, **overrides):
    model = random_model(shape_config("tiny", **overrides), dtype=dtype)
    add_lora(model, r=4, alpha=8, dropout=0.1)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.1)  # B = 0 would hide B's path
    return model.train()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_rows_equal_nn_embedding(dtype, id_dtype):
    emb = nn.Embedding(300, 24, dtype=dtype).requires_grad_(False)
    host = HostEmbedding.from_embedding(emb)
    ids = torch.randint(0, 300, (3, 17), dtype=id_dtype, generator=torch.Generator().manual_seed(0))
    ids[0, :3] = torch.tensor([0, 299, 0])  # the first and last rows, a repeated row
    out = host(ids)
    assert out.shape == (3, 17, 24) and out.dtype == dtype and out.device == CPU
    assert torch.equal(out, emb(ids))
    assert torch.equal(host(ids[0]), emb(ids[0]))  # (T,) ids: (T, H), as nn.Embedding
    with pytest.raises(IndexError):
        host(torch.tensor([[300]]))


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)  # the same dropout masks
    logits = model(ids)
    loss = nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_swapped_model_computes_the_same(dtype):
    model = lora_model(dtype)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    ref_logits, ref = loss_and_grads(model, ids)
    table = model.model.embed_tokens.weight
    host = embed_on_host(model)
    assert model.model.embed_tokens is host and host.weight is not None and torch.equal(host.weight, table)
    assert embed_on_host(model) is host  # already swapped: unchanged
    # The table is registered last, so a model's first parameter is still a layer's (code that asks it the device).
    assert next(model.parameters()) is not host.weight
    logits, grads = loss_and_grads(model, ids)
    assert torch.equal(logits, ref_logits)
    assert grads.keys() == ref.keys() and len(ref) == 2 * 7 * len(model.model.layers)
    for name, g in ref.items():
        assert g.abs().sum() > 0, name
        assert torch.equal(grads[name], g), name
    assert host.weight.grad is None


def test_state_dict_keeps_its_keys_and_loads_back():
    model = lora_model(torch.bfloat16)
    before = model.state_dict()
    names = [n for n, _ in model.named_parameters()]
    embed_on_host(model)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    other = lora_model(torch.bfloat16)
    embed_on_host(other)
    with torch.no_grad():
        other.model.embed_tokens.weight.zero_()
    other.load_state_dict(after)  # copied into the host table
    assert torch.equal(other.model.embed_tokens.weight, before["model.embed_tokens.weight"])
    fresh = lora_model(torch.bfloat16)
    embed_on_host(fresh)
    fresh.load_state_dict({k: v.clone() for k, v in after.items()}, assign=True)  # the tensors themselves
    host = fresh.model.embed_tokens
    assert isinstance(host, HostEmbedding) and host.weight.device == CPU and not host.weight.requires_grad
    assert torch.equal(host.weight, before["model.embed_tokens.weight"])
    with pytest.raises(RuntimeError, match="size mismatch for model.embed_tokens.weight"):
        other.load_state_dict({**after, "model.embed_tokens.weight": torch.zeros(7, 64, dtype=torch.bfloat16)})
    back = embed_on_device(model)
    assert isinstance(back, nn.Embedding) and model.model.embed_tokens is back
    assert [n for n, _ in model.named_parameters()] == names  # the embedding first again
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)
    assert embed_on_device(model) is back


def test_to_and_casts_keep_the_table_on_the_host():
    model = lora_model(torch.bfloat16)
    host = embed_on_host(model)
    table = host.weight.detach().clone()
    model.to(CPU)
    assert host.weight.device == CPU and host.device == CPU
    model.float()  # casts the table, which stays a frozen host Parameter
    assert host.weight.dtype == torch.float32 and host.weight.device == CPU and not host.weight.requires_grad
    assert torch.equal(host.weight, table.float())
    ids = torch.randint(0, 512, (2, 8))
    assert host(ids).dtype == torch.float32
    model.to(torch.bfloat16)
    assert host.weight.dtype == torch.bfloat16 and torch.equal(host.weight, table)
    assert host.weight in set(model.parameters())  # still the module's parameter after every cast
    with pytest.raises(ValueError, match="meta device"):
        host.to("meta")


def test_refused_settings():
    tied = random_model(shape_config("tiny", tie_word_embeddings=True))
    add_lora(tied, r=4, alpha=8)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    with pytest.raises(ValueError, match="TrainConfig.embed_on_host.* lm_head tied"):
        embed_on_host(tied)
    assert isinstance(tied.model.embed_tokens, nn.Embedding)  # left as it was
    trainable = random_model(shape_config("tiny"))  # no add_lora: nothing is frozen
    with pytest.raises(ValueError, match="TrainConfig.embed_on_host.* frozen embedding"):
        embed_on_host(trainable)
    model = lora_model()
    host = embed_on_host(model)
    model.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen .*TrainConfig.embed_on_host"):
        model(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="needs a .num_embeddings, embedding_dim. table"):
        HostEmbedding(torch.zeros(4), CPU)
    assert host.num_embeddings == 512
    for parallel in ("ddp", "fsdp2"):
        with pytest.raises(ValueError, match="TrainConfig.embed_on_host needs parallel='none'"):
            TrainConfig(embed_on_host=True, parallel=parallel)


def test_embed_on_host_flag():
    parser = build_parser(TrainConfig())
    base = ["finetune", "--model", ".", "--data", __file__, "--out", "o"]
    assert parser.parse_args(base).embed_on_host is False
    assert parser.parse_args([*base, "--embed-on-host"]).embed_on_host is True


def test_generate_after_embed_on_host():
    """A model trained with embed_on_host stays swapped: the static-cache Decoder and the readable loop still decode
    it, token for token as before the swap."""
    from minqlora.generate import GenerationConfig, generate

    model = lora_model(torch.float32).eval()
    ids = torch.randint(0, 512, (2, 5), generator=torch.Generator().manual_seed(2))
    want = {mode: generate(model, ids, GenerationConfig(max_new_tokens=6, decode=mode)) for mode in ("eager", "static")}
    embed_on_host(model)
    for mode, tokens in want.items():
        assert torch.equal(generate(model, ids, GenerationConfig(max_new_tokens=6, decode=mode)), tokens), mode
