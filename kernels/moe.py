"""MoE token permutation: group token copies by expert, and scatter expert outputs back.

`moe_permute(tokens (..., dim), expert_ids (..., top_k), num_experts)` returns
- permuted (n_tokens * top_k, dim): one copy of each token per chosen expert, rows grouped by
  expert in expert order; within an expert, copies keep token order (then top-k slot order),
- row_map (n_tokens, top_k) int64: the permuted row holding token t's copy for slot j,
- tokens_per_expert (num_experts,) int64: the group sizes (zeros for experts nobody chose),
  the split sizes for an expert-parallel all-to-all.
`moe_unpermute(expert_out (rows, dim), row_map, probs (..., top_k))` returns
out[t] = sum_j probs[t, j] * expert_out[row_map[t, j]], shaped probs.shape[:-1] + (dim,), in
expert_out's dtype (fp32 accumulation). Gradients flow to tokens, expert_out and probs.

The index bookkeeping (a stable sort of the flat expert ids, its inverse, the counts) is a few
integer torch ops in both backends; the Triton path moves the data with two kernels, one
program per row, looping over the feature dim:
- `_moe_scatter_kernel`, one program per (token, slot): dst[row_map[t, j]] = scale * src[t],
  optionally also dot[t, j] = <src[t], other[row_map[t, j]]>. Forward of permute (no scale),
  and backward of unpermute (d expert_out = probs * d out, d probs = <d out, expert_out>);
- `_moe_gather_sum_kernel`, one program per token: dst[t] = sum_j w[t, j] * src[row_map[t, j]].
  Forward of unpermute (w = probs), and backward of permute (w = 1).
Every permuted row is written by exactly one program, so no atomics are needed.
"""
from __future__ import annotations

import torch

from ._triton import kernel, next_pow2
from .dispatch import resolve

tl = None  # triton.language, bound at the first kernel launch (see _triton.kernel)

IMPLEMENTED = ("torch", "triton")


# ----------------------------------------------------------------------------- index bookkeeping


def moe_routing(expert_ids: torch.Tensor, num_experts: int):
    """(row_map (n_tokens, top_k), order, tokens_per_expert) for flat expert ids; `order[r]` is
    the flat (token * top_k + slot) index whose copy sits in permuted row r."""
    if expert_ids.dim() < 1:
        raise ValueError("expert_ids must be (..., top_k)")
    top_k = expert_ids.shape[-1]
    flat = expert_ids.reshape(-1).long()
    order = torch.sort(flat, stable=True).indices
    row_map = torch.empty_like(order)
    row_map[order] = torch.arange(order.numel(), device=order.device)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.index_add_(0, flat, torch.ones_like(flat))  # raises (CPU) / asserts (CUDA) on ids out of range
    return row_map.view(-1, top_k), order, counts


# ----------------------------------------------------------------------------- torch reference


