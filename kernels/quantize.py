"""Per-block int8 quantisation for DiLoCo's pseudo-gradient exchange.

A flat fp32 vector is cut into blocks of `BLOCK` (256) elements; each block keeps one fp32
scale, its absolute maximum / 127, and its elements as round(x / scale) in int8 (round
half up: floor(x / scale + 0.5), the same rule on both paths, so they agree bit for bit).
Payload: 1 byte per element plus 4 per block, 0.2539 of fp32. Why absmax per block rather
than one codebook for the whole tensor: PRIME's INTELLECT-1 exchange clips at +-3 sigma of
the tensor and loses 28% (relative L2) of a Student-t(3) pseudo-gradient, while a block's
own maximum bounds every element's error by half its step (measured here: 0.7% Gaussian,
1.8% Student-t(3); tests/test_kernel_quantize.py). Dequantisation is q x scale; sums of
dequantised blocks are taken in fp32 by the caller.

Triton path: one program quantises (or dequantises) `BLOCKS_PER_PROGRAM` blocks; lengths
that are not a multiple of BLOCK are masked (the tail block's scale covers its real
elements only). Without a GPU the torch reference runs.
"""
from __future__ import annotations

import torch

from ._triton import cdiv, kernel
from .dispatch import resolve

tl = None  # triton.language, bound at the first kernel launch (see _triton.kernel)

IMPLEMENTED = ("torch", "triton")
BLOCK = 256
_BLOCKS_PER_PROGRAM = 4


def quantize_int8_reference(x: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [n], scales fp32 [ceil(n / block)]) of a 1-D tensor."""
    x = x.reshape(-1).float()
    n = x.numel()
    n_blocks = cdiv(n, block)
    padded = torch.zeros(n_blocks * block, dtype=torch.float32, device=x.device)
    padded[:n] = x
    blocks = padded.view(n_blocks, block)
    absmax = blocks.abs().amax(dim=1)
    scale = absmax / 127.0
    inv = torch.where(absmax > 0, 127.0 / absmax, torch.zeros_like(absmax))
    q = torch.floor(blocks * inv[:, None] + 0.5).clamp_(-127, 127).to(torch.int8)
    return q.view(-1)[:n].contiguous(), scale


def dequantize_int8_reference(q: torch.Tensor, scales: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    n = q.numel()
    idx = torch.arange(n, device=q.device) // block
    return q.float() * scales[idx]


@kernel
def _quantize_kernel(X, Q, S, n, BLOCK: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr):
    for i in range(BLOCKS_PER_PROGRAM):
        b = tl.program_id(0) * BLOCKS_PER_PROGRAM + i
        offs = b.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        absmax = tl.max(tl.abs(x), axis=0)
        inv = tl.where(absmax > 0, 127.0 / absmax, 0.0)
        q = tl.floor(x * inv + 0.5)
        q = tl.minimum(tl.maximum(q, -127.0), 127.0)
        tl.store(Q + offs, q.to(tl.int8), mask=mask)
        tl.store(S + b, absmax / 127.0, mask=b * BLOCK < n)


@kernel
def _dequantize_kernel(Q, S, X, n, BLOCK: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr):
    for i in range(BLOCKS_PER_PROGRAM):
        b = tl.program_id(0) * BLOCKS_PER_PROGRAM + i
        offs = b.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        q = tl.load(Q + offs, mask=mask, other=0).to(tl.float32)
        s = tl.load(S + b, mask=b * BLOCK < n, other=0.0)
        tl.store(X + offs, q * s, mask=mask)


def quantize_int8(x: torch.Tensor, *, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax int8 of a tensor, flattened: (q int8 [n], scales fp32 [ceil(n / 256)])."""
    if resolve(backend, x.device.type, IMPLEMENTED) != "triton":
        return quantize_int8_reference(x)
    x = x.reshape(-1).float().contiguous()
    n = x.numel()
    q = torch.empty(n, dtype=torch.int8, device=x.device)
    scales = torch.empty(cdiv(n, BLOCK), dtype=torch.float32, device=x.device)
    if n:
        _quantize_kernel[(cdiv(scales.numel(), _BLOCKS_PER_PROGRAM),)](
            x, q, scales, n, BLOCK=BLOCK, BLOCKS_PER_PROGRAM=_BLOCKS_PER_PROGRAM)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """fp32 values of `quantize_int8`'s output."""
    if resolve(backend, q.device.type, IMPLEMENTED) != "triton":
        return dequantize_int8_reference(q, scales)
    q = q.reshape(-1).contiguous()
    n = q.numel()
    out = torch.empty(n, dtype=torch.float32, device=q.device)
    if n:
        _dequantize_kernel[(cdiv(scales.numel(), _BLOCKS_PER_PROGRAM),)](
            q, scales.contiguous(), out, n, BLOCK=BLOCK, BLOCKS_PER_PROGRAM=_BLOCKS_PER_PROGRAM)
    return out
