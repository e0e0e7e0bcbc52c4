"""LoRA: the LoRALinear module, add_lora / merge_lora / trainable_summary, and adapter files in PEFT's format.

LoRA (Hu et al. 2021, §4.1) freezes a linear layer W (out, in) and learns a low-rank update ΔW = s · B A with
A (r, in) and B (out, r), r ≪ min(in, out):

    y = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ,     s = α / r      (rsLoRA, Kalajdzievski 2023: s = α / √r)

A starts Kaiming-uniform with a = √5 (nn.Linear's own init, as in the paper's loralib and peft) and B at zero, so
training starts exactly at the base model. W is an nn.Linear or a 4-bit Linear4bit (QLoRA §3); gradients reach A, B
and x, never W. merge() folds ΔW into W: in place for nn.Linear; for Linear4bit, W' = dequant(W) + ΔW becomes a 16-bit
nn.Linear (exact up to 16-bit rounding) or, with requantize=True, 4-bit again — lossy: W' moves to the nearest codes
(error up to absmax·max_error_bound per block, the same as quantizing any weight) and cannot be unmerged.

Adapter files are those of peft's `save_pretrained` for LoRA: adapter_config.json and adapter_model.safetensors with
keys `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight` (peft drops the adapter name, "default").

Leaves out: LoRA on embeddings or convolutions, DoRA, trained biases, per-module rank/alpha patterns, several adapters
per model, models wrapped by DDP/torch.compile (unwrap first), and whole-model checkpoints (checkpoint.py).
"""

from __future__ import annotations

import json
import math
import os
import re
import uuid
from typing import Callable, Iterator, Sequence, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import safetensors_io
from .fsdp4bit import ShardableLinear4bit
from .linear4bit import Linear4bit

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."  # peft's PeftModel -> LoraModel -> the wrapped model
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# What an adapter can wrap: 16-bit, 4-bit, and a 4-bit layer loaded as one FSDP2 rank's rows (fsdp4bit.py)
BASE_TYPES = (nn.Linear, Linear4bit, ShardableLinear4bit)
Targets = Union[Sequence[str], str]  # names matched by suffix, or one regular expression over the whole name (peft)

# What peft writes to adapter_config.json for a plain LoRA, at its defaults: the fields of peft 0.7-0.8. peft before
# 0.10 raises TypeError on a field it does not know ("layer_replication" broke many adapters that way); later peft
# fills the fields missing here (use_dora, layer_replication, lora_bias, ...) with these same defaults and ignores
# unknown ones. peft_version is left out on purpose: peft fills in its own, and this file was not written by peft.
_PEFT_FIELDS = {
    "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": None, "bias": "none",
    "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "layers_pattern": None,
    "layers_to_transform": None, "loftq_config": {}, "megatron_config": None, "megatron_core": "megatron.core",
    "modules_to_save": None, "peft_type": "LORA", "rank_pattern": {}, "revision": None, "task_type": "CAUSAL_LM",
    "use_rslora": False,
}
# Config fields whose other values change what the adapter computes or which modules it covers: refused on load.
_ONLY_SUPPORTED = {
    "fan_in_fan_out": (None, False), "use_dora": (None, False), "bias": (None, "none"), "lora_bias": (None, False),
    "rank_pattern": (None, {}), "alpha_pattern": (None, {}), "modules_to_save": (None, []),
    "layers_to_transform": (None,), "layer_replication": (None,), "exclude_modules": (None, []),
    "trainable_token_indices": (None,), "target_parameters": (None, []), "use_qalora": (None, False),
    "alora_invocation_tokens": (None,),
}


