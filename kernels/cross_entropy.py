"""Fused linear + cross-entropy: the head matmul and the loss, chunked over tokens.

The full (tokens x vocab) logits are never materialised: each chunk of tokens computes its
logits, its loss and, in the same pass, its gradient with respect to the input and the
weight (softmax minus target, scaled by the mean's divisor). Backward then only scales the
stored gradients by the incoming gradient. Peak memory is one chunk of logits plus one
input-sized and one weight-sized gradient, instead of two full logit tensors. The torch
reference is chunked too, so CPU runs get the saving.

Semantics match `F.cross_entropy(x @ weight.T, target, ignore_index=..., label_smoothing=...)`
with reduction "mean" over non-ignored tokens; when every token is ignored the loss is 0
(not NaN) so gradient accumulation over a fully padded micro-batch stays finite.

Per chunk, the loss needs four per-row statistics of the logits z: the max m, the sum of
exp(z - m), the target's logit z_t and (for label smoothing) the sum of z. Then
    lse  = m + log(sum exp(z - m))
    loss = lse - (1 - ls) * z_t - ls * sum(z) / V
    dz   = (softmax(z) - (1 - ls) * onehot(t) - ls / V) * valid / n_valid
The Triton path computes the statistics with one kernel (an online max / sum-exp over vocab
blocks, one program per row) and overwrites the chunk's logits with dz with a second, with
torch matmuls around them (the logits chunk and dz stay in the input dtype, statistics in
fp32). Splitting at the statistics is what makes the vocab-parallel variant cheap: with the
vocab sharded over a tensor-parallel group, each rank computes its shard's statistics, the
max is all-reduced (MAX) and the rescaled sum-exp, target logit and logit sum are
all-reduced (SUM) in one call, and each rank writes dz for its own shard — 2 small
collectives per chunk, never a logits-sized one.
"""
from __future__ import annotations

import torch

from ._triton import kernel, next_pow2, num_warps_for
from .dispatch import interpreting, resolve

tl = None  # triton.language, bound at the first kernel launch (see _triton.kernel)

IMPLEMENTED = ("torch", "triton")

_CHUNK_ELEMENTS = 1 << 23  # logits per chunk: 32 MiB in fp32


