"""Model checkpoints on disk: load a Llama from a Hugging Face directory, a bitsandbytes 4-bit ("bnb-4bit") directory
or a GGUF file; save a Llama as a Hugging Face checkpoint, 16-bit or 4-bit in bitsandbytes' format.

Loading never holds the whole 16-bit model (DESIGN.md §2): the model is built on the meta device, then one group of
tensors at a time (the embedding, each decoder layer, the final norm and the head) is read, moved to the target
device, quantized into Linear4bit where asked, and freed. Safetensors files are memory-mapped and opened per group,
so their pages are released too. Peak memory is the 4-bit model plus about one 16-bit layer.
Weights come from safetensors and GGUF only: pickle files (.bin, .pt) are refused, never unpickled.
Every file is written to a temporary name and renamed.

Leaves out: GGUF parsing and export (gguf_io.py), PEFT adapter files (lora.py), tokenizers (tokenizer.py).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm import tqdm

from . import ops, quant, safetensors_io
from .linear4bit import Linear4bit
from .model import Llama, LlamaConfig
from .quant import QuantState

try:
    from . import gguf_io  # needs the optional `gguf` package (extra [gguf]); only GGUF files use it
except ModuleNotFoundError as e:
    if e.name != "gguf":
        raise
    gguf_io = None

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # quantized by default
SAFE_SINGLE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BNB_STATE = re.compile(r"^(.*\.weight)\.quant_state\.bitsandbytes__(nf4|fp4)$")
IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")  # the rope buffer old transformers versions saved; recomputed


def _refuse_pickle(files, where) -> None:
    raise ValueError(f"{where}: weights only in pickle files ({', '.join(sorted(files))}). minqlora never unpickles: "
                     "loading a pickle runs whatever code the file carries. Convert the checkpoint to safetensors "
                     "(in an environment you trust) and load that.")


class SafetensorsDir:
    """The tensors of a Hugging Face checkpoint directory: model.safetensors, or the shards listed in
    model.safetensors.index.json. Headers are read up front (shapes, dtypes); data only in `read`."""

    def __init__(self, root: Path):
        self.root = root
        index = root / SAFE_INDEX
        weight_map = None
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
            files, self.origin = sorted(set(weight_map.values())), index
        elif (root / SAFE_SINGLE).is_file():
            files, self.origin = [SAFE_SINGLE], root / SAFE_SINGLE
        else:
            pickles = [p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES]
            if pickles:
                _refuse_pickle(pickles, root)
            raise FileNotFoundError(f"{root}: no weights (expected {SAFE_SINGLE} or {SAFE_INDEX})")
        self.file_of, self.shapes, self.dtypes = {}, {}, {}
        for name in files:
            path = root / name
            if not path.is_file():
                raise FileNotFoundError(f"{path}: listed in {SAFE_INDEX} but missing")
            try:
                with safe_open(path, "pt") as f:
                    for k in f.keys():
                        sl = f.get_slice(k)
                        self.shapes[k], self.dtypes[k], self.file_of[k] = tuple(sl.get_shape()), sl.get_dtype(), path
            except SafetensorError as e:
                raise ValueError(f"{path}: not a valid safetensors file (truncated or corrupt?): {e}") from None
        for k, name in (weight_map or {}).items():
            if k not in self.file_of or self.file_of[k].name != name:
                raise ValueError(f"{index}: lists '{k}' in {name}, which does not hold it")

    def where(self, key: str) -> str:
        """The file holding `key`, or for a missing key the file that should list it."""
        return str(self.file_of.get(key, self.origin))

    def read(self, names, convert) -> dict[str, torch.Tensor]:
        """{name: convert(name, tensor)}; each file is opened (mapped) once and closed before returning."""
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.file_of[n], []).append(n)
        out = {}
        for path, keys in by_file.items():
            try:
                with safe_open(path, "pt") as f:
                    for k in keys:
                        out[k] = convert(k, f.get_tensor(k))
            except SafetensorError as e:
                raise ValueError(f"{path}: cannot read tensors {keys[:3]}: {e}") from None
        return out


class _GGUFSource:
    """gguf_io.GGUFCheckpoint behind the same interface as SafetensorsDir."""

    def __init__(self, ckpt: gguf_io.GGUFCheckpoint):
        self.ckpt, self.shapes, self.dtypes, self.read = ckpt, ckpt.shapes, ckpt.dtypes, ckpt.read

    def where(self, key: str) -> str:
        return f"{self.ckpt.path} (tensor '{gguf_io.gguf_name(key)}')"


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _check_quantization_config(q, where) -> None:
    if q is None:
        return
    method = q.get("quant_method")
    if method != "bitsandbytes":
        raise ValueError(f"{where}: quantization_config.quant_method {method!r} is not supported (only bitsandbytes)")
    if q.get("load_in_8bit") or q.get("_load_in_8bit"):
        raise ValueError(f"{where}: a bitsandbytes 8-bit checkpoint (load_in_8bit) is not supported, only 4-bit")
    if not (q.get("load_in_4bit") or q.get("_load_in_4bit")):
        raise ValueError(f"{where}: quantization_config has neither load_in_4bit nor load_in_8bit")


def _open(path: Path):
    """(source, config) for an HF/bnb directory or a GGUF file (or a directory holding exactly one GGUF)."""
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            _refuse_pickle([path.name], path.parent)
        if _is_gguf(path):
            if gguf_io is None:
                raise ImportError(f"{path}: reading GGUF files needs the gguf package (pip install 'minqlora[gguf]')")
            ckpt = gguf_io.GGUFCheckpoint(path)
            return _GGUFSource(ckpt), ckpt.config
        raise ValueError(f"{path}: neither a GGUF file nor a checkpoint directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _open(ggufs[0])
        raise FileNotFoundError(f"{path}: no config.json (a Hugging Face checkpoint directory needs one)")
    try:
        d = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file}: invalid JSON: {e}") from None
    _check_quantization_config(d.get("quantization_config"), config_file)
    try:
        config = LlamaConfig.from_hf(d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{config_file}: {e}") from None
    return SafetensorsDir(path), config


def _groups(model: Llama):
    """Leaf modules with parameters, grouped: the embedding, each decoder layer, then the final norm and head."""
    groups: dict[str, list] = {}
    for name, module in model.named_modules():
        if next(module.parameters(recurse=False), None) is None:
            continue
        if name == "lm_head" and model.config.tie_word_embeddings:
            continue  # shares embed_tokens.weight; re-tied at the end
        key = ".".join(name.split(".")[:3]) if name.startswith("model.layers.") else name
        groups.setdefault(key, []).append((name, module))
    return list(groups.values())


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def _install(m: nn.Module, name: str, kind: str, tensors: dict, source, *, quantize, double_quant, blocksize,
             compute_dtype, dtype, quant_storage, shard=None) -> nn.Module:
    """Put the tensors read for module `name` in place. Returns `m` with its parameters replaced ("plain"), or the
    module that replaces it: a Linear4bit ("quantize", "bnb"), or an nn.Linear dequantized from bnb bytes."""
    if kind == "plain":
        for p, old in list(m.named_parameters(recurse=False)):
            m._parameters[p] = nn.Parameter(tensors[f"{name}.{p}"], requires_grad=old.requires_grad)
        return m
    w, bias = f"{name}.weight", tensors.get(f"{name}.bias")
    bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
    if kind == "quantize" and shard is not None:
        from . import fsdp4bit  # torch.distributed only where it is used
        try:
            packed = fsdp4bit.quantize_rows(tensors[w], m.out_features, shard, blocksize, quantize, double_quant)
        except ValueError as e:
            raise ValueError(f"{source.where(w)}: '{w}': {e}") from None
        return fsdp4bit.ShardableLinear4bit(weight=packed, compute_dtype=compute_dtype, bias=bias)
    try:
        if kind == "quantize":
            packed, state = ops.quantize_4bit(tensors[w], blocksize, quantize, double_quant,
                                              quant_storage=quant_storage)
        else:  # the stored bytes in their stored dtype (uint8, or a float quant_storage view)
            state, packed = QuantState.from_bnb_dict(tensors, w), tensors[w]
        new = Linear4bit(m.in_features, m.out_features, bias=bias is not None, quant_type=state.quant_type,
                         blocksize=state.blocksize, double_quant=state.nested, compute_dtype=compute_dtype,
                         weight_dtype=state.dtype, device="meta")
        new.set_quantized(packed, state)
    except (KeyError, ValueError) as e:  # NaN/Inf weights, inconsistent bnb state, a shape against the config
        raise ValueError(f"{source.where(w)}: '{w}': {e}") from None
    if bias is not None:
        new.bias = bias
    if kind == "bnb" and quantize is None:
        lin = nn.Linear(m.in_features, m.out_features, bias=bias is not None, device="meta")
        lin.weight = nn.Parameter(new.dequantize(dtype))
        if bias is not None:
            lin.bias = nn.Parameter(bias.detach(), requires_grad=True)
        return lin
    return new


def native_dtype(device) -> torch.dtype:
    """The 16/32-bit dtype to run a model in on `device`: bfloat16 on GPUs and on CPUs whose oneDNN has native
    bf16 matmuls (AVX-512-BF16, AMX); float32 on other CPUs, where torch emulates bf16 matmuls about 20x slower
    than float32 (measured on an AVX2-only 2-core AMD EPYC: a (512x1536)(1536x576) product took 1.14 s in bf16,
    0.056 s in float32)."""
    device = torch.device(device)
    if device.type != "cpu":
        return torch.bfloat16
    native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return torch.bfloat16 if native else torch.float32


def load_pretrained(path, quantize: str | None = "nf4", double_quant: bool = True, blocksize: int = 64,
                    device="cpu", dtype: torch.dtype | None = torch.bfloat16,
                    compute_dtype: torch.dtype | None = None, progress: bool = False,
                    quant_storage: torch.dtype = torch.uint8, shard=None) -> Llama:
    """A Llama from an HF directory (config.json + safetensors, sharded or not), a bnb-4bit directory, or a GGUF file.

    quantize: "nf4"/"fp4" turns the seven projections of every decoder layer into Linear4bit (embedding, norms and
    lm_head stay in `dtype`); None keeps them 16-bit. A pre-quantized bitsandbytes checkpoint keeps its stored
    4-bit bytes whatever quantize names (re-quantizing 4-bit values would only add error); quantize=None
    dequantizes it. dtype: of the non-quantized weights and of the weights before quantizing (None: the
    checkpoint's torch_dtype). compute_dtype: the Linear4bit matmul dtype (default: dtype). progress: a tqdm bar
    over the tensor groups (for the CLI). quant_storage: the dtype newly quantized weights hold their packed bytes
    as (uint8, or a bfloat16/float16/float32 view as FSDP-era bitsandbytes checkpoints store them); pre-quantized
    weights keep the dtype they were stored in. shard: a fsdp4bit.RowShard (FSDP2 ranks, Parallel.row_shard):
    each projection to quantize is read and quantized for this rank's rows only, as a partial
    fsdp4bit.ShardableLinear4bit that only Parallel.wrap(model) under --parallel fsdp2 makes usable; host memory
    and quantizing work per rank are then 1/world of a projection (pre-quantized checkpoints load whole).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if quantize is not None:
        quant.check_quant_type(quantize)
        quant.check_blocksize(blocksize)
        quant.check_quant_storage(quant_storage)
    source, config = _open(path)
    dtype = dtype or DTYPES.get(str(config.torch_dtype)) or torch.bfloat16
    compute_dtype = compute_dtype or dtype
    with torch.device("meta"):
        model = Llama(config)
    keys = set(source.shapes)
    # Pre-quantized Linears: "<module>.weight" -> its bnb state keys ("<module>.weight.absmax", ...).
    bnb_parts: dict[str, list[str]] = {m.group(1): [] for k in keys if (m := BNB_STATE.match(k))}
    for k in keys:
        base = k.split(".weight.", 1)[0] + ".weight"
        if base in bnb_parts and k.startswith(base + "."):
            bnb_parts[base].append(k)
    used: set[str] = set()

    def need(key: str, shape) -> str:
        if key not in keys:
            raise ValueError(f"{source.where(key)}: missing tensor '{key}' (the config implies it)")
        if shape is not None and tuple(source.shapes[key]) != tuple(shape):
            raise ValueError(f"{source.where(key)}: '{key}' has shape {list(source.shapes[key])}, the config implies "
                             f"{list(shape)}")
        used.add(key)
        return key

    for group in tqdm(_groups(model), desc=f"loading {path.name}", unit="group", disable=not progress):
        plan, to_read, raw, rows = [], [], set(), {}
        for name, m in group:
            w = f"{name}.weight"
            if w in bnb_parts:  # pre-quantized: packed bytes and state tensors are read as stored
                kind, names = "bnb", [need(w, None), *(need(k, None) for k in bnb_parts[w])]
                raw.update(names)
            elif quantize and isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in PROJECTIONS:
                kind, names = "quantize", [need(w, m.weight.shape)]
                if shard is not None:
                    rows[w] = shard.rows(m.out_features, m.in_features, blocksize, name)
            else:
                kind, names = "plain", []
            names += [need(f"{name}.{p}", t.shape) for p, t in m.named_parameters(recurse=False)
                      if kind == "plain" or p != "weight"]
            plan.append((name, m, kind))
            to_read += names

        def convert(key, t):
            if key in raw:
                return t.to(device, copy=True)  # bnb buffers keep their dtypes: bytes, not values
            if not t.is_floating_point():
                raise ValueError(f"{source.where(key)}: '{key}' has dtype {t.dtype}, expected a floating-point weight")
            if key in rows:
                t = t[rows[key]]  # this rank's rows: only their pages of the memory map are read
            return t.to(device, dtype, copy=True)  # a copy: never alias the memory map

        tensors = source.read(to_read, convert)  # one group of 16-bit tensors in memory at a time
        for name, m, kind in plan:
            new = _install(m, name, kind, tensors, source, quantize=quantize, double_quant=double_quant,
                           blocksize=blocksize, compute_dtype=compute_dtype, dtype=dtype, quant_storage=quant_storage,
                           shard=shard)
            if new is not m:
                _swap(model, name, new)
        del tensors
    unused = sorted(k for k in keys - used if not IGNORED.match(k) and not (
        config.tie_word_embeddings and k.startswith("lm_head.")))
    if unused:
        raise ValueError(f"{source.where(unused[0])}: tensors a Llama with this config has no place for: "
                         f"{unused[:8]}{' ...' if len(unused) > 8 else ''}")
    model.tie_weights()
    model.init_rope(device)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not left, f"not loaded: {left}"
    return model


def _from_pretrained(cls, path, **kwargs) -> Llama:
    """Llama.from_pretrained(path, quantize="nf4", device=..., ...): see checkpoint.load_pretrained."""
    return load_pretrained(path, **kwargs)


# model.py knows nothing of files (DESIGN.md §1); the public spelling Llama.from_pretrained is attached here.
Llama.from_pretrained = classmethod(_from_pretrained)


# -- saving -------------------------------------------------------------------------------------------------------

def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "5GB" (10^9, as Hugging Face counts), "500MiB" (2^20) or "100KB"."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size {size!r} is not a size like '5GB' or '500MiB'")
    power = "KMGT".find(m.group(2).upper()) + 1 if m.group(2) else 0
    return int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)


