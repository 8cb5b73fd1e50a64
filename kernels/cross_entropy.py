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
"""
from __future__ import annotations

import torch

from .dispatch import resolve

IMPLEMENTED = ("torch",)

_CHUNK_ELEMENTS = 1 << 23  # logits per chunk: 32 MiB in fp32


def default_chunk_size(n_tokens: int, vocab: int) -> int:
    return max(1, min(n_tokens, _CHUNK_ELEMENTS // max(vocab, 1)))


def _chunk_nll(logits, target, label_smoothing):
    """Per-token loss of one chunk of fp32 logits, and its log-sum-exp."""
    lse = torch.logsumexp(logits, dim=-1)
    nll = lse - logits.gather(1, target[:, None]).squeeze(1)
    if label_smoothing:
        nll = (1 - label_smoothing) * nll + label_smoothing * (lse - logits.mean(dim=-1))
    return nll, lse


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, target, ignore_index, label_smoothing, chunk_size):
        n, vocab = x.shape[0], weight.shape[0]
        acc = torch.promote_types(x.dtype, torch.float32)  # fp32 statistics, fp64 kept for tests
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        valid = target != ignore_index
        denom = valid.sum().clamp(min=1).to(acc)
        safe_target = torch.where(valid, target, torch.zeros_like(target))
        loss_sum = torch.zeros((), dtype=acc, device=x.device)
        grad_x = torch.empty_like(x) if need_dx else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=x.device) if need_dw else None
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            xc, tc, vc = x[start:end], safe_target[start:end], valid[start:end]
            logits = (xc @ weight.t()).to(acc)
            nll, lse = _chunk_nll(logits, tc, label_smoothing)
            loss_sum += (nll * vc).sum()
            if not (need_dx or need_dw):
                continue
            grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            grad[torch.arange(end - start, device=x.device), tc] -= 1 - label_smoothing
            if label_smoothing:
                grad -= label_smoothing / vocab
            grad *= (vc.to(acc) / denom)[:, None]
            if need_dx:
                grad_x[start:end] = (grad @ weight.to(acc)).to(x.dtype)
            if need_dw:
                grad_w.addmm_(grad.t(), xc.to(acc))
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_x, grad_w)
        return loss_sum / denom

    @staticmethod
    def backward(ctx, grad_out):
        grad_x, grad_w = ctx.saved_tensors
        dx = grad_x * grad_out.to(grad_x.dtype) if grad_x is not None else None
        dw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return dx, dw, None, None, None, None


def linear_cross_entropy_reference(x, weight, target, ignore_index=-100, label_smoothing=0.0, chunk_size=None):
    """Chunked torch implementation; x (..., dim), weight (vocab, dim), target (...)."""
    x2 = x.reshape(-1, x.shape[-1])
    t = target.reshape(-1)
    if t.shape[0] != x2.shape[0]:
        raise ValueError(f"target has {t.shape[0]} tokens but x has {x2.shape[0]}")
    chunk = chunk_size or default_chunk_size(x2.shape[0], weight.shape[0])
    return _ChunkedLinearCrossEntropy.apply(x2, weight, t, ignore_index, float(label_smoothing), chunk)


def linear_cross_entropy(x, weight, target, ignore_index: int = -100, label_smoothing: float = 0.0,
                         *, chunk_size: int | None = None, backend: str | None = None):
    """Mean cross-entropy of (x @ weight.T) against target without materialising the logits."""
    resolve(backend, x.device.type, IMPLEMENTED)
    return linear_cross_entropy_reference(x, weight, target, ignore_index, label_smoothing, chunk_size)
