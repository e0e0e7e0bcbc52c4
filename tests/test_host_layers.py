"""host_layers.py on the CPU: layers whose saved tensors are parked in host memory compute the same loss and LoRA
gradients, bit for bit, as keeping them (dropout on, every checkpointing mode, keep_last and offload combinations,
the recipe, plain-input and reference LoRA paths, fused Functions, strided sets); a strided set parks exactly
layers 0, s, 2s, ... and each is released by its due layer's rule; they park exactly the storages the layers save
less the weights and the shared cos/sin (counted against tests/saved_tensors.py) and, with the default threshold,
only the large ones; every parked byte comes back through the prefetch hooks; the backward reads the host copies;
views share one copy; second unpacks and retain_graph work; bad settings are refused.

Covers CPU, where the copies are synchronous (the same code path, no streams). Leaves out the side stream, events
and peak memory (tests/cuda/test_host_layers_cuda.py) and speed (benchmarks/bench_step.py).
"""

import pytest
import torch
from torch import nn

from minqlora import host_layers
from minqlora.cli_args import build_parser
from minqlora.host_layers import COPY_LAYERS, HostParking, host_layer_range, release_layers
from minqlora.lora import add_lora, lora_modules
from minqlora.lora_fused import set_lora_path
from minqlora.shapes import random_model, shape_config
from minqlora.sft import TrainConfig
from saved_tensors import module_tensors, saved_bytes

CPU = torch.device("cpu")


@pytest.fixture
def park_everything(monkeypatch):
    """The tiny shape's tensors are all under 1 MiB: park every storage, whatever its size."""
    monkeypatch.setattr(host_layers, "MIN_PARK_BYTES", 0)


def lora_model(dtype=torch.float32, layers=4, hidden=64, intermediate=160, dropout=0.1):
    config = shape_config("tiny", num_hidden_layers=layers, hidden_size=hidden, intermediate_size=intermediate)
    model = random_model(config, dtype=dtype)
    add_lora(model, r=4, alpha=8, dropout=dropout)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.1)  # B = 0 would hide B's path
    return model.train()


def loss_and_grads(model, ids, host, mode="none", keep_last=0, offload=False, **kw):
    model.gradient_checkpointing, model.model.keep_last_layers = mode, keep_last
    model.model.offload_checkpoints, model.model.host_layers, model.model.host_stats = offload, host, None
    for name, value in kw.items():
        setattr(model.model, name, value)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the same dropout masks for every configuration
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=model.lm_head.weight.dtype == torch.bfloat16):
        logits = model(ids)
    loss = nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def check_same(model, host, **kw):
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    ref_loss, ref = loss_and_grads(model, ids, 0, **kw)
    assert model.model.host_stats is None
    loss, grads = loss_and_grads(model, ids, host, **kw)
    stats = model.model.host_stats
    assert stats.layers == host and stats.bytes > 0 and stats.tensors > 0 and stats.weights > 0
    assert stats.prefetched == stats.bytes and stats.on_demand == 0  # every parked byte came back ahead of need
    assert torch.equal(loss, ref_loss)
    assert len(ref) == 2 * 7 * len(model.model.layers)
    for name, g in ref.items():
        assert g.abs().sum() > 0, name
        assert torch.equal(grads[name], g), name
    return stats


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode,keep_last,offload,host", [
    ("none", 0, False, 2), ("none", 0, False, 4), ("full", 0, False, 2), ("full", 1, False, 2),
    ("full", 2, False, 2), ("selective", 1, False, 1), ("full", 1, True, 2), ("selective", 0, True, 3)])
def test_parked_layers_compute_the_same(park_everything, dtype, mode, keep_last, offload, host):
    check_same(lora_model(dtype), host, mode=mode, keep_last=keep_last, offload=offload)


@pytest.mark.parametrize("path,recompute_inputs", [("fused", False), ("shared-dropout", True), ("reference", True)])
def test_every_lora_path_computes_the_same(park_everything, path, recompute_inputs):
    # "fused" with recipes (recompute.py: the branch saves the norm's and SwiGLU's inputs) is the default above.
    model = lora_model()
    set_lora_path(model, path, recompute_inputs=recompute_inputs)
    check_same(model, 2, mode="full", keep_last=1)


def test_fused_functions_compute_the_same(park_everything, cpu_fusion):
    check_same(lora_model(torch.bfloat16), 3)


@pytest.mark.parametrize("prefetch", [0, 1, 3, 9])
def test_every_prefetch_distance_brings_everything_back(park_everything, prefetch):
    # 9 > the 4 layers: everything comes back when the last layer's backward starts.
    check_same(lora_model(), 3, host_prefetch=prefetch)


@pytest.mark.parametrize("mode,keep_last,offload,layers,host,stride", [
    ("none", 0, False, 7, 3, 3), ("full", 0, False, 6, 2, 4), ("full", 1, True, 6, 3, 2), ("full", 0, True, 8, 2, 5),
    ("selective", 1, False, 5, 2, 3)])