def default_chunk_size(n_tokens: int, vocab: int) -> int:
    return max(1, min(n_tokens, _CHUNK_ELEMENTS // max(vocab, 1)))


# ----------------------------------------------------------------------------- Triton kernels


@kernel
def _ce_stats_kernel(LOGITS, TARGET, M, SUMEXP, ZT, ZSUM, n_cols, stride, vocab_start, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride
    t = tl.load(TARGET + row) - vocab_start  # outside [0, n_cols) when another shard holds it
    m = float("-inf")
    s = 0.0
    zt = 0.0
    zsum = 0.0
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n_cols
        z = tl.load(base + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))  # finite: column 0 is in the first block
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
        zt += tl.sum(tl.where(mask & (cols == t), z, 0.0), axis=0)
        zsum += tl.sum(tl.where(mask, z, 0.0), axis=0)
    tl.store(M + row, m)
    tl.store(SUMEXP + row, s)
    tl.store(ZT + row, zt)
    tl.store(ZSUM + row, zsum)


@kernel
def _ce_grad_kernel(LOGITS, TARGET, LSE, SCALE, n_cols, stride, vocab_start, target_coef, uniform_coef,
                    BLOCK_V: tl.constexpr):
    """Overwrite one row of logits with (softmax - target_coef * onehot - uniform_coef) * scale."""
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride
    t = tl.load(TARGET + row) - vocab_start
    lse = tl.load(LSE + row)
    scale = tl.load(SCALE + row)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n_cols
        z = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.exp(z - lse) - uniform_coef
        g = tl.where(cols == t, g - target_coef, g) * scale
        tl.store(base + cols, g.to(LOGITS.dtype.element_ty), mask=mask)


def _block_v(n_cols: int) -> int:
    return min(next_pow2(n_cols), 1024 if interpreting() else 4096)


# ----------------------------------------------------------------------------- one chunk


def _combine(m, sumexp, zt, zsum, label_smoothing, vocab_total, group):
    """Global lse and per-row loss from per-row statistics (of this vocab shard under `group`)."""
    if group is not None:
        import torch.distributed as dist

        gm = m.clone()
        dist.all_reduce(gm, op=dist.ReduceOp.MAX, group=group)
        parts = [sumexp * torch.exp(m - gm), zt] + ([zsum] if label_smoothing else [])
        packed = torch.stack(parts)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        m, sumexp, zt = gm, packed[0], packed[1]
        if label_smoothing:
            zsum = packed[2]
    lse = m + torch.log(sumexp)
    loss = lse - (1.0 - label_smoothing) * zt
    if label_smoothing:
        loss = loss - label_smoothing / vocab_total * zsum
    return lse, loss


def _chunk_torch(logits, target, scale, vocab_start, label_smoothing, vocab_total, group, want_grad):
    """Per-row loss of one chunk and, when asked, its logits gradient (in place of the logits,
    which the caller made fp32 or fp64)."""
    z = logits
    n_rows, n_cols = z.shape
    local = target - vocab_start
    in_shard = (local >= 0) & (local < n_cols)
    local = local.clamp(0, n_cols - 1)
    zt = torch.where(in_shard, z.gather(1, local[:, None]).squeeze(1), torch.zeros((), dtype=z.dtype, device=z.device))
    zsum = z.sum(1) if label_smoothing else None
    m = z.amax(1)
    e = z.sub_(m[:, None]).exp_()  # exp(z - m), in place
    lse, loss = _combine(m, e.sum(1), zt, zsum, label_smoothing, vocab_total, group)
    if not want_grad:
        return loss, None
    e.mul_(torch.exp(m - lse)[:, None])  # softmax
    rows = torch.arange(n_rows, device=z.device)[in_shard]
    e[rows, local[in_shard]] -= 1.0 - label_smoothing
    if label_smoothing:
        e -= label_smoothing / vocab_total
    e *= scale[:, None]
    return loss, e


def _chunk_triton(logits, target, scale, vocab_start, label_smoothing, vocab_total, group, want_grad):
    """As `_chunk_torch`; the gradient overwrites `logits` (kept in its dtype)."""
    n_rows, n_cols = logits.shape
    stats = torch.empty((4, n_rows), dtype=torch.float32, device=logits.device)
    block_v = _block_v(n_cols)
    _ce_stats_kernel[(n_rows,)](logits, target, stats[0], stats[1], stats[2], stats[3], n_cols, logits.stride(0),
                                vocab_start, BLOCK_V=block_v, num_warps=num_warps_for(block_v))
    lse, loss = _combine(stats[0], stats[1], stats[2], stats[3], label_smoothing, vocab_total, group)
    if not want_grad:
        return loss, None
    lse = lse.contiguous()
    _ce_grad_kernel[(n_rows,)](logits, target, lse, scale, n_cols, logits.stride(0), vocab_start,
                               1.0 - label_smoothing, label_smoothing / vocab_total, BLOCK_V=block_v,
                               num_warps=num_warps_for(block_v))
    return loss, logits


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, target, ignore_index, label_smoothing, chunk_size, impl, group, vocab_start,
                vocab_total, reduce_grad_input):
        n = x.shape[0]
        acc = torch.promote_types(x.dtype, torch.float32)  # fp32 statistics, fp64 kept for tests
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        valid = target != ignore_index
        denom = valid.sum().clamp(min=1).to(acc)
        scale = (valid.to(acc) / denom).to(torch.float32 if impl == "triton" else acc)
        target = target.contiguous()
        chunk_fn = _chunk_triton if impl == "triton" else _chunk_torch
        # the torch path keeps logits and their gradient in fp32 (CPU: bf16 matmuls are slow
        # and imprecise); the Triton path keeps them in the input dtype and upcasts in-kernel
        logit_dtype = x.dtype if impl == "triton" else acc
        loss_sum = torch.zeros((), dtype=acc, device=x.device)
        grad_x = torch.empty_like(x) if need_dx else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=x.device) if need_dw else None
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            xc = x[start:end]
            logits = (xc @ weight.t()).to(logit_dtype)
            loss, grad = chunk_fn(logits, target[start:end], scale[start:end], vocab_start, label_smoothing,
                                  vocab_total, group, need_dx or need_dw)
            loss_sum += (loss.to(acc) * valid[start:end]).sum()
            if need_dx:
                grad_x[start:end] = grad.to(weight.dtype) @ weight
            if need_dw:
                if grad.dtype == acc and xc.dtype == acc:
                    grad_w.addmm_(grad.t(), xc)
                else:  # bf16 product accumulated into the fp32 gradient (one weight-sized temporary)
                    grad_w.add_(grad.t().to(xc.dtype) @ xc)
        if need_dx and group is not None and reduce_grad_input:
            import torch.distributed as dist

            dist.all_reduce(grad_x, op=dist.ReduceOp.SUM, group=group)  # sum over the vocab shards
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_x, grad_w)
        return loss_sum / denom

    @staticmethod
    def backward(ctx, grad_out):
        grad_x, grad_w = ctx.saved_tensors
        dx = grad_x * grad_out.to(grad_x.dtype) if grad_x is not None else None
        dw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return dx, dw, None, None, None, None, None, None, None, None, None


