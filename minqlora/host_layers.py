"""Host layers: decoder layers that keep their activations, parked in pinned host memory between forward and
backward. The third per-layer policy beside keeping them on the GPU and recomputing them (checkpointing.py).

Why. A layer that is not checkpointed saves about 94.6 KB a token for its backward on the Llama-3-8B shape
(recompute.py; 0.72 GiB a layer at 4 × 2048), and recomputing it instead costs a second forward: one QLoRA step
of that shape on an H200 ran 13,949 tok/s at 30.5 GB with no checkpointing and 9,900 tok/s at 7.46 GB with every
layer checkpointed and its input offloaded (about 41 % more time). PCIe moves about 45 GB/s each way, so one
layer's 0.72 GiB crosses in about 17 ms, against about 6 ms of forward and 12 ms of backward per layer: one link
hides the copies of roughly 8-11 layers in a step, if each copy has other layers' compute to run behind.

Which layers. `host_layers` of them from the start of the network, every `host_stride`-th: layers 0, s, 2s, ...
(LlamaModel.host_layers / host_stride; host_layer_range), the others checkpointed (or kept, without checkpointing),
the last keep_last_layers on the GPU. Their copies out overlap the forward of every later layer, their copies back
the backward of every later layer, and they come back at the end of the backward, when the other layers have freed
their memory. Parked at the end of the network instead (the last layers before the loss), 12 layers' 204 ms of
copies would meet 72 ms of forward after them and then be needed first in the backward: slower than recomputing
them. Stride 1 parks a contiguous run: its copies queue on the one link, so the GPU holds the layers still
waiting for theirs in the forward, and in the backward each layer brought back ahead adds to the recompute peak
(full checkpointing + offload on the 8B shape at 4 x 2048, 7.46 GB alone: the first 10 layers parked peaked at
8.21 GB with prefetch 1 and 11.61 GB with prefetch 2). With stride s each copy has s layers of forward to run
behind (s >= COPY_LAYERS covers its ~17 ms at ~6 ms a layer), so about one parked layer is pending on the GPU at a
time; in the backward, with host_prefetch < s, a parked layer's backward is done before the next one is fetched.

The protocol on CUDA (one side stream per forward; `compute` is the stream the forward ran on, which autograd also
runs each node's backward on):
  pack    saved_tensors_hooks around the layer's forward. Each saved tensor whose storage is at least
          MIN_PARK_BYTES, on the model's device and not a parameter's or buffer's (the 4-bit bytes, LoRA A/B, norm
          weights; matched by storage, so saved views of them are left too) nor the forward's shared cos/sin/mask,
          has its whole storage copied once (views of one storage share one copy) to a pinned host block on the
          side stream, after side.wait_stream(compute). Autograd keeps a handle (the record, dtype, shape, strides,
          offset); the record keeps the GPU storage until its release.
  release After layer j's forward the parked layers are released in order: one whose copies are done (an event
          recorded on the side stream after its last copy, polled) drops its GPU storages; one that is due (before
          the forward of its due layer, release_layers, or at the forward's end) makes compute wait for that event
          first. The wait puts the reuse of those blocks after the copies in stream order, so the allocator may
          hand them out at once. (Dropping them on a polled event alone would not do: the host
          runs layers ahead of the GPU, so the events it polls are seldom done yet. Dropping them with
          record_stream(side) would lower torch's allocated count without freeing memory in time.)
  fetch   A hook on layer (i + prefetch)'s output fires when that layer's backward starts and brings layer i's
          storages back (latest saved first, the order backward reads them): blocks are allocated on compute (its
          pool, where the backward frees memory), side.wait_stream(compute) (those blocks may still be read by
          compute work queued before), the copy and an event per storage on the side stream.
  unpack  compute waits for that storage's event and gets a view of the brought-back storage with the saved
          tensor's dtype, shape, strides and offset: the same bytes, so the same results bit for bit. Nothing
          prefetched (a partial backward, a second unpack after the last handle, retain_graph): fetched there.
          When every handle of a storage has been unpacked the record lets go of it (the views keep it while
          autograd needs them); storages fetched but never unpacked are waited for at the end of the backward
          (queue_callback) before they can be freed. The host block goes back to torch's pinned cache when the last
          handle dies.
Pinned blocks come from torch's caching host allocator (what pin_memory=True draws from, as checkpointing's
HostOffloader does): blocks freed at the end of one step, after their copies, serve the next step without a
cudaHostAlloc. It rounds each block up to a power of two (a 224 MiB (8192, 14336) bf16 tensor takes 256 MiB).
On a CPU the same code runs with synchronous copies into separate CPU tensors, so tests exercise packing,
dedup, views, prefetch and accounting, and results are bit-identical.

Leaves out: FSDP2 (refused: its gathered weights would be saved as activations and copied), torch.compile around
the layers (Dynamo does not trace these hooks), parking the checkpointed layers' inputs (HostOffloader does that),
and timing the copies to place releases and prefetches: COPY_LAYERS and the prefetch distance are fixed layer
counts from the numbers above.
"""

