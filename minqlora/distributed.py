"""torch.distributed glue for `torchrun ... -m minqlora finetune --parallel {ddp,fsdp2}`: one process per rank.

Parallel (made by setup()) is what sft.train asks of the ranks; with --parallel none it is one process and every
method is the identity. The pieces, each PyTorch's own engine:
- DDP (torch.nn.parallel.DistributedDataParallel) around model.model: every rank holds the whole 4-bit base; only
  the LoRA parameters (the only ones with requires_grad) are in DDP's buckets, all-reduced during backward.
- FSDP2 (torch.distributed.fsdp.fully_shard) on every decoder layer and on model.model as the root: each layer's
  4-bit weights (fsdp4bit.Packed4bit, uint8 codes + absmax kept as integer storage), norms and LoRA A/B are
  sharded by rows and gathered for that layer's forward and backward. The embedding and the final norm stay whole
  on every rank (the embedding is often lm_head's weight too). The optimizer steps each rank's LoRA shards.
- Data: the loader draws a global batch of batch_size x world_size rows and each rank keeps its share
  (data.shard_batch), so N ranks see exactly the rows one process sees at N x batch_size. Every rank counts the
  trained tokens of the whole global batch, so the loss is normalised as in one process, and gradients are summed
  across ranks (DDP's sum hook, FSDP2's divide factor 1): the gradient is the one-process gradient.
- Writes: rank 0 alone writes metrics, checkpoints and the adapter; ranks gather to it what differs per rank (RNG
  states, FSDP2 optimizer shards; the sharded adapter is gathered whole before saving). A checkpoint records the
  world size; resuming with another is refused (no re-sharding).
- Failures: gloo on CPUs, NCCL on GPUs, each with a timeout (--dist-timeout, default 180 s) so a rank stuck in a
  collective fails the run; torchrun stops the others when any rank dies.

Evaluation shards its batches the same way (sft.evaluate) and sums the losses over ranks.

Leaves out: multi-node launch details (torchrun's), tensor/pipeline/sequence parallelism, hybrid sharding, CPU
offload, and re-sharding a checkpoint for another number of ranks.

Loading for FSDP2 (sft.run): each rank reads and quantizes only its own rows of every projection (row_shard,
fsdp4bit.quantize_rows), so no rank ever holds another's share of the 4-bit base; the 16-bit rest (embedding,
norms, head) loads whole on every rank. A model loaded whole (a pre-quantized checkpoint, or one built in memory)
is sharded by wrap() instead: every rank then holds the whole 4-bit model until fully_shard keeps its share.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from . import fsdp4bit
from .lora import lora_modules

MODES = ("none", "ddp", "fsdp2")
BACKENDS = ("auto", "gloo", "nccl")
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def rank_device(name: str, mode: str = "none") -> torch.device:
    """The device this process trains on: "auto" -> cuda when present, else cpu; under torchrun a bare "cuda"
    (or "auto" on a GPU machine) means this rank's own GPU, cuda:LOCAL_RANK."""
    device = torch.device("cuda" if name == "auto" and torch.cuda.is_available() else "cpu" if name == "auto"
                          else name)
    if mode != "none" and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


