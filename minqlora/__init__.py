"""minqlora: QLoRA written out in full. The public API (DESIGN.md §4) and nothing else."""

from . import checkpoint as _checkpoint  # attaches Llama.from_pretrained
from .checkpoint import load_pretrained, save_pretrained
from .generate import GenerationConfig, generate, stream_text
from .linear4bit import Linear4bit
from .lora import LoRALinear, add_lora, load_adapter, merge_lora, save_adapter, trainable_summary
from .model import KVCache, Llama, LlamaConfig
from .ops import dequantize_4bit, dequantize_blockwise_8bit, gemm_4bit, quantize_4bit, quantize_blockwise_8bit
from .optim import PagedAdamW
from .sft import TrainConfig, train
from .quant import DYNAMIC_SIGNED, DYNAMIC_UNSIGNED, FP4_TABLE, NF4_TABLE, QuantState
from .tokenizer import Tokenizer

__all__ = [
    "quantize_4bit", "dequantize_4bit", "quantize_blockwise_8bit", "dequantize_blockwise_8bit", "gemm_4bit",
    "QuantState", "NF4_TABLE", "FP4_TABLE", "DYNAMIC_SIGNED", "DYNAMIC_UNSIGNED",
    "Linear4bit", "LoRALinear", "add_lora", "merge_lora", "save_adapter", "load_adapter", "trainable_summary",
    "Llama", "LlamaConfig", "KVCache", "load_pretrained", "save_pretrained",
    "GenerationConfig", "generate", "stream_text", "Tokenizer", "PagedAdamW", "TrainConfig", "train",
]

# GGUF export needs the optional `gguf` package (extra [gguf]); without it, loading GGUF files says what to install.
if _checkpoint.gguf_io is not None:
    export_gguf = _checkpoint.gguf_io.export_gguf
    __all__.append("export_gguf")