from __future__ import annotations

import math
import weakref
from collections import deque
from dataclasses import dataclass
from functools import partial

import torch
from torch.distributed.fsdp import FSDPModule

# Storages below this stay where they are: a copy has fixed costs (two launches, an event, a pinned block), and the
# bytes that matter are (B, T, H)-sized: 64 MiB at 4 × 2048 on the 8B shape, against 1 MiB for attention's
# log-sum-exp (B, heads, T) and 128 KB for a bf16 cast of a LoRA A.
MIN_PARK_BYTES = 1 << 20
# A parked layer's copy out takes about 17 ms (0.72 GiB at ~45 GB/s) against ~6 ms of forward per layer on the 8B
# shape at 4 × 2048: about this many layers' forward (release_layers).
COPY_LAYERS = 3
# Layer i comes back when the backward of layer i + PREFETCH_LAYERS starts (LlamaModel.host_prefetch): 17 ms of
# copy per layer against ~12 ms of backward, and the copies of consecutive parked layers queue on one link, so the
# lead must grow with the run of parked layers. Measured (H200, 8B shape, 4 x 2048, no checkpointing, first 10
# layers parked): lead 2 10,794 tok/s, lead 4 13,474, at the same 23.31 GB peak (it falls at the forward's end, before
# any layer comes back). With checkpointing each layer brought back early adds its 0.72 GiB to the backward's peak
# (full + offload, 10 parked: lead 1 8.21 GB at 6,913 tok/s, lead 2 11.61 GB at 10,360): lower it there.
PREFETCH_LAYERS = 4


@dataclass
class HostStats:
    """What one forward parked (LlamaModel.host_stats), and how it came back in its backward."""

    layers: int = 0  # layers parked
    tensors: int = 0  # saved tensors handed to autograd as handles
    bytes: int = 0  # bytes copied to host memory: distinct storages
    weights: int = 0  # saved tensors left in place: a parameter's or buffer's storage, or the shared cos/sin/mask
    small: int = 0  # saved tensors left in place: storage under MIN_PARK_BYTES (or another device, or not strided)
    prefetched: int = 0  # bytes brought back by the prefetch hooks
    on_demand: int = 0  # bytes brought back at unpack (no prefetch had run, or a second unpack)


def host_layer_range(n_layers: int, host_layers: int, keep_last: int = 0, stride: int = 1) -> range:
    """The parked layers, 0, stride, 2 · stride, ... (host_layers of them), checked: they must be layers of the
    model, and with checkpointing the last keep_last layers stay on the GPU and may not be parked too (pass
    keep_last=0 without checkpointing)."""
    if not isinstance(host_layers, int) or isinstance(host_layers, bool) or host_layers < 0:
        raise ValueError(f"host_layers must be an int >= 0, got {host_layers!r}")
    if not isinstance(stride, int) or isinstance(stride, bool) or stride < 1:
        raise ValueError(f"host_stride must be an int >= 1 (1: consecutive layers), got {stride!r}")
    parked = range(0, host_layers * stride, stride)
    if parked and parked[-1] + min(keep_last, n_layers) >= n_layers:
        raise ValueError(f"host_layers={host_layers} with keep_last_layers={keep_last} and host_stride={stride} asks "
                         f"for more than the model's {n_layers} layers: layers 0, {stride}, ... {parked[-1]} are "
                         "parked in host memory, the last keep_last_layers kept on the GPU, and no layer can be both")
    return parked