class LoRALinear(nn.Module):
    """y = base(x) + s · lora_B(lora_A(dropout(x))), s = alpha / r (or alpha / √r with use_rslora).

    base_layer: the frozen nn.Linear or Linear4bit (in_features -> out_features). lora_A: nn.Linear(in, r), lora_B:
    nn.Linear(r, out), both without bias, in `dtype` (float32 by default, so small updates are not lost to bf16
    rounding) on the base's device. The adapter branch runs in that dtype; the sum is cast to the base's output dtype.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if not isinstance(base, BASE_TYPES):
            raise TypeError(f"LoRALinear wraps nn.Linear or Linear4bit, got {type(base).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.base_layer = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.dropout, self.use_rslora = r, alpha, dropout, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        device = base.weight.device
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        self.merged = False
        self.requantized = False  # merged back into 4 bits: the original weight is gone
        self._unmerged_base = None  # the Linear4bit a 16-bit merge replaced; not a submodule (not in state_dict)
        self.group = None  # a lora_fused.LoRAGroup: the fast branch (set_lora_path); None runs forward below
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # U(±1/√in), nn.Linear's default
        nn.init.zeros_(self.lora_B.weight)  # ΔW = 0 at the start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.group is not None and not self.merged and not torch.is_grad_enabled():
            self.group.start(self, x)  # decoding on a GPU: x·Aᵀ alongside the base matmul (lora_fused.py)
        y = self.base_layer(x)  # (..., out) in the base's output dtype
        if self.merged:
            return y
        if self.group is not None:
            return self.group.forward(self, x, y)
        h = self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype)))  # (..., r)
        return (y + self.lora_B(h) * self.scaling).to(y.dtype)  # (..., out)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s · B A, (out, in), in float32 or wider: a bf16 product would round twice and is slow on CPUs."""
        dt = torch.promote_types(self.lora_A.weight.dtype, torch.float32)
        return (self.lora_B.weight.to(dt) @ self.lora_A.weight.to(dt)) * self.scaling

    @torch.no_grad()
    def merge(self, requantize: bool = False) -> None:
        """Fold ΔW into the base weight; forward then runs the base alone. See the module docstring for Linear4bit."""
        if self.merged:
            raise RuntimeError("LoRALinear.merge(): already merged")
        base, delta = self.base_layer, self.delta_weight()
        if isinstance(base, ShardableLinear4bit):
            raise ValueError("merge() of an FSDP2-sharded 4-bit base is not supported: save the adapter and merge "
                             "in one process (minqlora merge)")
        if isinstance(base, nn.Linear):
            if requantize:
                raise ValueError("merge(requantize=True) applies to a Linear4bit base; this base is an nn.Linear")
            base.weight.copy_(base.weight.to(delta.dtype) + delta)  # one rounding to the weight dtype
        else:
            w = base.dequantize(torch.float32) + delta.float()  # (out, in), exact sum before the final rounding
            merged = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None, device="meta")
            merged.weight = nn.Parameter(w.to(base.weight_dtype), requires_grad=False)
            if base.bias is not None:
                merged.bias = nn.Parameter(base.bias.detach().clone(), requires_grad=False)
            if requantize:
                merged = Linear4bit.from_linear(merged, quant_type=base.quant_type, blocksize=base.blocksize,
                                                double_quant=base.weight_nested_absmax is not None,
                                                compute_dtype=base.compute_dtype)
                self.requantized = True
            else:
                object.__setattr__(self, "_unmerged_base", base)  # bypass nn.Module registration on purpose
            self.base_layer = merged
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge(): subtract ΔW from an nn.Linear (exact up to its rounding) or put the Linear4bit back."""
        if not self.merged:
            raise RuntimeError("LoRALinear.unmerge(): not merged")
        if self.requantized:
            raise RuntimeError("LoRALinear.unmerge(): this layer was merged with requantize=True, which rounded "
                               "W + ΔW to new 4-bit codes; the original weight is gone. Reload the base model.")
        if self._unmerged_base is not None:
            base = self._unmerged_base
            self._unmerged_base = None
            self.base_layer = base.to(self.base_layer.weight.device)
        else:
            w = self.base_layer.weight
            delta = self.delta_weight()
            w.copy_(w.to(delta.dtype) - delta)
        self.merged = False

    def extra_repr(self) -> str:
        return (f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, dropout={self.dropout}, "
                f"use_rslora={self.use_rslora}, merged={self.merged}")


# -- model surgery ------------------------------------------------------------------------------------------------

def _target_matches(name: str, targets: Targets) -> bool:
    """peft's rule: a regular expression matches the whole dotted name; a listed name matches itself or a suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _named_modules_outside_lora(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(dotted name, module) for every submodule, without descending into LoRALinear (its base_layer, lora_A...)."""
    for name, child in model.named_children():
        yield prefix + name, child
        if not isinstance(child, LoRALinear):
            yield from _named_modules_outside_lora(child, prefix + name + ".")


