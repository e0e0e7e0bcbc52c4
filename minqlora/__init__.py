"""minqlora: QLoRA written out in full. The public API (DESIGN.md §4) and nothing else.

The names are resolved on first use (PEP 562 module __getattr__): `import minqlora` alone does not import torch,
so the command line answers `minqlora --help` without the 2-13 s that importing torch takes on this project's 2-core
machines. `mq.quantize_4bit` (or any name below) imports its module, and with it torch and the compiled ops.
"""

import importlib
import importlib.util
import sys
import types

# public name -> the module that defines it. Llama comes through checkpoint.py, which attaches Llama.from_pretrained.
_API = {
    "quantize_4bit": "ops", "dequantize_4bit": "ops", "quantize_blockwise_8bit": "ops",
    "dequantize_blockwise_8bit": "ops", "gemm_4bit": "ops",
    "QuantState": "quant", "NF4_TABLE": "quant", "FP4_TABLE": "quant", "DYNAMIC_SIGNED": "quant",
    "DYNAMIC_UNSIGNED": "quant",
    "Linear4bit": "linear4bit", "LoRALinear": "lora", "add_lora": "lora", "merge_lora": "lora",
    "save_adapter": "lora", "load_adapter": "lora", "trainable_summary": "lora",
    "Llama": "checkpoint", "LlamaConfig": "checkpoint", "KVCache": "model", "load_pretrained": "checkpoint",
    "save_pretrained": "checkpoint",
    "GenerationConfig": "generate", "generate": "generate", "stream_text": "generate", "Tokenizer": "tokenizer",
    "PagedAdamW": "optim", "TrainConfig": "sft", "train": "sft",
}
# GGUF export needs the optional `gguf` package (extra [gguf]); without it, loading GGUF files says what to install.
if importlib.util.find_spec("gguf") is not None:
    _API["export_gguf"] = "gguf_io"

__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)  # minqlora.quant etc. without importing it first
    else:
        raise AttributeError(f"module 'minqlora' has no attribute {name!r}")
    globals()[name] = value  # resolved once
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Importing the submodule minqlora.generate binds it as an attribute of the package; the public name
    `generate` is the function (as the eager `from .generate import generate` had it), so that binding is skipped."""

    def __setattr__(self, name, value):
        if not (name in _API and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