def release_layers(layers) -> dict[int, int]:
    """For each parked layer (ascending), the layer before whose forward its GPU copies are released at the latest.

    Copies out queue on one link: the n-th parked layer, at layer L_n, starts copying when it is done and when the
    one before it is, so due_n = max(due_{n-1}, L_n) + COPY_LAYERS. Consecutive layers (stride 1) free their memory
    every COPY_LAYERS-th layer, 3 · (n + 1), without stalling the forward; with stride >= COPY_LAYERS each is due
    COPY_LAYERS layers after itself."""
    due, last = {}, -math.inf
    for layer in layers:
        last = due[layer] = max(last, layer) + COPY_LAYERS
    return due


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    """t's whole storage as a 1-D uint8 tensor (no copy)."""
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())


class _Parked:
    """One storage a parked layer saved: its host copy and, while needed, its device bytes."""

    __slots__ = ("nbytes", "source", "host", "back", "ready", "handles", "unpacks", "__weakref__")

    def __init__(self, source: torch.Tensor, host: torch.Tensor):
        self.nbytes = source.numel()
        self.source = source  # the original bytes (uint8 view) until released
        self.host = host  # (nbytes,) uint8, pinned on CUDA
        self.back = None  # the bytes brought back to the device, until every handle has unpacked
        self.ready = None  # CUDA event: back's copy is done
        self.handles = 0  # saved tensors (views) pointing here
        self.unpacks = 0


