"""PagedAdamW: AdamW with 32-bit or 8-bit state that can live outside GPU memory (QLoRA §3, "Paged Optimizers").

Covers the optimizer, the pure-PyTorch reference of its update (adamw_step_ref, adamw_step_8bit_ref: the
specification of the fused kernels in csrc/cpu/optim.cpp and csrc/cuda/optim_kernels.cuh), the two paging modes
and exact state_dict round trips. Leaves out the kernels and managed-memory allocation (csrc/, reached through
ops.py), learning-rate schedules and gradient clipping (sft.py).

The update (bnb-format.md §5), per element, step t >= 1, every operation in float32:
    m <- b1*m + (1-b1)*g                  v <- b2*v + (1-b2)*g*g
    p <- p*(1 - lr*wd) - lr*sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + eps*sqrt(1-b2^t))
Decoupled weight decay comes before the Adam step, as in torch.optim.AdamW and the AdamW paper (Loshchilov & Hutter,
Alg. 2); bitsandbytes' CUDA kernel applies it after, a difference of lr*wd times one step. A NaN/Inf gradient
element zeroes that element's m and v and leaves p alone (bitsandbytes' 8-bit rule; applied to 32-bit state too).

8-bit state (optim_bits=8): m as codes of the signed dynamic map, v of the unsigned map, in blocks of 256 with a
float32 absmax each, re-encoded to the nearest code after every step. Parameters under 4096 elements keep 32-bit
state. Parameters of any float dtype; the arithmetic and the 32-bit state are float32.

Paging applies to CUDA parameters. On a CPU all state is ordinary CPU tensors, whatever `paging` says.
- "managed": the state of parameters with >= 100,000 elements in CUDA unified memory, prefetched to the GPU before
  the parameter's update; the driver pages it out under memory pressure (bitsandbytes' paged optimizers). It never
  allocates more managed memory than the GPU has free: it raises instead (oversubscription can hang a shared GPU).
- "host": all state in pinned host memory, streamed through a fixed GPU buffer of host_buffer_bytes (two slots,
  side streams, events): while the kernel updates one chunk, the last one is copied back and the next one in. The
  GPU holds only that buffer for optimizer state. The copies back finish asynchronously: state_dict() and
  load_state_dict() wait for them; call synchronize() before reading `optimizer.state` yourself.
- None: ordinary tensors on the parameter's device.

Launches: the contiguous parameters of one param group with 32-bit state are updated by one adamw_step_32bit_list
call (the per-tensor Python cost dominated the step with hundreds of small LoRA tensors); 8-bit state, host paging
and non-contiguous parameters go one tensor at a time.

Host syncs: none in step() once state exists. The first step allocates state (for "managed", cudaMallocManaged after
a cudaMemGetInfo); freeing managed state (cudaFree), state_dict(), load_state_dict() and synchronize() wait for the
GPU.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch

from . import ops, quant

STATE_BLOCKSIZE = 256         # 8-bit state: one float32 absmax per 256 elements (bitsandbytes' 8-bit Adam)
MIN_8BIT_NUMEL = 4096         # smaller parameters keep 32-bit state (bitsandbytes' min_8bit_size)
MIN_MANAGED_NUMEL = 100_000   # smaller parameters' state is not paged (bitsandbytes' paged optimizers, 1e5)
SIGNED_ZERO_CODE = 127        # index of 0.0 in quant.DYNAMIC_SIGNED (bnb-format.md §3); 0.0 is index 0 unsigned
PAGING_MODES = ("managed", "host", None)
HYPER_KEYS = ("lr", "betas", "eps", "weight_decay")


# ---------------------------------------------------------------------------------------------------------------
# The reference update (the specification of the kernels; tests hold the kernels to it bit for bit)
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class AdamScalars:
    """The per-step scalars, computed in double and rounded once to float32 (csrc/optim_math.h adam_scalars)."""

    beta1: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    decay: float       # 1 - lr*wd
    step_size: float   # lr * sqrt(1-b2^t) / (1-b1^t)
    eps_hat: float     # eps * sqrt(1-b2^t)

    @classmethod
    def compute(cls, lr, beta1, beta2, eps, weight_decay, step) -> "AdamScalars":
        c1 = 1.0 - beta1 ** step
        c2 = math.sqrt(1.0 - beta2 ** step)
        return cls(beta1, 1.0 - beta1, beta2, 1.0 - beta2, 1.0 - lr * weight_decay, lr * c2 / c1, eps * c2)


def adamw_step_ref(p, grad, exp_avg, exp_avg_sq, *, lr, beta1, beta2, eps, weight_decay, step):
    """One AdamW step with float32 state; returns (p, exp_avg, exp_avg_sq), inputs untouched. Every operation is
    one float32 rounding in the order of csrc/optim_math.h adamw_element."""
    f32 = {k: torch.tensor(v, dtype=torch.float32, device=p.device)
           for k, v in vars(AdamScalars.compute(lr, beta1, beta2, eps, weight_decay, step)).items()}
    g = grad.float()
    ok = torch.isfinite(g)
    m = exp_avg * f32["beta1"] + g * f32["one_minus_beta1"]
    v = exp_avg_sq * f32["beta2"] + (g * g) * f32["one_minus_beta2"]
    p32 = p.float()
    # torch's vectorized float32 sqrt on CPUs (SLEEF, 0.5001 ulp) is not always correctly rounded, the kernels' is:
    # the square root in float64, rounded once to float32, is.
    root = v.double().sqrt().float()
    new_p = p32 * f32["decay"] - f32["step_size"] * (m / (root + f32["eps_hat"]))
    zero = torch.zeros((), dtype=torch.float32, device=p.device)
    return torch.where(ok, new_p, p32).to(p.dtype), torch.where(ok, m, zero), torch.where(ok, v, zero)


def adamw_step_8bit_ref(p, grad, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax, **hyper):
    """The 8-bit step: decode m, v (quant.dequantize_blockwise_8bit_ref), adamw_step_ref, re-encode to the nearest
    codes (quant.quantize_blockwise_8bit_ref). Returns (p, codes_m, codes_v, absmax_m, absmax_v)."""
    m = quant.dequantize_blockwise_8bit_ref(exp_avg, exp_avg_absmax, quant.DYNAMIC_SIGNED, STATE_BLOCKSIZE)
    v = quant.dequantize_blockwise_8bit_ref(exp_avg_sq, exp_avg_sq_absmax, quant.DYNAMIC_UNSIGNED, STATE_BLOCKSIZE)
    new_p, m, v = adamw_step_ref(p, grad, m.view(p.shape), v.view(p.shape), **hyper)
    c1, a1 = quant.quantize_blockwise_8bit_ref(m, quant.DYNAMIC_SIGNED, STATE_BLOCKSIZE)
    c2, a2 = quant.quantize_blockwise_8bit_ref(v, quant.DYNAMIC_UNSIGNED, STATE_BLOCKSIZE)
    return new_p, c1.view(exp_avg.shape), c2.view(exp_avg_sq.shape), a1, a2


# ---------------------------------------------------------------------------------------------------------------
# paging="host": pinned host state streamed through two fixed GPU slots
# ---------------------------------------------------------------------------------------------------------------

class _HostPager:
    """Double-buffered streaming of one device's host-resident state, on two side streams so copies in and copies
    back run at once (PCIe is full duplex). Per chunk i, in slot i % 2: the copy-in stream waits until chunk i - 2
    has left the slot (`freed`), copies chunk i in and records `loaded`; the current stream waits for that, runs the
    update kernel and records `updated`; the copy-back stream waits for that, copies the chunk out and records
    `freed`. So the kernel of chunk i overlaps the copy back of i - 1 and the copy in of i + 1."""

    def __init__(self, device: torch.device, slot_bytes: int):
        self.copy_in, self.copy_back = torch.cuda.Stream(device), torch.cuda.Stream(device)
        self.slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=device) for _ in range(2)]
        for slot in self.slots:  # used on the side streams too: the allocator must know before reusing them
            slot.record_stream(self.copy_in)
            slot.record_stream(self.copy_back)
        self.loaded, self.updated, self.freed = ([torch.cuda.Event(), torch.cuda.Event()] for _ in range(3))
        self.done = None  # event after the last copy back

    def capacity(self, eight_bit: bool) -> int:
        """Elements per chunk, a multiple of 256 so 8-bit blocks never straddle chunks. Per 256 elements a slot
        holds 32-bit m, v (2048 bytes) or 8-bit codes plus two absmax (520 bytes, +16 for alignment)."""
        n = self.slots[0].numel()
        return (n - 16) // 520 * 256 if eight_bit else n // 2048 * 256

    def views(self, slot: int, names, n: int) -> dict:
        """Slot memory cut into the state tensors of an n-element chunk."""
        buf = self.slots[slot]
        if "exp_avg_absmax" not in names:
            return {"exp_avg": buf[:4 * n].view(torch.float32), "exp_avg_sq": buf[4 * n:8 * n].view(torch.float32)}
        nb, off = -(-n // STATE_BLOCKSIZE), -(-2 * n // 16) * 16
        return {"exp_avg": buf[:n], "exp_avg_sq": buf[n:2 * n],
                "exp_avg_absmax": buf[off:off + 4 * nb].view(torch.float32),
                "exp_avg_sq_absmax": buf[off + 4 * nb:off + 8 * nb].view(torch.float32)}

    def run(self, work, update) -> None:
        """work: (p_chunk, g_chunk, host_tensors, group, step); update(p, g, state_tensors, group, step)."""
        main = torch.cuda.current_stream(self.slots[0].device)
        # Copies in wait for main-stream work (slot memory may have been freed by it just before) and for the
        # previous step's copies back (they free the slots and write the host state read here).
        self.copy_in.wait_stream(main)
        self.copy_in.wait_stream(self.copy_back)
        views = [self.views(i % 2, host.keys(), p.numel()) for i, (p, _, host, _, _) in enumerate(work)]

        def load(i):
            with torch.cuda.stream(self.copy_in):
                if i >= 2:
                    self.copy_in.wait_event(self.freed[i % 2])  # chunk i - 2 has left the slot
                for name, src in work[i][2].items():
                    views[i][name].copy_(src, non_blocking=True)
                self.loaded[i % 2].record(self.copy_in)

        for i in range(min(2, len(work))):
            load(i)
        for i, (p, g, host, group, step) in enumerate(work):
            main.wait_event(self.loaded[i % 2])
            update(p, g, views[i], group, step)
            self.updated[i % 2].record(main)
            with torch.cuda.stream(self.copy_back):
                self.copy_back.wait_event(self.updated[i % 2])
                for name, dst in host.items():
                    dst.copy_(views[i][name], non_blocking=True)
                self.freed[i % 2].record(self.copy_back)
            if i + 2 < len(work):
                load(i + 2)
        self.done = torch.cuda.Event()
        self.done.record(self.copy_back)


# ---------------------------------------------------------------------------------------------------------------
# The optimizer
# ---------------------------------------------------------------------------------------------------------------

class PagedAdamW(torch.optim.Optimizer):
    """AdamW with 32-bit or 8-bit state and optional paging; see the module docstring for the rules.

    Per-parameter state: "step" (int), "exp_avg" and "exp_avg_sq" (float32 of the parameter's shape, or uint8 codes
    of that shape for 8-bit state) and, for 8-bit state, "exp_avg_absmax" and "exp_avg_sq_absmax" (float32,
    ceil(numel/256)). state_dict() holds exactly these, wherever they live, so it loads into a PagedAdamW with any
    paging, on any device, with the same optim_bits.
    """

    def __init__(self, params, lr: float = 2e-4, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 optim_bits: int = 32, paging="managed", host_buffer_bytes: int = 64 << 20):
        if optim_bits not in (32, 8):
            raise ValueError(f"optim_bits must be 32 or 8, got {optim_bits!r}")
        if paging not in PAGING_MODES:
            raise ValueError(f"paging must be one of {PAGING_MODES}, got {paging!r}")
        if not isinstance(host_buffer_bytes, int) or host_buffer_bytes < 4096:
            raise ValueError(f"host_buffer_bytes must be an int >= 4096 (two slots of one 256-element chunk of "
                             f"32-bit state), got {host_buffer_bytes!r}")
        self.optim_bits, self.paging, self.host_buffer_bytes = optim_bits, paging, host_buffer_bytes
        self._maps: dict = {}    # device -> (signed map, unsigned map) on that device
        self._pagers: dict = {}  # device -> _HostPager
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)  # fills in the defaults; the checks below then see the whole group
        group = self.param_groups[-1]
        try:
            group["betas"] = tuple(group["betas"])
            _check_hyper(group, f"param group {len(self.param_groups) - 1}")
            for p in group["params"]:
                if p.dtype not in quant.FLOAT_DTYPES:
                    raise ValueError(f"PagedAdamW updates float32, float16 and bfloat16 parameters, got {p.dtype}")
                if p.device.type == "cuda" and not ops.has_cuda_kernels():
                    raise RuntimeError("a parameter is on CUDA but minqlora was built without its CUDA kernels")
        except (ValueError, RuntimeError):
            self.param_groups.pop()  # a refused group leaves the optimizer as it was
            raise

    # ---- state layout and placement ----

    def _state_specs(self, p) -> dict:
        """name -> (shape, dtype, initial value) of p's state tensors."""
        if self.optim_bits == 8 and p.numel() >= MIN_8BIT_NUMEL:
            nb = (-(-p.numel() // STATE_BLOCKSIZE),)
            return {"exp_avg": (p.shape, torch.uint8, SIGNED_ZERO_CODE), "exp_avg_sq": (p.shape, torch.uint8, 0),
                    "exp_avg_absmax": (nb, torch.float32, 0), "exp_avg_sq_absmax": (nb, torch.float32, 0)}
        return {"exp_avg": (p.shape, torch.float32, 0), "exp_avg_sq": (p.shape, torch.float32, 0)}

    def _placement(self, p) -> str:
        if p.device.type != "cuda" or self.paging is None:
            return "plain"
        if self.paging == "managed":
            return "managed" if p.numel() >= MIN_MANAGED_NUMEL else "plain"
        return "host"

    def _new_state(self, p, name, shape, dtype) -> torch.Tensor:
        where = self._placement(p)
        if where == "host":
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        if where == "managed" and name in ("exp_avg", "exp_avg_sq"):  # the small absmax vectors stay on the GPU
            return ops.managed_empty(shape, dtype, p.device)
        return torch.empty(shape, dtype=dtype, device=p.device)

    def _init_state(self, p, state: dict) -> None:
        state["step"] = 0
        for name, (shape, dtype, fill) in self._state_specs(p).items():
            state[name] = self._new_state(p, name, shape, dtype).fill_(fill)

    def _map_pair(self, device):
        if device not in self._maps:
            self._maps[device] = (quant.DYNAMIC_SIGNED.to(device), quant.DYNAMIC_UNSIGNED.to(device))
        return self._maps[device]

    # ---- the step ----

    @staticmethod
    def _hyper(group: dict, step: int) -> dict:
        return dict(lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"],
                    weight_decay=group["weight_decay"], step=step)

    def _update(self, p, g, st: dict, group: dict, step: int) -> None:
        """One fused kernel call on (a chunk of) a parameter, its gradient and its state tensors."""
        hyper = self._hyper(group, step)
        if "exp_avg_absmax" in st:
            ops.adamw_step_8bit(p, g, st["exp_avg"], st["exp_avg_sq"], st["exp_avg_absmax"], st["exp_avg_sq_absmax"],
                                *self._map_pair(p.device), **hyper)
        else:
            ops.adamw_step_32bit(p, g, st["exp_avg"], st["exp_avg_sq"], **hyper)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        todo = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or p.numel() == 0:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("PagedAdamW does not support sparse gradients")
                todo.append((p, group))
        for p, _ in todo:  # all state first, so managed allocations see the GPU's free memory before any prefetch
            if not self.state[p]:
                self._init_state(p, self.state[p])
        streamed = defaultdict(list)  # device -> chunks of host-paged parameters
        # Contiguous parameters with 32-bit state go in lists, one adamw_step_32bit_list call per (group, step):
        # the per-call Python cost (~40 µs a tensor) was most of this step for hundreds of small LoRA tensors.
        lists: dict[tuple[int, int], tuple[dict, list, list, list, list]] = {}
        for p, group in todo:
            state = self.state[p]
            state["step"] += 1
            where = self._placement(p)
            if where == "managed":
                for name in ("exp_avg", "exp_avg_sq"):
                    ops.prefetch_managed(state[name], p.device)
            if where != "host" and p.is_contiguous() and "exp_avg_absmax" not in state:
                key = (id(group), state["step"])
                if key not in lists:
                    lists[key] = (group, [], [], [], [])
                _, ps, gs, ms, vs = lists[key]
                ps.append(p)  # shapes as they are: the kernel wants p and grad alike and the state's numel
                gs.append(p.grad.contiguous())
                ms.append(state["exp_avg"])
                vs.append(state["exp_avg_sq"])
                continue
            g = p.grad.contiguous().view(-1)
            pc = p if p.is_contiguous() else p.contiguous()
            tensors = {k: v for k, v in state.items() if k != "step"}
            if where == "host":
                streamed[p.device] += self._chunks(p, pc.view(-1), g, tensors, group, state["step"])
                continue
            self._update(pc.view(-1), g, {k: v.view(-1) for k, v in tensors.items()}, group, state["step"])
            if pc is not p:
                p.copy_(pc)
        for (_, step), (group, ps, gs, ms, vs) in lists.items():
            ops.adamw_step_32bit_list(ps, gs, ms, vs, **self._hyper(group, step))
        for device, work in streamed.items():
            self._pager(device).run(work, self._update)
        return loss

    def _pager(self, device) -> _HostPager:
        if device not in self._pagers:
            self._pagers[device] = _HostPager(device, self.host_buffer_bytes // 2)
        return self._pagers[device]

    def _chunks(self, p, p_flat, g, tensors, group, step) -> list:
        if not p.is_contiguous():
            raise NotImplementedError("paging='host' needs contiguous parameters")
        eight_bit = "exp_avg_absmax" in tensors
        size = self._pager(p.device).capacity(eight_bit)
        work = []
        for a in range(0, p.numel(), size):
            b = min(a + size, p.numel())
            host = {k: v.view(-1)[a:b] for k, v in tensors.items() if k in ("exp_avg", "exp_avg_sq")}
            if eight_bit:
                blocks = slice(a // STATE_BLOCKSIZE, -(-b // STATE_BLOCKSIZE))
                host.update({k: tensors[k][blocks] for k in ("exp_avg_absmax", "exp_avg_sq_absmax")})
            work.append((p_flat[a:b], g[a:b], host, group, step))
        return work

    def synchronize(self) -> None:
        """Wait until paging="host" has copied the last step's state back to the host."""
        for pager in self._pagers.values():
            if pager.done is not None:
                pager.done.synchronize()

    # ---- state dict ----

    def state_dict(self) -> dict:
        self.synchronize()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """Load state saved by a PagedAdamW with the same optim_bits and parameters (any paging, any device). All of
        it is checked before anything changes. Unlike torch.optim.Optimizer's, this never casts state to the
        parameter's dtype (that would round float32 state of bf16 parameters) and puts it where this optimizer's
        paging keeps it; the saved tensors are copied, never aliased."""
        self.synchronize()
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
            raise ValueError("state_dict must be a dict with keys 'state' and 'param_groups'")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(saved_groups)} param groups, this optimizer has "
                             f"{len(self.param_groups)}")
        params = {}
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved.get("params", ())) != len(group["params"]):
                raise ValueError(f"param group {i}: state_dict lists {len(saved.get('params', ()))} parameters, "
                                 f"this optimizer {len(group['params'])}")
            _check_hyper(saved, f"param group {i} of the state_dict")
            params.update(zip(saved["params"], group["params"]))
        for key, saved in state_dict["state"].items():
            if key not in params:
                raise ValueError(f"state_dict holds state for parameter {key!r}, which no param group lists")
            self._check_saved(params[key], saved, key)
        self.state = defaultdict(dict)  # frees the old state (and its managed memory) before allocating the new
        for key, saved in state_dict["state"].items():
            p = params[key]
            self.state[p]["step"] = int(saved["step"])
            for name, (shape, dtype, _) in self._state_specs(p).items():
                self.state[p][name] = self._new_state(p, name, shape, dtype).copy_(saved[name])
        for saved, group in zip(saved_groups, self.param_groups):
            group.update({k: v for k, v in saved.items() if k != "params"})
            group["betas"] = tuple(group["betas"])

    def _check_saved(self, p, saved, key) -> None:
        where = f"state_dict state of parameter {key} (shape {tuple(p.shape)})"
        if not isinstance(saved, dict):
            raise ValueError(f"{where} must be a dict, got {type(saved).__name__}")
        specs = self._state_specs(p)
        unknown = saved.keys() - specs.keys() - {"step"}
        missing = (specs.keys() | {"step"}) - saved.keys()
        kind = "8-bit" if "exp_avg_absmax" in specs else "32-bit"
        other = "32-bit" if kind == "8-bit" else "8-bit"
        hint = (f"this optimizer keeps {kind} state for it (optim_bits={self.optim_bits}; parameters under "
                f"{MIN_8BIT_NUMEL} elements always keep 32-bit state)")
        if unknown or missing:
            raise ValueError(f"{where}: {'missing keys ' + str(sorted(missing)) if missing else ''}"
                             f"{' and ' if missing and unknown else ''}"
                             f"{'unexpected keys ' + str(sorted(unknown)) if unknown else ''}; {hint}")
        step = saved["step"]
        if isinstance(step, torch.Tensor):
            step = step.item() if step.numel() == 1 else None
        if not (isinstance(step, (int, float)) and float(step).is_integer() and step >= 0):
            raise ValueError(f"{where}: 'step' must be a non-negative integer, got {saved['step']!r}")
        for name, (shape, dtype, _) in specs.items():
            t = saved[name]
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{where}: {name!r} must be a tensor, got {type(t).__name__}")
            if t.dtype != dtype:
                saved_kind = other if t.dtype in (torch.uint8, torch.float32) else f"{t.dtype}"
                raise ValueError(f"{where}: {name!r} has dtype {t.dtype} ({saved_kind} state) but {hint}")
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"{where}: {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def _check_hyper(group: dict, where: str) -> None:
    missing = [k for k in HYPER_KEYS if k not in group]
    if missing:
        raise ValueError(f"{where} lacks {missing}")
    lr, betas, eps, wd = (group[k] for k in HYPER_KEYS)
    if not 0.0 <= lr:
        raise ValueError(f"{where}: lr must be >= 0, got {lr}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"{where}: betas must be two values in [0, 1), got {betas}")
    if not 0.0 <= eps:
        raise ValueError(f"{where}: eps must be >= 0, got {eps}")
    if not 0.0 <= wd:
        raise ValueError(f"{where}: weight_decay must be >= 0, got {wd}")