class Parallel:
    """This process's place among the ranks and the few operations sft.train needs from them."""

    def __init__(self, mode: str = "none", device: torch.device | None = None):
        self.mode, self.device = mode, device
        self.active = mode != "none"
        self.rank = dist.get_rank() if self.active else 0
        self.world_size = dist.get_world_size() if self.active else 1
        self.is_main = self.rank == 0

    # -- running something on rank 0 only --------------------------------------------------------------------
    def on_main(self, fn, *args):
        """fn(*args) on rank 0; its result (or its exception, re-raised everywhere) reaches every rank."""
        if not self.active:
            return fn(*args)
        box = [None, None]
        if self.is_main:
            try:
                box[0] = fn(*args)
            except Exception as e:  # handed to every rank: all fail alike instead of waiting for rank 0
                box[1] = e
        dist.broadcast_object_list(box, src=0)
        if box[1] is not None:
            raise box[1]
        return box[0]

    def gather(self, obj):
        """[obj of rank 0, obj of rank 1, ...] on rank 0 (None elsewhere); [obj] in one process."""
        if not self.active:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def check_same(self, what: str, value) -> None:
        """Refuse to train when ranks disagree on `value` (e.g. loaded different base models)."""
        if not self.active:
            return
        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        if any(v != values[0] for v in values):
            raise ValueError(f"ranks disagree on {what}: " + "; ".join(f"rank {i}: {v}" for i, v in enumerate(values)))

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(t)
        return t

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on some rank (Ctrl-C reaching only one of them)."""
        if not self.active:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t)
        return bool(t.item())  # SYNC

    def row_shard(self) -> "fsdp4bit.RowShard | None":
        """What load_pretrained(shard=...) takes under --parallel fsdp2 (None otherwise): this rank's rows of every
        projection, and an all_gather for the one non-local step of quantizing them (fsdp4bit.quantize_rows)."""
        if self.mode != "fsdp2":
            return None

        def gather(t: torch.Tensor) -> torch.Tensor:
            parts = [torch.empty_like(t) for _ in range(self.world_size)]
            dist.all_gather(parts, t.contiguous())
            return torch.cat(parts)

        return fsdp4bit.RowShard(self.rank, self.world_size, gather)

    # -- wrapping the model ------------------------------------------------------------------------------------
    def wrap(self, model: nn.Module):
        """The object sft.token_loss_sum runs (it calls `.model` and `.lm_head`): `model` itself, or a view whose
        .model is DDP around model.model, or `model` with FSDP2 applied in place. Call after add_lora and after
        loading a checkpoint's adapter; build the optimizer afterwards (FSDP2 replaces the parameters)."""
        if self.mode == "none":
            return model
        check_trainable_in_layers(model, self.mode)
        if self.mode == "ddp":
            ddp = DistributedDataParallel(model.model, device_ids=[self.device.index] if self.device.type == "cuda"
                                          else None, init_sync=False, **_NO_BUFFER_SYNC)
            ddp.register_comm_hook(None, _allreduce_sum)
            return _DDPView(model, ddp)
        layers = getattr(model.model, "layers", None)
        if not isinstance(layers, nn.ModuleList) or not len(layers):
            raise ValueError(f"--parallel fsdp2 needs a model with decoder layers in model.model.layers; "
                             f"{type(model).__name__} has none")
        fsdp4bit.check_shardable(model, self.world_size)
        fsdp4bit.to_shardable(model)
        for layer in layers:
            fully_shard(layer)
        inner = model.model
        whole = {p for n, p in inner.named_parameters() if not n.startswith("layers.")}  # embedding, final norm
        fully_shard(inner, ignored_params=whole)
        gloo = dist.get_backend() == "gloo"
        for m in inner.modules():
            if isinstance(m, FSDPModule):
                m.set_gradient_divide_factor(1.0)  # sum over ranks: the loss is already normalised globally
                if gloo:  # gloo has no PREMUL_SUM/AVG reductions: plain SUM (then a divide by 1, skipped)
                    m.set_force_sum_reduction_for_comms(True)
        return model

    def no_sync(self, view, last: bool):
        """DDP: skip the all-reduce for all but the last micro-batch of a step (gradients accumulate locally)."""
        if isinstance(view, _DDPView) and not last:
            return view.model.no_sync()
        return contextlib.nullcontext()

    def optimizer(self, params: list, make):
        """make(params) -> optimizer; for FSDP2 over each rank's local shards (ShardOptimizer)."""
        if self.mode != "fsdp2":
            return make(params)
        return ShardOptimizer(params, make)

    def clip_grad_norm(self, params: list, max_norm: float) -> torch.Tensor:
        """Clip to the global gradient norm; a plain tensor (FSDP2's DTensor norm made whole)."""
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm

    @contextlib.contextmanager
    def whole_adapter(self, model: nn.Module):
        """Inside, every LoRA A/B of `model` is its whole tensor (FSDP2 shards gathered on all ranks), so
        lora.save_adapter writes the one-process file; a no-op unless FSDP2."""
        if self.mode != "fsdp2":
            yield
            return
        saved = []
        for m in lora_modules(model).values():
            for lin in (m.lora_A, m.lora_B):
                p = lin._parameters["weight"]
                saved.append((lin, p))
                lin._parameters["weight"] = nn.Parameter(p.full_tensor(), requires_grad=False)  # collective
        try:
            yield
        finally:
            for lin, p in saved:
                lin._parameters["weight"] = p