class HostParking:
    """The parked layers of one forward pass and their backward (module docstring: the protocol).

    LlamaModel.forward calls run(i, ...) for each parked layer, after_layer(j, y) after every layer and
    finish_forward() after the last."""

    def __init__(self, device: torch.device, layers: range, last_layer: int, prefetch: int = PREFETCH_LAYERS):
        # layers: ascending (host_layer_range), not necessarily contiguous
        if not isinstance(prefetch, int) or prefetch < 0:
            raise ValueError(f"host_prefetch must be an int >= 0 (layers of lead), got {prefetch!r}")
        self.device, self.layers, self.last, self.prefetch = torch.device(device), layers, last_layer, prefetch
        self.due = release_layers(layers)  # parked layer -> the layer before whose forward it is released
        self.cuda = self.device.type == "cuda"
        self.compute = torch.cuda.current_stream(self.device) if self.cuda else None
        self.side = torch.cuda.Stream(self.device) if self.cuda else None
        self.stats = HostStats()
        self.parked: dict[int, list[weakref.ref]] = {}  # layer -> its records in pack order (autograd owns them)
        self.pending: deque[tuple[int, object, list[_Parked]]] = deque()  # (layer, copies-done event, records)
        self.inflight: set[_Parked] = set()  # brought back, not yet waited for by compute
        self._open: dict[int, _Parked] = {}  # storage -> record, during one parked layer's forward
        self._skip: set[int] = set()
        self._layer = -1
        self._callback_queued = False

    # -- forward -----------------------------------------------------------------------------------------------

    def run(self, i: int, layer, x, cos, sin, mask):
        """layer(x, cos, sin, mask) with what it saves for backward parked in host memory."""
        if isinstance(layer, FSDPModule):
            raise ValueError("host_layers does not combine with FSDP2 (--parallel fsdp2): the gathered weights would "
                             "be saved as activations and copied; use DDP or host_layers=0")
        shared = [t for t in (cos, sin, mask) if t is not None]
        self._skip = {_storage_key(t) for t in (*layer.parameters(), *layer.buffers(), *shared) if t is not None}
        self._open, self._layer, self.parked[i] = {}, i, []
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            y = layer(x, cos, sin, mask)
        records = list(self._open.values())
        self._open, self._layer = {}, -1
        done = None
        if self.cuda and records:
            done = torch.cuda.Event()
            done.record(self.side)  # after the layer's last copy out: the side stream runs them in order
        self.pending.append((i, done, records))
        self.stats.layers += 1
        return y

    def _pack(self, t: torch.Tensor):
        if isinstance(t, torch.nn.Parameter):
            self.stats.weights += 1
            return t
        if type(t) is not torch.Tensor or t.layout != torch.strided or t.device != self.device:
            self.stats.small += 1  # subclasses, sparse tensors, CPU scalars (RNG seeds): not what fills a GPU
            return t
        key = _storage_key(t)
        if key in self._skip:  # a view of a weight (the 4-bit bytes as uint8) or of the shared cos/sin/mask
            self.stats.weights += 1
            return t
        if t.untyped_storage().nbytes() < MIN_PARK_BYTES:
            self.stats.small += 1
            return t
        record = self._open.get(key)  # safe: every record of this layer holds its storage until the layer is over
        if record is None:
            record = self._open[key] = self._copy_out(t)
            self.parked[self._layer].append(weakref.ref(record))
        record.handles += 1
        self.stats.tensors += 1
        return record, t.dtype, t.shape, t.stride(), t.storage_offset()

    def _copy_out(self, t: torch.Tensor) -> _Parked:
        source = _bytes_of(t)
        if self.cuda:
            host = torch.empty(source.numel(), dtype=torch.uint8, pin_memory=True)
            self.side.wait_stream(self.compute)  # t is written by work queued on the compute stream
            with torch.cuda.stream(self.side):
                host.copy_(source, non_blocking=True)  # records the side stream's use of the pinned block
        else:
            host = source.clone()
        self.stats.bytes += source.numel()
        return _Parked(source, host)

    def after_layer(self, j: int, y: torch.Tensor) -> None:
        """Layer j's forward is done: release parked layers (module docstring) and hang the prefetch of the layers
        that come back when layer j's backward starts on its output y."""
        self._release(final=False, next_layer=j + 1)
        targets = [i for i in reversed(self.layers)
                   if i + self.prefetch == j or (j == self.last and i + self.prefetch > j)]
        if targets and y.requires_grad:
            y.register_hook(partial(self._on_grad, tuple(targets)))

    def finish_forward(self) -> None:
        self._release(final=True, next_layer=self.last + 1)

    def _release(self, final: bool, next_layer: int) -> None:
        while self.pending:
            i, done, records = self.pending[0]
            copied = done is None or done.query()  # CPU: copies were synchronous
            due = final or next_layer >= self.due[i]
            if not (copied or due):
                break  # later layers' copies queue behind this one's
            if not copied:
                self.compute.wait_event(done)  # blocks reused after this point are written after the copies
            for r in records:
                r.source = None
            self.pending.popleft()

    # -- backward ----------------------------------------------------------------------------------------------

    def _on_grad(self, targets: tuple[int, ...], grad):
        if not self._callback_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_done)
            self._callback_queued = True
        for i in targets:  # the latest layer first: it is needed first
            records = [r for r in (ref() for ref in reversed(self.parked.get(i, []))) if r is not None]
            self.stats.prefetched += self._fetch(records)
        return None

    def _fetch(self, records: list[_Parked]) -> int:
        """Start bringing records back to the device; returns the bytes started."""
        records = [r for r in records if r.back is None and r.source is None]
        if not records:
            return 0
        if not self.cuda:
            for r in records:
                r.back = r.host.clone()
            return sum(r.nbytes for r in records)
        with torch.cuda.stream(self.compute):  # from compute's pool: the blocks the backward frees
            blocks = [torch.empty(r.nbytes, dtype=torch.uint8, device=self.device) for r in records]
        self.side.wait_stream(self.compute)  # work queued on compute before may still use those blocks
        with torch.cuda.stream(self.side):
            for r, block in zip(records, blocks):
                block.copy_(r.host, non_blocking=True)
                r.back, r.ready = block, torch.cuda.Event()
                r.ready.record(self.side)
                self.inflight.add(r)
        return sum(r.nbytes for r in records)

    def _unpack(self, handle):
        if isinstance(handle, torch.Tensor):
            return handle
        record, dtype, shape, stride, offset = handle
        data = record.source
        if data is None:
            if record.back is None:
                self.stats.on_demand += self._fetch([record])
            data = record.back
            if record in self.inflight:
                self.compute.wait_event(record.ready)
                self.inflight.discard(record)
            record.unpacks += 1
            if record.unpacks >= record.handles:
                record.back = None  # the views below keep the storage while autograd uses them
        return torch.empty(0, dtype=dtype, device=data.device).set_(data.untyped_storage(), offset, shape, stride)

    def _backward_done(self) -> None:
        # Storages brought back but never unpacked (a node that did not read them): compute waits for their copies
        # before their blocks can go back to its pool.
        for r in self.inflight:
            self.compute.wait_event(r.ready)
            r.back = None
        self.inflight.clear()
        self._callback_queued = False