def test_strided_layers_park_exactly_those_and_compute_the_same(park_everything, monkeypatch, mode, keep_last, offload,
                                                              layers, host, stride):
    run, parked = HostParking.run, []

    def recording_run(self, i, *args):
        parked.append(i)
        return run(self, i, *args)

    monkeypatch.setattr(HostParking, "run", recording_run)
    model = lora_model(layers=layers)
    stats = check_same(model, host, mode=mode, keep_last=keep_last, offload=offload, host_stride=stride,
                       host_prefetch=stride - 1)
    assert parked == list(range(0, host * stride, stride)) and stats.layers == host  # the layers between: not parked
    assert model.model.host_layer_range() == range(0, host * stride, stride)


def test_release_rule_follows_the_queue_of_copies():
    # Consecutive layers: the n-th is due before layer COPY_LAYERS * (n + 1), the rule before host_stride.
    assert release_layers(range(10)) == {n: COPY_LAYERS * (n + 1) for n in range(10)}
    assert release_layers(range(0, 32, 4)) == {layer: layer + 3 for layer in range(0, 32, 4)}  # the link keeps up
    assert release_layers(range(0, 30, 3)) == {layer: layer + 3 for layer in range(0, 30, 3)}
    assert release_layers(range(0, 8, 2)) == {0: 3, 2: 6, 4: 9, 6: 12}  # stride 2 < 3: the copies still queue
    assert release_layers(range(0)) == {}
    assert HostParking(CPU, range(0, 12, 4), last_layer=11).due == {0: 3, 4: 7, 8: 11}


def layer_inputs(model, ids):
    x = model.model.embed_tokens(ids)
    pos = torch.arange(ids.shape[1]).expand(ids.shape)
    return x, *model.model.rotary_emb(pos, x.dtype)


def test_parks_what_the_layers_save_less_weights_and_shared_tensors(park_everything):
    # What the host layers parked equals what they save for backward counted by storage (saved_tensors.py),
    # leaving out parameters and buffers (4-bit bytes, LoRA A/B, norm weights) and cos/sin: none of those copied.
    model = lora_model(dropout=0.05)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(3))
    loss_and_grads(model, ids, 2)
    parked = model.model.host_stats
    x, cos, sin = layer_inputs(model, ids)
    expected = 0
    for layer in model.model.layers[:2]:
        x, saved = saved_bytes(layer, x, cos, sin, None, exclude=[*module_tensors(model), cos, sin])
        expected += saved.bytes
    assert parked.bytes == expected and parked.small == 0
    # Every projection's 4-bit bytes, absmax and nested state, the LoRA A's (fp32: themselves) and norm weights.
    assert parked.weights >= 2 * 7 * 4


def test_small_storages_stay_where_they_are():
    # Hidden 256 at 2 x 1024 tokens: (B, T, H) fp32 is 2 MiB, parked; attention's log-sum-exp and the like are not.
    model = lora_model(layers=2, hidden=256, intermediate=512, dropout=0.05)
    ids = torch.randint(0, 512, (2, 1024), generator=torch.Generator().manual_seed(3))
    loss_and_grads(model, ids, 1)
    parked = model.model.host_stats
    x, cos, sin = layer_inputs(model, ids)
    _, saved = saved_bytes(model.model.layers[0], x, cos, sin, None, exclude=[*module_tensors(model), cos, sin])
    large = sum(n for n, _, _ in saved.storages.values() if n >= host_layers.MIN_PARK_BYTES)
    assert 0 < parked.bytes == large < saved.bytes
    assert parked.small > 0


def test_nothing_is_parked_without_a_training_graph(park_everything):
    model = lora_model()
    model.model.host_layers = 2
    ids = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        model(ids)
    model.eval()
    model(ids)
    assert model.model.host_stats is None


class _Saves(torch.autograd.Function):
    """y = x * w, saving two views of x's storage and the parameter w; backward reads the saved tensors `reads`
    times (autograd unpacks them on every access)."""

    @staticmethod
    def forward(ctx, x, w, reads):
        ctx.save_for_backward(x, x.t(), w)
        ctx.reads = reads
        return x * w

    @staticmethod
    def backward(ctx, grad):
        for _ in range(ctx.reads):
            x, xt, w = ctx.saved_tensors
        assert torch.equal(xt, x.t())
        return grad * w, (grad * x).sum(0), None


class _Layer(nn.Module):
    def __init__(self, reads=1):
        super().__init__()
        self.w, self.reads = nn.Parameter(torch.linspace(0.5, 1.5, 16)), reads

    def forward(self, x, cos, sin, mask):
        return _Saves.apply(x * 2, self.w, self.reads)


def park_one(layer, x):
    """layer's forward under a HostParking of one layer: (parking, output)."""
    parking = HostParking(CPU, range(1), last_layer=0)
    y = parking.run(0, layer, x, None, None, None)
    parking.after_layer(0, y)
    parking.finish_forward()
    return parking, y


