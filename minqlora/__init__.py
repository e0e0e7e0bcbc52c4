"""minqlora: QLoRA written out in full. The public API (DESIGN.md §4) and nothing else."""

from .ops import dequantize_4bit, dequantize_blockwise_8bit, gemm_4bit, quantize_4bit, quantize_blockwise_8bit
from .quant import DYNAMIC_SIGNED, DYNAMIC_UNSIGNED, FP4_TABLE, NF4_TABLE, QuantState

__all__ = [
    "quantize_4bit", "dequantize_4bit", "quantize_blockwise_8bit", "dequantize_blockwise_8bit", "gemm_4bit",
    "QuantState", "NF4_TABLE", "FP4_TABLE", "DYNAMIC_SIGNED", "DYNAMIC_UNSIGNED",
]