def _bnb_quantization_config(model: Llama) -> dict | None:
    """The quantization_config transformers writes for a bitsandbytes 4-bit model, or None if nothing is 4-bit."""
    lins = [m for m in model.modules() if isinstance(m, Linear4bit)]
    if not lins:
        return None
    kinds = {(m.quant_type, m.weight_nested_absmax is not None, m.compute_dtype, m.quant_storage) for m in lins}
    if len(kinds) > 1:
        raise ValueError(f"the 4-bit layers mix settings {sorted(map(str, kinds))}; bitsandbytes' config has one")
    quant_type, nested, compute_dtype, storage = kinds.pop()
    # Linear modules left in 16-bit (lm_head at least) must not be turned into 4-bit by transformers on loading.
    skip = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return {"quant_method": "bitsandbytes", "_load_in_4bit": True, "_load_in_8bit": False, "load_in_4bit": True,
            "load_in_8bit": False, "bnb_4bit_quant_type": quant_type, "bnb_4bit_use_double_quant": nested,
            "bnb_4bit_compute_dtype": str(compute_dtype).removeprefix("torch."), "bnb_4bit_quant_storage": str(storage).removeprefix("torch."),
            "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
            "llm_int8_skip_modules": skip or None, "llm_int8_threshold": 6.0}