def test_views_share_one_copy_and_weights_stay(park_everything):
    layer, x = _Layer(), torch.randn(8, 16, requires_grad=True)
    parking, y = park_one(layer, x)
    s = parking.stats
    assert (s.tensors, s.bytes, s.weights) == (2, 8 * 16 * 4, 1)  # x and x.t(): one storage; w left in place
    (record,) = [ref() for ref in parking.parked[0]]
    assert record.handles == 2 and record.source is None  # released: the backward must read the host copy
    y.sum().backward()
    assert s.prefetched == s.bytes and s.on_demand == 0
    torch.testing.assert_close(x.grad, 2 * layer.w.detach().expand(8, 16), rtol=0, atol=0)


def test_backward_reads_the_host_copies(park_everything):
    layer, x = _Layer(), torch.randn(8, 16, requires_grad=True)
    parking, y = park_one(layer, x)
    for ref in parking.parked[0]:
        ref().host.zero_()  # what comes back is what was parked: w's gradient sums grad * 0
    y.sum().backward()
    assert torch.equal(layer.w.grad, torch.zeros(16))


def test_unpacking_twice_and_retain_graph(park_everything):
    x = torch.randn(8, 16, requires_grad=True)
    ref = _Layer()
    (x * 2 * ref.w).sum().backward()
    layer = _Layer(reads=2)  # the second read finds the storage let go of and fetches it again
    parking, y = park_one(layer, x.detach().requires_grad_())
    y.sum().backward(retain_graph=True)
    y.sum().backward()  # retain_graph: every handle unpacked again, from the host copy
    assert torch.equal(layer.w.grad, 2 * ref.w.grad)
    # First backward: the prefetch serves the first reads of x and x.t() (its two handles), after which the record
    # lets go of it; their second reads fetch once each (2). Second backward: the prefetch serves x's first read;
    # x.t()'s and both second reads fetch (3).
    s = parking.stats
    assert (s.prefetched, s.on_demand) == (2 * s.bytes, 5 * s.bytes)


def test_bad_settings_are_refused():
    assert host_layer_range(4, 2, 2) == range(2) and host_layer_range(4, 0, 9) == range(0)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="host_layers must be an int"):
            host_layer_range(4, bad)
    with pytest.raises(ValueError, match="host_layers=3 with keep_last_layers=2 .* 4 layers"):
        host_layer_range(4, 3, 2)
    assert host_layer_range(8, 3, 1, 3) == range(0, 9, 3) and host_layer_range(4, 2, 0, 3) == range(0, 6, 3)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="host_stride must be an int >= 1"):
            host_layer_range(8, 2, 0, bad)
    with pytest.raises(ValueError, match=r"host_layers=3 with keep_last_layers=2 and host_stride=3 .* 8 layers: "
                                         r"layers 0, 3, \.\.\. 6 are parked"):
        host_layer_range(8, 3, 2, 3)  # layer 6 is one of the last two
    with pytest.raises(ValueError, match="host_layers=2 with keep_last_layers=0 and host_stride=4 .* 4 layers"):
        host_layer_range(4, 2, 0, 4)  # layer 4 is not a layer of the model
    model = lora_model()
    ids = torch.randint(0, 512, (1, 8))
    for mode, keep, host in (("none", 0, 5), ("full", 3, 2), ("selective", 4, 1), ("none", 0, -1)):
        model.gradient_checkpointing, model.model.keep_last_layers, model.model.host_layers = mode, keep, host
        with pytest.raises(ValueError, match="host_layers"):
            model(ids)
    model.gradient_checkpointing, model.model.keep_last_layers, model.model.host_layers = "none", 3, 4
    assert model.model.host_layer_range() == range(4)  # keep_last means nothing without checkpointing
    model.model.host_stride = 0
    with pytest.raises(ValueError, match="host_stride"):
        model(ids)
    model.model.host_stride, model.model.host_prefetch = 1, -1
    with pytest.raises(ValueError, match="host_prefetch"):
        model(ids)
    for bad in (dict(host_layers=-1), dict(host_layers=2, parallel="fsdp2")):
        with pytest.raises(ValueError, match="TrainConfig.host_layers"):
            TrainConfig(**bad)


def test_host_layers_flag():
    parser = build_parser(TrainConfig())
    base = ["finetune", "--model", ".", "--data", __file__, "--out", "o"]
    assert parser.parse_args(base).host_layers == 0
    assert parser.parse_args([*base, "--host-layers", "3", "--keep-last-layers", "2"]).host_layers == 3
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--host-layers", "-1"])
    assert parser.parse_args(base).host_stride == 1
    assert parser.parse_args([*base, "--host-layers", "3", "--host-stride", "4"]).host_stride == 4
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--host-stride", "0"])
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="TrainConfig.host_stride must be an int >= 1"):
            TrainConfig(host_stride=bad)
