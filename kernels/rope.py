"""Rotary position embedding applied to q and k (rotate-half convention).

The rotation pairs element i with element i + head_dim / 2 of each head, as transformers'
Llama does, so HF q/k projections load without a permutation (Meta's original and
TorchTitan's interleaved layout pair 2i with 2i + 1 and need one; dist_train/interop).

q: (batch, q_heads, seq, head_dim), k: (batch, kv_heads, seq, head_dim) — the head counts
may differ (GQA). cos/sin: (seq, head_dim // 2), from `rope_tables`, or one table per batch
row, (batch, 1, seq, head_dim // 2): the tables gathered at per-row positions, e.g. positions
that restart at every packed document (`rope_tables(...)[0][positions][:, None]`).

Triton path: one program rotates a block of positions of one (batch, head), reading the two
halves of each head vector through the input's strides (so q/k may be views such as the
transposed output of a projection) and writing a contiguous result in the input dtype, with
fp32 math. The rotation is orthogonal, so the backward is the same kernel rotating the
incoming gradient by the opposite angle (sin negated). cos/sin are treated as constants
(no gradient).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._triton import cdiv, kernel, next_pow2
from .dispatch import resolve

tl = None  # triton.language, bound at the first kernel launch (see _triton.kernel)

IMPLEMENTED = ("torch", "triton")


@dataclass(frozen=True)
class Llama3Scaling:
    """Llama 3.1's frequency-dependent RoPE scaling (every Llama 3.x checkpoint uses it):
    rotations slower than `original_max_len / low_freq_factor` positions per turn are
    slowed down by `factor`, those faster than `original_max_len / high_freq_factor` are
    kept, and the band between is interpolated linearly in original_max_len / wavelength."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_len: int = 8192

    def apply(self, inv_freq: torch.Tensor) -> torch.Tensor:
        wavelen = 2 * math.pi / inv_freq
        slow = wavelen > self.original_max_len / self.low_freq_factor
        fast = wavelen < self.original_max_len / self.high_freq_factor
        smooth = (self.original_max_len / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
        between = (1 - smooth) * inv_freq / self.factor + smooth * inv_freq
        return torch.where(fast, inv_freq, torch.where(slow, inv_freq / self.factor, between))


def rope_tables(seq_len: int, head_dim: int, theta: float = 10000.0, device=None,
                scaling: Llama3Scaling | None = None):
    """cos and sin of position x inverse frequency, (seq_len, head_dim // 2), fp32;
    `scaling` rescales the inverse frequencies first (Llama 3's rope_type "llama3")."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    if scaling is not None:
        inv_freq = scaling.apply(inv_freq)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


def apply_rope_reference(q, k, cos, sin):
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


@kernel
def _rope_kernel(X, COS, SIN, Y, n_heads, seq, half, stride_xb, stride_xh, stride_xs, stride_cb, stride_cs,
                 INVERSE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    pos = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = tl.arange(0, BLOCK_D)
    mask = (pos[:, None] < seq) & (cols[None, :] < half)
    pos64 = pos.to(tl.int64)
    cs = b * stride_cb + pos64[:, None] * stride_cs + cols[None, :]
    c = tl.load(COS + cs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(SIN + cs, mask=mask, other=0.0).to(tl.float32)
    if INVERSE:
        s = -s
    x_ptr = X + b * stride_xb + h * stride_xh + pos64[:, None] * stride_xs + cols[None, :]
    x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + half, mask=mask, other=0.0).to(tl.float32)
    y_ptr = Y + bh.to(tl.int64) * seq * 2 * half + pos64[:, None] * 2 * half + cols[None, :]
    tl.store(y_ptr, (x1 * c - x2 * s).to(Y.dtype.element_ty), mask=mask)
    tl.store(y_ptr + half, (x2 * c + x1 * s).to(Y.dtype.element_ty), mask=mask)


def _rope_launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    """Rotate x (batch, heads, seq, head_dim) by the tables, (seq, half) or (batch, seq, half);
    returns a contiguous tensor."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    b, h, s, d = x.shape
    y = torch.empty((b, h, s, d), dtype=x.dtype, device=x.device)
    if y.numel():
        half = d // 2
        block_d = next_pow2(half)
        block_s = max(1, min(64, 2048 // block_d))
        _rope_kernel[(b * h, cdiv(s, block_s))](
            x, cos, sin, y, h, s, half, x.stride(0), x.stride(1), x.stride(2),
            cos.stride(0) if cos.dim() == 3 else 0, cos.stride(-2),
            INVERSE=inverse, BLOCK_S=block_s, BLOCK_D=block_d)
    return y


class _RopeTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        ctx.set_materialize_grads(False)
        return _rope_launch(q, cos, sin, False), _rope_launch(k, cos, sin, False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq = _rope_launch(dq, cos, sin, True) if dq is not None and ctx.needs_input_grad[0] else None
        dk = _rope_launch(dk, cos, sin, True) if dk is not None and ctx.needs_input_grad[1] else None
        return dq, dk, None, None


def _check(q, k, cos, sin):
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be (batch, heads, seq, head_dim), got {tuple(q.shape)} and {tuple(k.shape)}")
    b, _, s, d = q.shape
    if d % 2 or k.shape[0] != b or k.shape[2] != s or k.shape[3] != d:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch/seq/head_dim or head_dim is odd")
    half = d // 2
    if cos.dim() == 4:  # one table per batch row: (batch, 1, seq, half)
        if tuple(cos.shape) != (b, 1, s, half) or tuple(sin.shape) != (b, 1, s, half):
            raise ValueError(f"per-row cos/sin must be (batch={b}, 1, seq={s}, head_dim/2={half}), got "
                             f"{tuple(cos.shape)} and {tuple(sin.shape)}")
        return cos.reshape(b, s, half).contiguous(), sin.reshape(b, s, half).contiguous()
    cos2, sin2 = cos.reshape(-1, cos.shape[-1]), sin.reshape(-1, sin.shape[-1])
    if cos2.shape != (s, half) or sin2.shape != (s, half):
        raise ValueError(f"cos/sin must be (seq={s}, head_dim/2={half}), got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if cos2.stride(-1) != 1 or sin2.stride(-1) != 1 or cos2.stride(0) != sin2.stride(0):
        cos2, sin2 = cos2.contiguous(), sin2.contiguous()
    return cos2, sin2


def apply_rope(q, k, cos, sin, *, backend: str | None = None):
    """Rotate q and k by position; returns new tensors (q_rot, k_rot)."""
    if resolve(backend, q.device.type, IMPLEMENTED) == "triton":
        cos2, sin2 = _check(q, k, cos, sin)
        return _RopeTriton.apply(q, k, cos2.detach(), sin2.detach())
    return apply_rope_reference(q, k, cos, sin)
