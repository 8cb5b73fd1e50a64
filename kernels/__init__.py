"""Fused kernels for the core layers, one file per op (kernel, torch reference, wrapper).

Each op takes `backend=None | "auto" | "torch" | "triton"`; None means the configured
default (`[kernels] backend`, see `set_default_backend`).
"""
from .attention import document_bounds, document_ids, flash_attention, flash_attention_reference
from .cross_entropy import (
    linear_cross_entropy,
    linear_cross_entropy_reference,
    vocab_parallel_linear_cross_entropy,
)
from .dispatch import BACKENDS, KernelBackendError, default_backend, set_default_backend
from .moe import moe_permute, moe_permute_reference, moe_unpermute, moe_unpermute_reference
from .quantize import dequantize_int8, dequantize_int8_reference, quantize_int8, quantize_int8_reference
from .rms_norm import rms_norm, rms_norm_reference
from .rope import Llama3Scaling, apply_rope, apply_rope_reference, rope_tables
from .swiglu import swiglu, swiglu_reference

__all__ = [
    "BACKENDS", "KernelBackendError", "default_backend", "set_default_backend",
    "rms_norm", "rms_norm_reference", "swiglu", "swiglu_reference",
    "Llama3Scaling", "apply_rope", "apply_rope_reference", "rope_tables",
    "flash_attention", "flash_attention_reference", "document_ids", "document_bounds",
    "linear_cross_entropy", "linear_cross_entropy_reference", "vocab_parallel_linear_cross_entropy",
    "moe_permute", "moe_permute_reference", "moe_unpermute", "moe_unpermute_reference",
    "quantize_int8", "quantize_int8_reference", "dequantize_int8", "dequantize_int8_reference",
]
