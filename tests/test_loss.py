"""loss.linear_cross_entropy against F.cross_entropy over full logits: values and gradients, chunking, ignored
rows, autocast, and sft.token_loss_sum's two paths on a small QLoRA model."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minqlora.data import IGNORE_INDEX, Batch
from minqlora.lora import add_lora, lora_modules
from minqlora.loss import linear_cross_entropy
from minqlora.shapes import random_model
from minqlora.sft import token_loss_sum


def _problem(n=37, h=16, v=50, bias=True, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(h, v, bias=bias).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(v, h, generator=g) * 0.5)
        if bias:
            head.bias.copy_(torch.randn(v, generator=g))
    hidden = torch.randn(n, h, generator=g).to(dtype).requires_grad_(True)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::5] = IGNORE_INDEX  # masked prompt tokens
    return head, hidden, targets


def _reference(head, hidden, targets):
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum", ignore_index=IGNORE_INDEX)


def _grads(loss, head, hidden):
    params = [hidden, *(p for p in head.parameters() if p.requires_grad)]
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("chunk", [1, 7, 37, 1000])
@pytest.mark.parametrize("bias", [False, True])
def test_equals_full_logits_fp32(chunk, bias):
    head, hidden, targets = _problem(bias=bias)
    ref = _reference(head, hidden, targets)
    ours = linear_cross_entropy(hidden, head, targets, chunk=chunk)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-5)
    for a, b in zip(_grads(ours * 0.37, head, hidden), _grads(ref * 0.37, head, hidden)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_frozen_head_gets_no_gradient_and_hidden_shape_is_kept():
    head, hidden, targets = _problem()
    head.requires_grad_(False)
    h3 = hidden.detach().reshape(1, 37, 16).requires_grad_(True)  # (B, T, H) with (B, T) targets
    loss = linear_cross_entropy(h3, head, targets.reshape(1, 37), chunk=8)
    loss.backward()
    ref_h = hidden.detach().clone().requires_grad_(True)
    _reference(head, ref_h, targets).backward()
    torch.testing.assert_close(h3.grad.reshape(37, 16), ref_h.grad, rtol=1e-5, atol=1e-6)
    assert head.weight.grad is None


def test_all_rows_ignored_gives_zero_loss_and_gradient():
    head, hidden, targets = _problem()
    targets[:] = IGNORE_INDEX
    loss = linear_cross_entropy(hidden, head, targets, chunk=4)
    loss.backward()
    assert loss.item() == 0.0 and not hidden.grad.any() and not head.weight.grad.any()


def test_bf16_autocast_matches_plain_path():
    # The plain path under autocast: bf16 logits, then fp32 cross-entropy. Same roundings here, summed in chunks.
    head, hidden, targets = _problem(n=300, h=64, v=1000, seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _reference(head, hidden, targets)
        ours = linear_cross_entropy(hidden, head, targets, chunk=64)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-3)
    for a, b in zip(_grads(ours / 300, head, hidden), _grads(ref / 300, head, hidden)):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=1e-4)


def test_no_grad_computes_the_loss_only():
    head, hidden, targets = _problem()
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, head, targets, chunk=5)
    torch.testing.assert_close(loss, _reference(head, hidden, targets).detach(), rtol=1e-6, atol=1e-5)
    assert not loss.requires_grad


def test_bad_arguments_are_named():
    head, hidden, targets = _problem()
    with pytest.raises(ValueError, match="chunk"):
        linear_cross_entropy(hidden, head, targets, chunk=0)
    with pytest.raises(ValueError, match="rows"):
        linear_cross_entropy(hidden, head, targets[:-1])
    with pytest.raises(ValueError, match="in_features"):
        linear_cross_entropy(hidden[:, :8], head, targets)
    with pytest.raises(ValueError, match="integer"):
        linear_cross_entropy(hidden, head, targets.float())
    with pytest.raises(TypeError, match="nn.Linear"):
        linear_cross_entropy(hidden, nn.Identity(), targets)


def _batch(vocab: int) -> Batch:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (3, 24), generator=g)
    labels = ids.clone()
    labels[:, :6] = IGNORE_INDEX  # prompts
    labels[2, 18:] = IGNORE_INDEX  # padding
    real = torch.ones(3, 24, dtype=torch.long)
    real[2, 18:] = 0
    return Batch(input_ids=ids, labels=labels, attention_mask=real, position_ids=torch.arange(24).expand(3, 24),
                 segment_ids=real, packed=False, num_tokens=int(real.sum()),
                 num_label_tokens=int((labels != IGNORE_INDEX).sum()))


@pytest.mark.parametrize("bf16,scale", [(False, 1 / 50), (True, 1 / 64), (True, 1 / 50)])
def test_token_loss_sum_chunked_equals_reference(bf16, scale):
    """sft's loss through the chunked head equals its plain path: value and every LoRA gradient. In bf16 with a
    power-of-two loss scale the gradients are bit-identical; another scale is applied after the matmuls instead of
    before (loss.py), one bf16 rounding apart."""
    torch.manual_seed(0)
    model = random_model("tiny", quantize="nf4", dtype=torch.float32 if not bf16 else torch.bfloat16)
    add_lora(model, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.1)  # nonzero B so every LoRA weight has a gradient
    batch = _batch(model.config.vocab_size)
    results = []
    for chunk in (0, 7):
        model.zero_grad(set_to_none=True)
        loss = token_loss_sum(model, batch, torch.device("cpu"), bf16, loss_chunk=chunk)
        (loss * scale).backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (ref, ref_grads), (ours, our_grads) = results
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-4)
    assert ref_grads.keys() == our_grads.keys() and len(ref_grads) == 2 * 7 * 2
    for name in ref_grads:
        a, b = our_grads[name], ref_grads[name]
        assert b.abs().sum() > 0, name
        if not bf16:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
        elif scale == 1 / 64:
            assert torch.equal(a, b), name
        else:
            assert (a - b).norm() < 0.02 * b.norm(), name