def match_targets(model: nn.Module, targets: Targets) -> dict[str, nn.Module]:
    """The modules `targets` select, by name (an existing LoRALinear counts as the layer it wraps). ValueError if a
    target selects nothing or selects a module that cannot carry an adapter."""
    is_names = isinstance(targets, (list, tuple, set, frozenset)) and all(isinstance(t, str) for t in targets)
    if not targets or not (isinstance(targets, str) or is_names):
        raise ValueError(f"targets must be a non-empty sequence of module names or one regular expression, got "
                         f"{targets!r}")
    named = list(_named_modules_outside_lora(model))
    found = {name: m for name, m in named if _target_matches(name, targets)}
    linear_names = sorted({n.rsplit(".", 1)[-1] for n, m in named if isinstance(m, BASE_TYPES)})
    if isinstance(targets, str):
        missing = [] if found else [targets]
    else:
        missing = [t for t in targets if not any(_target_matches(n, [t]) for n in found)]
    if missing:
        raise ValueError(f"LoRA targets {missing} match no module of {type(model).__name__}; its linear layers are "
                         f"named {linear_names}")
    for name, m in found.items():
        if not isinstance(m, (*BASE_TYPES, LoRALinear)):
            raise ValueError(f"LoRA target module '{name}' is a {type(m).__name__}; only nn.Linear and Linear4bit "
                             "can carry an adapter")
    return found


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def add_lora(model: nn.Module, r: int = 16, alpha: float = 32, dropout: float = 0.05,
             targets: Targets = DEFAULT_TARGETS, use_rslora: bool = False,
             dtype: torch.dtype = torch.float32) -> nn.Module:
    """Freeze every parameter of `model` and wrap each module `targets` selects in a LoRALinear, in place.

    A target name selects every module whose dotted name is it or ends in "." + it ("q_proj": every layer's q_proj;
    "layers.0.self_attn.q_proj": one); a single string is a regular expression over the whole name. Returns model.
    """
    if lora_modules(model):
        raise ValueError("the model already has LoRA adapters; merge_lora() them or start from a fresh model")
    found = match_targets(model, targets)
    model.requires_grad_(False)
    for name, m in found.items():
        # The model's train/eval mode, not the wrapped module's: a freshly swapped-in Linear4bit is in train mode.
        model.set_submodule(name, LoRALinear(m, r, alpha, dropout, use_rslora, dtype).train(model.training))
    return model


def merge_lora(model: nn.Module, requantize: bool = False) -> nn.Module:
    """Fold every LoRALinear into its base and put the plain module back in its place (see LoRALinear.merge).

    With a Linear4bit base the merged layer is a 16-bit nn.Linear, or 4-bit again with requantize=True (lossy).
    Layers merged already keep the merge they have. Returns the model (the merged base if `model` is a LoRALinear).
    """
    if isinstance(model, LoRALinear):
        if not model.merged:
            model.merge(requantize)
        return model.base_layer
    mods = lora_modules(model)
    if not mods:
        raise ValueError("merge_lora(): the model has no LoRA adapters")
    for name, m in mods.items():
        if not m.merged:
            m.merge(requantize)
        model.set_submodule(name, m.base_layer)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts; a Linear4bit's packed weight counts as out·in parameters, as peft counts
    bitsandbytes' Params4bit, so QLoRA percentages match peft's print_trainable_parameters."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, Linear4bit))
    return trainable, total


def trainable_summary(model: nn.Module, print_it: bool = True) -> str:
    """peft's line: "trainable params: T || all params: N || trainable%: P" (printed and returned)."""
    trainable, total = count_parameters(model)
    line = (f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}")
    if print_it:
        print(line)
    return line


# -- adapter files (PEFT format) ----------------------------------------------------------------------------------