def moe_permute_reference(tokens, expert_ids, num_experts: int):
    dim, top_k = tokens.shape[-1], expert_ids.shape[-1]
    row_map, order, counts = moe_routing(expert_ids, num_experts)
    permuted = tokens.reshape(-1, dim).index_select(0, order // top_k)
    return permuted, row_map, counts


def moe_unpermute_reference(expert_out, row_map, probs):
    top_k = row_map.shape[-1]
    rows = expert_out.index_select(0, row_map.reshape(-1)).view(-1, top_k, expert_out.shape[-1])
    out = (rows.float() * probs.reshape(-1, top_k, 1).float()).sum(1).to(expert_out.dtype)
    return out.view(*probs.shape[:-1], expert_out.shape[-1])


# ----------------------------------------------------------------------------- Triton kernels


@kernel
def _moe_scatter_kernel(SRC, ROW_MAP, SCALE, DST, OTHER, DOT, top_k, dim, stride_src, stride_dst, stride_other,
                        HAS_SCALE: tl.constexpr, HAS_DOT: tl.constexpr, BLOCK_D: tl.constexpr):
    slot = tl.program_id(0).to(tl.int64)
    t = slot // top_k
    r = tl.load(ROW_MAP + slot)
    scale = 1.0
    if HAS_SCALE:
        scale = tl.load(SCALE + slot).to(tl.float32)
    dot = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, dim, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        mask = cols < dim
        v = tl.load(SRC + t * stride_src + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_DOT:
            dot += v * tl.load(OTHER + r * stride_other + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DST + r * stride_dst + cols, (v * scale).to(DST.dtype.element_ty), mask=mask)
    if HAS_DOT:
        tl.store(DOT + slot, tl.sum(dot, axis=0).to(DOT.dtype.element_ty))


@kernel
def _moe_gather_sum_kernel(SRC, ROW_MAP, W, DST, top_k, dim, stride_src, stride_dst,
                           HAS_W: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    for start in range(0, dim, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        mask = cols < dim
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for j in range(0, top_k):
            r = tl.load(ROW_MAP + t * top_k + j)
            v = tl.load(SRC + r * stride_src + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_W:
                v = v * tl.load(W + t * top_k + j).to(tl.float32)
            acc += v
        tl.store(DST + t * stride_dst + cols, acc.to(DST.dtype.element_ty), mask=mask)


def _block_d(dim: int) -> int:
    return min(1024, next_pow2(dim))


def _scatter(src, row_map, n_rows_out, out_dtype, scale=None, other=None):
    """dst[row_map[t, j]] = scale[t, j] * src[t] (rows not in row_map are zero); with `other`,
    also returns dot[t, j] = <src[t], other[row_map[t, j]]> in scale's dtype."""
    n_slots, top_k = row_map.numel(), row_map.shape[-1]
    dim = src.shape[-1]
    alloc = torch.empty if n_rows_out == n_slots else torch.zeros  # unreferenced rows stay zero
    dst = alloc((n_rows_out, dim), dtype=out_dtype, device=src.device)
    dot = torch.empty(n_slots, dtype=scale.dtype, device=src.device) if other is not None else None
    if n_slots and dim:
        _moe_scatter_kernel[(n_slots,)](
            src, row_map, scale if scale is not None else src, dst, other if other is not None else src,
            dot if dot is not None else dst, top_k, dim, src.stride(0), dst.stride(0),
            other.stride(0) if other is not None else 0,
            HAS_SCALE=scale is not None, HAS_DOT=other is not None, BLOCK_D=_block_d(dim))
    elif dot is not None:
        dot.zero_()
    return dst, dot


def _gather_sum(src, row_map, out_dtype, w=None):
    """dst[t] = sum_j w[t, j] * src[row_map[t, j]]."""
    n_tokens, top_k = row_map.shape
    dim = src.shape[-1]
    dst = torch.empty((n_tokens, dim), dtype=out_dtype, device=src.device)
    if n_tokens and dim:
        _moe_gather_sum_kernel[(n_tokens,)](
            src, row_map, w if w is not None else src, dst, top_k, dim, src.stride(0), dst.stride(0),
            HAS_W=w is not None, BLOCK_D=_block_d(dim))
    return dst


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _MoePermuteTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens2, row_map):
        ctx.save_for_backward(row_map)
        permuted, _ = _scatter(tokens2, row_map, row_map.numel(), tokens2.dtype)
        return permuted

    @staticmethod
    def backward(ctx, d_permuted):
        (row_map,) = ctx.saved_tensors
        return _gather_sum(_rows(d_permuted), row_map, d_permuted.dtype), None


class _MoeUnpermuteTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, expert_out, row_map, probs2):
        ctx.save_for_backward(expert_out, row_map, probs2)
        return _gather_sum(expert_out, row_map, expert_out.dtype, probs2)

    @staticmethod
    def backward(ctx, d_out):
        expert_out, row_map, probs2 = ctx.saved_tensors
        need_eo, _, need_probs = ctx.needs_input_grad
        d_eo, d_probs = _scatter(_rows(d_out), row_map, expert_out.shape[0], expert_out.dtype, scale=probs2,
                                 other=expert_out if need_probs else None)
        return (d_eo if need_eo else None), None, (d_probs.view(probs2.shape) if need_probs else None)


def moe_permute(tokens, expert_ids, num_experts: int, *, backend: str | None = None):
    """Copies of tokens grouped by expert: (permuted, row_map, tokens_per_expert)."""
    if tokens.shape[:-1] != expert_ids.shape[:-1]:
        raise ValueError(f"tokens {tuple(tokens.shape)} and expert_ids {tuple(expert_ids.shape)} disagree on tokens")
    if resolve(backend, tokens.device.type, IMPLEMENTED) == "torch":
        return moe_permute_reference(tokens, expert_ids, num_experts)
    row_map, _, counts = moe_routing(expert_ids, num_experts)
    tokens2 = _rows(tokens.reshape(-1, tokens.shape[-1]))
    return _MoePermuteTriton.apply(tokens2, row_map), row_map, counts


def moe_unpermute(expert_out, row_map, probs, *, backend: str | None = None):
    """Sum of each token's expert outputs weighted by its router probabilities."""
    if probs.shape[-1] != row_map.shape[-1] or probs.numel() != row_map.numel():
        raise ValueError(f"probs {tuple(probs.shape)} does not match row_map {tuple(row_map.shape)}")
    if resolve(backend, expert_out.device.type, IMPLEMENTED) == "torch":
        return moe_unpermute_reference(expert_out, row_map, probs)
    top_k = row_map.shape[-1]
    out = _MoeUnpermuteTriton.apply(_rows(expert_out), row_map.reshape(-1, top_k).contiguous(),
                                    probs.reshape(-1, top_k).contiguous())
    return out.view(*probs.shape[:-1], expert_out.shape[-1])
