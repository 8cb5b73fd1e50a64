"""SwiGLU activation: silu(gate) * up, the gated MLP non-linearity of Llama-style models.

Triton path: one elementwise pass forward over (rows, cols) tiles — gate and up may
be strided views such as the two halves of one fused projection — with fp32 math and the
output in the input dtype, and one backward that recomputes sigmoid(gate) instead of saving it:
    d_up   = dy * silu(g)
    d_gate = dy * up * s * (1 + g * (1 - s)),   s = sigmoid(g)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import cdiv, kernel, next_pow2
from .dispatch import resolve

tl = None  # triton.language, bound at the first kernel launch (see _triton.kernel)

IMPLEMENTED = ("torch", "triton")


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


@kernel
def _swiglu_fwd_kernel(G, U, Y, n_rows, n_cols, stride_g, stride_u, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(Y + rows[:, None] * n_cols + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@kernel
def _swiglu_bwd_kernel(DY, G, U, DG, DU, n_rows, n_cols, stride_g, stride_u,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    out = rows[:, None] * n_cols + cols[None, :]
    dy = tl.load(DY + out, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    tl.store(DU + out, (dy * g * s).to(DU.dtype.element_ty), mask=mask)
    tl.store(DG + out, (dy * u * s * (1.0 + g * (1.0 - s))).to(DG.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A (rows, cols) view with unit column stride; rows may be strided (e.g. halves of one
    fused gate/up projection), copied only when no such view exists."""
    t2 = t.reshape(-1, t.shape[-1]) if t.dim() else t.reshape(1, 1)
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] == 1 else t2.contiguous()


def _grid(n_rows: int, n_cols: int):
    block_n = min(1024, next_pow2(n_cols))
    block_m = max(1, 1024 // block_n)
    return (cdiv(n_rows, block_m), cdiv(n_cols, block_n)), block_m, block_n


class _SwiGLUTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        if gate.shape != up.shape:
            raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
        g2, u2 = _rows(gate), _rows(up)
        n_rows, n_cols = g2.shape
        y = torch.empty(gate.shape, dtype=torch.result_type(gate, up), device=gate.device)
        if y.numel():
            grid, bm, bn = _grid(n_rows, n_cols)
            _swiglu_fwd_kernel[grid](g2, u2, y, n_rows, n_cols, g2.stride(0), u2.stride(0), BLOCK_M=bm, BLOCK_N=bn)
        ctx.save_for_backward(g2, u2)
        ctx.shape_dtypes = (gate.shape, gate.dtype, up.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        g2, u2 = ctx.saved_tensors
        shape, g_dtype, u_dtype = ctx.shape_dtypes
        n_rows, n_cols = g2.shape
        dy = dy.contiguous()
        dg = torch.empty(shape, dtype=g_dtype, device=dy.device)
        du = torch.empty(shape, dtype=u_dtype, device=dy.device)
        if dy.numel():
            grid, bm, bn = _grid(n_rows, n_cols)
            _swiglu_bwd_kernel[grid](dy, g2, u2, dg, du, n_rows, n_cols, g2.stride(0), u2.stride(0),
                                     BLOCK_M=bm, BLOCK_N=bn)
        return dg, du


def swiglu(gate, up, *, backend: str | None = None):
    if resolve(backend, gate.device.type, IMPLEMENTED) == "triton":
        return _SwiGLUTriton.apply(gate, up)
    return swiglu_reference(gate, up)