class _DDPView(nn.Module):
    """What token_loss_sum sees under DDP: .model is DDP(model.model) (so forward goes through DDP), .lm_head is
    the model's own. The Llama itself stays unwrapped for saving and names."""

    def __init__(self, model: nn.Module, ddp: DistributedDataParallel):
        super().__init__()
        self.model, self.lm_head = ddp, model.lm_head


class ShardOptimizer:
    """An optimizer over FSDP2's local shards: PagedAdamW's kernels take plain tensors, not DTensors. Before each
    step the DTensor gradients' local shards become the shards' .grad; zero_grad clears both."""

    def __init__(self, params: list, make):
        self.params = params
        with torch.no_grad():
            self.local = [p.to_local() if isinstance(p, DTensor) else p for p in params]  # share the shards' storage
        self.inner = make(self.local)
        self.param_groups = self.inner.param_groups

    def step(self):
        for p, local in zip(self.params, self.local):
            if local is not p:
                local.grad = None if p.grad is None else p.grad.to_local()
        self.inner.step()

    def zero_grad(self, set_to_none: bool = True):
        for p in self.params:
            p.grad = None
        self.inner.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


def check_trainable_in_layers(model: nn.Module, mode: str) -> None:
    """DDP wraps model.model and FSDP2 shards per decoder layer: LoRA on lm_head (or anything trained outside
    model.layers) would be left out of both."""
    outside = [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("model.layers.")]
    if outside:
        raise ValueError(f"--parallel {mode}: trainable parameters outside the decoder layers "
                         f"({', '.join(outside[:3])}); adapt only projections inside model.layers")


def _allreduce_sum(process_group, bucket):
    """DDP comm hook: sum the bucket over ranks (DDP's default averages; the loss is already global)."""
    work = dist.all_reduce(bucket.buffer(), group=process_group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


# DDP broadcasts every buffer at each forward by default: for a 4-bit base that is the whole model. torch 2.13 renamed
# the flag (broadcast_buffers -> forward_sync_buffers); 2.11 has only the old name.
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                   inspect.signature(DistributedDataParallel.__init__).parameters else {"broadcast_buffers": False})


def shutdown() -> None:
    """Leave the process group (end of a torchrun finetune); a no-op without one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def setup(mode: str, device: torch.device, backend: str = "auto", timeout_s: float = 180.0) -> Parallel:
    """The Parallel of this process; for ddp/fsdp2 joins (or reuses) the process group torchrun describes."""
    if mode not in MODES:
        raise ValueError(f"--parallel must be one of {MODES}, got {mode!r}")
    if backend not in BACKENDS:
        raise ValueError(f"--dist-backend must be one of {BACKENDS}, got {backend!r}")
    if mode == "none":
        return Parallel()
    missing = [v for v in TORCHRUN_VARS if v not in os.environ]
    if missing and not dist.is_initialized():
        raise ValueError(f"--parallel {mode} runs one process per rank under torchrun (missing {', '.join(missing)}): "
                         f"torchrun --nproc-per-node N -m minqlora finetune ... --parallel {mode}")
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"--dist-backend nccl needs CUDA devices, but this run trains on {device}; use "
                         "--dist-backend gloo (or auto) on CPUs")
    if timeout_s <= 0:
        raise ValueError(f"--dist-timeout must be > 0 seconds, got {timeout_s}")
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    elif dist.get_backend() != backend:
        raise ValueError(f"the process group uses {dist.get_backend()}, but this run asks for {backend}")
    return Parallel(mode, device)