def _write_atomic(path: Path, write) -> Path:
    """write(tmp_path), then the caller renames; returns the temporary path (removed if writing fails)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def save_pretrained(model: Llama, out_dir, max_shard_size: int | str = "5GB") -> Path:
    """Save as a Hugging Face checkpoint: config.json + model.safetensors, or shards of at most max_shard_size
    with model.safetensors.index.json. A model with Linear4bit layers is saved in bitsandbytes' format (bnb keys,
    quantization_config), which transformers + bitsandbytes load; otherwise the weights are saved as they are.
    Files are written under temporary names and renamed; weight files of an earlier save are removed."""
    limit = parse_size(max_shard_size)
    sd = model.state_dict()  # Linear4bit contributes bitsandbytes' keys (bnb-format.md §4)
    if any(".lora_" in k for k in sd):
        raise ValueError("the model has LoRA adapters: merge them (merge_lora) to save a merged checkpoint, or save "
                         "the adapter alone (save_adapter)")
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # HF drops the tied copy; safetensors refuses shared tensors anyway
    # A 4-bit weight and its state keys stay in one shard so each shard's Linear4bit loads on its own.
    groups: dict[str, list[str]] = {}
    for k in sd:
        groups.setdefault(k.split(".weight.", 1)[0] + ".weight" if ".weight." in k else k, []).append(k)
    shards, size = [[]], 0
    for keys in groups.values():
        nbytes = sum(sd[k].numel() * sd[k].element_size() for k in keys)
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1] += keys
        size += nbytes
    n = len(shards)
    names = [SAFE_SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    config = model.config.to_hf()
    dtype = str(model.model.embed_tokens.weight.dtype).removeprefix("torch.")
    config["torch_dtype"] = config["dtype"] = dtype  # transformers 4.x reads the first, 5.x the second
    if (q := _bnb_quantization_config(model)) is not None:
        config["quantization_config"] = q

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pending = []  # (tmp, final)
    try:
        for name, keys in zip(names, shards):
            # One shard at a time on the CPU, copied out of the model (never a view of a live buffer).
            tensors = {k: sd[k].detach().to("cpu", copy=True).contiguous() for k in keys}
            pending.append((_write_atomic(out / name,
                                          lambda p: safetensors_io.save(tensors, p, metadata={"format": "pt"})),
                            out / name))
            del tensors
        if n > 1:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in sd.values())},
                     "weight_map": {k: name for name, keys in zip(names, shards) for k in keys}}
            pending.append((_write_atomic(out / SAFE_INDEX, lambda p: p.write_text(json.dumps(index, indent=2))),
                            out / SAFE_INDEX))
        pending.append((_write_atomic(out / "config.json", lambda p: p.write_text(json.dumps(config, indent=2))),
                        out / "config.json"))
    except BaseException:
        for tmp, _ in pending:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, final in pending:
        os.replace(tmp, final)
    keep = {final.name for _, final in pending}
    for old in [*out.glob("model*.safetensors"), out / SAFE_INDEX, out / SAFE_SINGLE]:
        if old.name not in keep and old.exists():
            old.unlink()
    return out