def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter weights under peft's keys: base_model.model.<path>.lora_A.weight (r, in), .lora_B.weight (out, r)."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{KEY_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach()
        out[f"{KEY_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach()
    return out


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    """write(tmp) to a temporary name in path's directory, then rename over path: readers see old or new, whole.
    (Not tempfile.mkstemp: its files are mode 0600, and an adapter should get the usual umask permissions.)"""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        safetensors_io.honour_umask(tmp)  # safetensors writes its files 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def save_adapter(model: nn.Module, out_dir: str, base_model_name_or_path: str | None = None) -> str:
    """Write adapter_config.json and adapter_model.safetensors as peft does; returns out_dir.

    One r, alpha, dropout and rsLoRA flag must hold for all LoRA modules (PEFT's file has one of each);
    target_modules is the sorted set of the wrapped modules' last names.
    """
    mods = lora_modules(model)
    if not mods:
        raise ValueError("save_adapter(): the model has no LoRA adapters (call add_lora first)")
    hparams = {(m.r, m.alpha, m.dropout, m.use_rslora) for m in mods.values()}
    if len(hparams) > 1:
        raise ValueError(f"save_adapter(): LoRA modules differ in (r, alpha, dropout, use_rslora): {sorted(hparams)}; "
                         "PEFT's adapter_config.json holds one of each")
    r, alpha, dropout, use_rslora = hparams.pop()
    config = {**_PEFT_FIELDS, "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "use_rslora": use_rslora,
              "target_modules": sorted({name.rsplit(".", 1)[-1] for name in mods}),
              "base_model_name_or_path": base_model_name_or_path}
    tensors = {k: v.to("cpu").contiguous() for k, v in adapter_state_dict(model).items()}
    os.makedirs(out_dir, exist_ok=True)
    _atomic_write(os.path.join(out_dir, WEIGHTS_NAME), lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    text = json.dumps(config, indent=2, sort_keys=True)
    _atomic_write(os.path.join(out_dir, CONFIG_NAME), lambda p: _write_text(p, text))
    return out_dir


def read_adapter_config(adapter_dir: str) -> dict:
    """adapter_config.json, checked: a LoRA adapter whose fields minqlora implements. Errors name the file."""
    path = os.path.join(adapter_dir, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"adapter config not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(cfg).__name__}")
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type is {cfg.get('peft_type')!r}; only 'LORA' adapters are supported")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"{path}: r must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ValueError(f"{path}: lora_alpha must be a number, got {alpha!r}")
    dropout = cfg.setdefault("lora_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"{path}: lora_dropout must be a number in [0, 1), got {dropout!r}")
    if not isinstance(cfg.setdefault("use_rslora", False), bool):
        raise ValueError(f"{path}: use_rslora must be true or false, got {cfg['use_rslora']!r}")
    targets = cfg.get("target_modules")
    if not targets or not (isinstance(targets, str) or
                           (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        raise ValueError(f"{path}: target_modules must be a non-empty list of module names or a regular expression, "
                         f"got {targets!r}")
    for field, allowed in _ONLY_SUPPORTED.items():
        if cfg.get(field) not in allowed:
            raise ValueError(f"{path}: {field} = {cfg[field]!r} is not supported (minqlora implements plain LoRA: "
                             f"{field} must be one of {list(allowed)})")
    return cfg


def _check_config_matches(mods: dict[str, LoRALinear], found: dict[str, nn.Module], cfg: dict, path: str) -> None:
    """The model's existing LoRA modules must be the ones the config targets, with its r, alpha and scaling rule."""
    if set(found) != set(mods):
        raise ValueError(f"{path}: target_modules {cfg['target_modules']} do not select the model's LoRA modules: "
                         f"only in the adapter {sorted(set(found) - set(mods))[:4]}, only in the model "
                         f"{sorted(set(mods) - set(found))[:4]}")
    for name, m in mods.items():
        for field, ours in (("r", m.r), ("lora_alpha", m.alpha), ("use_rslora", m.use_rslora)):
            if cfg[field] != ours:
                raise ValueError(f"{path}: {field} is {cfg[field]!r} but the model's LoRA module '{name}' has "
                                 f"{ours!r}")


def load_adapter(model: nn.Module, adapter_dir: str) -> nn.Module:
    """Load a PEFT LoRA adapter into `model` (adding LoRA from the config first if it has none); returns model.

    Every key must be present with its shape and no other key may be: a mismatch raises ValueError naming the key
    and the file, before the model is changed. The dropout in the file is used only when LoRA is added here.
    """
    cfg = read_adapter_config(adapter_dir)
    config_path = os.path.join(adapter_dir, CONFIG_NAME)
    weights_path = os.path.join(adapter_dir, WEIGHTS_NAME)
    if not os.path.isfile(weights_path):
        if os.path.isfile(os.path.join(adapter_dir, "adapter_model.bin")):
            raise FileNotFoundError(f"adapter weights not found: {weights_path}; {adapter_dir} has only "
                                    "adapter_model.bin, a pickle, which minqlora never loads (unpickling runs code). "
                                    "Convert it to safetensors with peft first.")
        raise FileNotFoundError(f"adapter weights not found: {weights_path}")
    mods = lora_modules(model)
    if any(m.merged for m in mods.values()):
        raise ValueError("load_adapter(): the model's LoRA is merged into its weights; unmerge first")
    try:
        found = match_targets(model, cfg["target_modules"])
    except ValueError as e:
        raise ValueError(f"{config_path}: {e}") from None
    if mods:
        _check_config_matches(mods, found, cfg, config_path)
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights_path} is not a readable safetensors file: {e}") from None

    r = cfg["r"]
    shapes = {}  # key -> expected shape
    for name, m in found.items():
        shapes[f"{KEY_PREFIX}{name}.lora_A.weight"] = (r, m.in_features)
        shapes[f"{KEY_PREFIX}{name}.lora_B.weight"] = (m.out_features, r)
    missing, unexpected = sorted(set(shapes) - set(tensors)), sorted(set(tensors) - set(shapes))
    if missing or unexpected:
        raise ValueError(f"{weights_path} does not fit the model: {len(missing)} missing keys {missing[:4]}, "
                         f"{len(unexpected)} unexpected keys {unexpected[:4]}")
    for key, shape in shapes.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(f"{weights_path}: '{key}' has shape {list(tensors[key].shape)}, the model needs "
                             f"{list(shape)} (r = {r} from {config_path})")

    if not mods:
        add_lora(model, r=r, alpha=cfg["lora_alpha"], dropout=cfg["lora_dropout"], targets=cfg["target_modules"],
                 use_rslora=cfg["use_rslora"])
    with torch.no_grad():
        for key, p in adapter_state_dict(model).items():
            p.copy_(tensors[key])  # to the adapter's device and dtype
    return model
