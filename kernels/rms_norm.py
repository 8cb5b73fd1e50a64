"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight.

Triton path: one program normalises a tile of rows (statistics in fp32), multiplying by the
weight in the same pass. The backward recomputes x_hat from the saved input and per-row 1/rms:
    dx = rstd * (dy*w - x_hat * mean(dy*w * x_hat))
    dw = sum over rows of dy * x_hat                          (per-program partials, summed)
"""
from __future__ import annotations

import torch

from ._triton import cdiv, kernel, next_pow2, num_warps_for
from .dispatch import resolve

tl = None  # triton.language, bound at the first kernel launch (see _triton.kernel)

IMPLEMENTED = ("torch", "triton")


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Plain torch; statistics in fp32 whatever the input dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


# ----------------------------------------------------------------------------- Triton kernels


@kernel
def _rms_norm_fwd_kernel(X, W, Y, RSTD, n_rows, n_cols, stride_x, stride_y, eps,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < n_rows
    mask = rmask[:, None] & (cols[None, :] < n_cols)
    rows64 = rows.to(tl.int64)
    xf = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=1) / n_cols + eps)
    y = xf * rstd[:, None] * w[None, :]
    tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@kernel
def _rms_norm_bwd_kernel(DY, X, W, RSTD, DX, DW_PART, n_rows, n_cols, stride_dy, stride_x, stride_dx,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILES_PER_PROGRAM: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < n_cols
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    for t in range(TILES_PER_PROGRAM):
        rows = (pid * TILES_PER_PROGRAM + t) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < n_rows
        mask = rmask[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        x_hat = x * rstd[:, None]
        dyw = dy * w[None, :]
        c = tl.sum(dyw * x_hat, axis=1) / n_cols
        dx = (dyw - x_hat * c[:, None]) * rstd[:, None]
        tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * x_hat, axis=0)
    tl.store(DW_PART + pid * n_cols + cols, dw, mask=cmask)


def _tiles(n_cols: int):
    block_n = next_pow2(n_cols)
    block_m = max(1, min(16, 4096 // block_n))  # ~4096 elements a tile
    return block_m, block_n


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


class _RMSNormTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        shape, n_cols = x.shape, x.shape[-1]
        if weight.shape != (n_cols,):
            raise ValueError(f"weight shape {tuple(weight.shape)} does not match the last dim {n_cols}")
        x2 = _rows(x)
        n_rows = x2.shape[0]
        weight = weight.contiguous()
        y2 = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block_m, block_n = _tiles(n_cols)
        if n_rows:
            _rms_norm_fwd_kernel[(cdiv(n_rows, block_m),)](
                x2, weight, y2, rstd, n_rows, n_cols, x2.stride(0), y2.stride(0), float(eps),
                BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps_for(block_m * block_n))
        ctx.save_for_backward(x2, weight, rstd)
        return y2.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = _rows(dy)
        dx2 = torch.empty((n_rows, n_cols), dtype=x2.dtype, device=x2.device)
        block_m, block_n = _tiles(n_cols)
        n_tiles = cdiv(n_rows, block_m)
        tiles_per_program = max(1, cdiv(n_tiles, 256))  # bounded dw partials
        n_programs = cdiv(n_tiles, tiles_per_program)
        dw_part = torch.empty((n_programs, n_cols), dtype=torch.float32, device=x2.device)
        if n_rows:
            _rms_norm_bwd_kernel[(n_programs,)](
                dy2, x2, weight, rstd, dx2, dw_part, n_rows, n_cols, dy2.stride(0), x2.stride(0), dx2.stride(0),
                BLOCK_M=block_m, BLOCK_N=block_n, TILES_PER_PROGRAM=tiles_per_program,
                num_warps=num_warps_for(block_m * block_n))
        dx = dx2.view(dy.shape) if ctx.needs_input_grad[0] else None
        dw = dw_part.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx, dw, None


def rms_norm(x, weight, eps: float = 1e-6, *, backend: str | None = None):
    """Normalise the last dim of x (output in x's dtype)."""
    if resolve(backend, x.device.type, IMPLEMENTED) == "triton":
        return _RMSNormTriton.apply(x, weight, eps)
    return rms_norm_reference(x, weight, eps)