def _flatten(x, target, vocab: int | None, ignore_index: int):
    x2 = x.reshape(-1, x.shape[-1])
    t = target.reshape(-1).long()
    if t.shape[0] != x2.shape[0]:
        raise ValueError(f"target has {t.shape[0]} tokens but x has {x2.shape[0]}")
    # an out-of-range target would silently count as a zero logit; checked where it costs no
    # device synchronisation (CPU), left to the caller on CUDA
    if vocab is not None and t.device.type == "cpu" and t.numel():
        bad = (t != ignore_index) & ((t < 0) | (t >= vocab))
        if bad.any():
            raise ValueError(f"target id {int(t[bad][0])} is outside the vocabulary [0, {vocab})")
    return x2, t


def linear_cross_entropy_reference(x, weight, target, ignore_index=-100, label_smoothing=0.0, chunk_size=None):
    """Chunked torch implementation; x (..., dim), weight (vocab, dim), target (...)."""
    x2, t = _flatten(x, target, weight.shape[0], ignore_index)
    chunk = chunk_size or default_chunk_size(x2.shape[0], weight.shape[0])
    return _LinearCrossEntropy.apply(x2, weight, t, ignore_index, float(label_smoothing), chunk, "torch", None, 0,
                                     weight.shape[0], False)


def linear_cross_entropy(x, weight, target, ignore_index: int = -100, label_smoothing: float = 0.0,
                         *, chunk_size: int | None = None, backend: str | None = None):
    """Mean cross-entropy of (x @ weight.T) against target without materialising the logits."""
    if resolve(backend, x.device.type, IMPLEMENTED) == "torch":
        return linear_cross_entropy_reference(x, weight, target, ignore_index, label_smoothing, chunk_size)
    x2, t = _flatten(x, target, weight.shape[0], ignore_index)
    chunk = chunk_size or default_chunk_size(x2.shape[0], weight.shape[0])
    return _LinearCrossEntropy.apply(x2, weight, t, ignore_index, float(label_smoothing), chunk, "triton", None, 0,
                                     weight.shape[0], False)


def vocab_parallel_linear_cross_entropy(x, weight_shard, target, group, vocab_start: int,
                                        ignore_index: int = -100, label_smoothing: float = 0.0, *,
                                        vocab_size: int | None = None, chunk_size: int | None = None,
                                        reduce_grad_input: bool = True, backend: str | None = None):
    """`linear_cross_entropy` with the vocab sharded over the process group `group`.

    This rank holds rows [vocab_start, vocab_start + weight_shard.shape[0]) of the head weight;
    x and target (global token ids) are the same on every rank of `group`. Every rank returns
    the same loss (that of the full vocabulary). weight_shard's gradient is this shard's slice
    of the full weight gradient. x's gradient is the full one (summed over the shards by an
    all-reduce) when `reduce_grad_input`; pass False when the caller reduces it itself (e.g. a
    Megatron-style copy-to-tensor-parallel-region op in front of the head).

    vocab_size: the full vocabulary; all-reduced from the shard sizes when None. Shards may be
    uneven. All ranks must pass the same chunk_size (the default is the same everywhere): each
    chunk issues two small all-reduces, in the same order on every rank.
    """
    if group is None:
        raise ValueError("vocab_parallel_linear_cross_entropy needs the tensor-parallel process group")
    import torch.distributed as dist

    impl = resolve(backend, x.device.type, IMPLEMENTED)
    world = dist.get_world_size(group)
    if vocab_size is None:
        total = torch.tensor([weight_shard.shape[0]], dtype=torch.int64, device=x.device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        vocab_size = int(total.item())
    x2, t = _flatten(x, target, vocab_size, ignore_index)
    # chunk from the mean shard size, the same on every rank whatever this shard's size
    chunk = chunk_size or default_chunk_size(x2.shape[0], -(-vocab_size // world))
    return _LinearCrossEntropy.apply(x2, weight_shard, t, ignore_index, float(label_smoothing), chunk, impl, group,
                                     int(vocab_start), vocab_size, bool(reduce_grad_input))
