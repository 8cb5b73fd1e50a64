"""Causal attention with grouped-query heads.

q: (batch, heads, seq, head_dim); k, v: (batch, kv_heads, seq, head_dim) where kv_heads
divides heads. The torch path is `F.scaled_dot_product_attention` (flash/memory-efficient
kernels where torch has them for the device).

Triton path: FlashAttention-2 (Dao, 2023) in three kernels.
- forward: one program per (block of query rows, batch x head) walks the key/value blocks
  (up to the diagonal when causal) with an online softmax — running row max m and sum l,
  accumulator rescaled by exp(m_old - m_new) — and writes O and the row log-sum-exp
  L = m + log(l) (fp32), the only statistic the backward needs;
- backward, per the paper's Algorithm 2 split in two to avoid atomics: D = rowsum(dO * O)
  (a small kernel); then one program per (key block, batch x kv head) recomputes
  P = exp(S - L) for every query block of every query head sharing that kv head (GQA),
  accumulating dV += P^T dO and dK += dS^T Q with dS = P * (dP - D), dP = dO V^T — so
  grouped heads' gradients are summed in registers; and one program per (query block,
  batch x head) accumulates dQ += dS K.
Sequence lengths need not be multiples of the blocks, head_dim need not be a power of two
(both masked). Causal masking is top-left aligned (key j visible to query i iff j <= i), as in
`scaled_dot_product_attention(is_causal=True)`.

Document masking (packed sequences): `doc_ids`, int (batch, seq), gives every position the
index of the document it belongs to; query i then sees key j only if doc_ids[i] == doc_ids[j]
(and j <= i when causal), so attention is block-diagonal over the documents. Document ids,
not cumulative lengths, because they shard and split like the tokens do: a micro-batch is a
slice of rows, a pipeline passes them to every stage as they are, and under tensor
parallelism every rank holds the whole rows. Each document must be one contiguous run of
positions (ids non-decreasing along the sequence, as packing gives; checked), self-attention
only (seq_q = seq_k). The kernels skip whole blocks outside the documents: from each
position's document start and end (`document_bounds`), a query block starts its key loop at
the first key of its first row's document and stops after its last row's document; a key
block walks only the query rows of its documents. A key block inside the loop may still be
all masked for some rows; those rows' running max stays -inf and is read as 0 for that block
(only with doc_ids: without them the causal diagonal makes every row's first block finite).
`document_ids(tokens, eos_id)` builds the ids of EOS-delimited packing (a document's EOS
token belongs to it) and `document_bounds` the starts, ends and in-document positions (for
RoPE). Statistics and accumulators are fp32; on a
GPU, bf16/fp16 inputs go to `tl.dot` as they are and fp32 inputs use 3xTF32 (near-fp32
accuracy on tensor cores); in the CPU interpreter, whose bf16 dot is wrong, every dot runs on
fp32 operands with ieee precision.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._triton import cdiv, kernel, next_pow2
from .dispatch import interpreting, resolve

tl = None  # triton.language, bound at the first kernel launch (see _triton.kernel)

IMPLEMENTED = ("torch", "triton")


def document_ids(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Per-position document index (int32, tokens' shape (batch, seq)) of EOS-delimited packing:
    the number of EOS tokens strictly before each position, so a document's EOS is its last
    token and the next position starts the next document."""
    eos = (tokens == eos_id).to(torch.int32)
    return (eos.cumsum(-1, dtype=torch.int32) - eos).contiguous()


def document_bounds(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(start, end, position), each int32 (batch, seq): the first position of each position's
    document, one past its last, and the position counted from its document's start (RoPE
    restarts at every document). Assumes each document is one contiguous run."""
    b, s = doc_ids.shape
    idx = torch.arange(s, device=doc_ids.device, dtype=torch.int32).expand(b, s)
    first = torch.ones((b, s), dtype=torch.bool, device=doc_ids.device)
    first[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start = torch.where(first, idx, torch.zeros_like(idx)).cummax(-1).values
    last = torch.ones((b, s), dtype=torch.bool, device=doc_ids.device)
    last[:, :-1] = first[:, 1:]
    end = torch.where(last, idx + 1, torch.full_like(idx, s)).flip(-1).cummin(-1).values.flip(-1)
    return start.contiguous(), end.contiguous(), (idx - start).contiguous()


def document_mask(doc_ids: torch.Tensor, causal: bool) -> torch.Tensor:
    """The boolean (batch, 1, seq, seq) mask: True where query i may see key j."""
    mask = doc_ids[:, None, :, None] == doc_ids[:, None, None, :]
    if causal:
        s = doc_ids.shape[-1]
        mask = mask & torch.ones((s, s), dtype=torch.bool, device=doc_ids.device).tril()
    return mask


def flash_attention_reference(q, k, v, causal: bool = True, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"kv heads ({k.shape[1]}) must divide query heads ({q.shape[1]})")
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    if doc_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    _check_docs(q, k, doc_ids)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=document_mask(doc_ids, causal))


# ----------------------------------------------------------------------------- Triton kernels


@kernel
def _attn_fwd_kernel(Q, K, V, O, LSE, DOC, DSTART, DEND, sm_scale, n_heads, group, seq_q, seq_k, head_dim,
                     sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sob, soh, sos,
                     CAUSAL: tl.constexpr, DOCS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = bh % n_heads
    hk = (h // group).to(tl.int64)
    h = h.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d[None, :] < head_dim
    mmask = offs_m[:, None] < seq_q
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :], mask=mmask & dmask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo = 0
    hi = seq_k
    if CAUSAL:
        hi = tl.minimum(seq_k, start_m + BLOCK_M)
    if DOCS:  # keys of the documents of this block's rows only (seq_q = seq_k)
        doc_base = b * seq_q
        doc_q = tl.load(DOC + doc_base + offs_m, mask=offs_m < seq_q, other=-1)
        lo = (tl.load(DSTART + doc_base + start_m) // BLOCK_N) * BLOCK_N
        hi = tl.minimum(hi, tl.load(DEND + doc_base + tl.minimum(start_m + BLOCK_M, seq_q) - 1))
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        nmask = cols[:, None] < seq_k
        k = tl.load(k_base + cols[:, None] * sks + offs_d[None, :], mask=nmask & dmask, other=0.0)
        v = tl.load(v_base + cols[:, None] * svs + offs_d[None, :], mask=nmask & dmask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale
        valid = cols[None, :] < seq_k
        if CAUSAL:
            valid = valid & (cols[None, :] <= offs_m[:, None])
        if DOCS:
            doc_k = tl.load(DOC + doc_base + cols, mask=cols < seq_k, other=-2)
            valid = valid & (doc_q[:, None] == doc_k[None, :])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: key 0 is in the first block for every row
        if DOCS:  # a row whose document starts in a later block: nothing seen yet, read -inf as 0
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=mmask & dmask)
    tl.store(LSE + bh.to(tl.int64) * seq_q + offs_m, m_i + tl.log(l_i), mask=offs_m < seq_q)


@kernel
def _attn_bwd_delta_kernel(O, DO, DELTA, n_rows, head_dim, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < head_dim)
    offs = rows.to(tl.int64)[:, None] * head_dim + cols[None, :]
    o = tl.load(O + offs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + rows, tl.sum(o * do, axis=1), mask=rows < n_rows)


@kernel
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DOC, DSTART, DEND, sm_scale, n_heads, n_kv_heads, group,
                          seq_q, seq_k, head_dim, sqb, sqh, sqs, skb, skh, sks, svb, svh, svs,
                          CAUSAL: tl.constexpr, DOCS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1)
    b = (bhk // n_kv_heads).to(tl.int64)
    hk = (bhk % n_kv_heads).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d[None, :] < head_dim
    nmask = cols[:, None] < seq_k
    k = tl.load(K + b * skb + hk * skh + cols[:, None] * sks + offs_d[None, :], mask=nmask & dmask, other=0.0)
    v = tl.load(V + b * svb + hk * svh + cols[:, None] * svs + offs_d[None, :], mask=nmask & dmask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo = 0
    hi = seq_q
    if CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M  # earlier query rows see none of these keys
    if DOCS:  # query rows of the documents of this block's keys only (seq_q = seq_k)
        doc_base = b * seq_k
        doc_k = tl.load(DOC + doc_base + cols, mask=cols < seq_k, other=-2)
        lo = tl.maximum(lo, (tl.load(DSTART + doc_base + start_n) // BLOCK_M) * BLOCK_M)
        hi = tl.load(DEND + doc_base + tl.minimum(start_n + BLOCK_N, seq_k) - 1)
    for g in range(0, group):
        h = hk * group + g
        q_base = Q + b * sqb + h * sqh
        do_base = DO + (b * n_heads + h) * seq_q * head_dim  # dO is contiguous
        stat_base = (b * n_heads + h) * seq_q
        for start_m in range(lo, hi, BLOCK_M):
            rows = start_m + offs_m
            mmask = rows[:, None] < seq_q
            q = tl.load(q_base + rows[:, None] * sqs + offs_d[None, :], mask=mmask & dmask, other=0.0)
            do = tl.load(do_base + rows[:, None] * head_dim + offs_d[None, :], mask=mmask & dmask, other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            lse = tl.load(LSE + stat_base + rows, mask=rows < seq_q, other=0.0)
            delta = tl.load(DELTA + stat_base + rows, mask=rows < seq_q, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale
            valid = (rows[:, None] < seq_q) & (cols[None, :] < seq_k)
            if CAUSAL:
                valid = valid & (cols[None, :] <= rows[:, None])
            if DOCS:
                doc_q = tl.load(DOC + doc_base + rows, mask=rows < seq_q, other=-1)
                valid = valid & (doc_q[:, None] == doc_k[None, :])
            p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    out = (bhk.to(tl.int64) * seq_k + cols[:, None]) * head_dim + offs_d[None, :]  # dK, dV contiguous
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=nmask & dmask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=nmask & dmask)


@kernel
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, DOC, DSTART, DEND, sm_scale, n_heads, group, seq_q, seq_k,
                        head_dim, sqb, sqh, sqs, skb, skh, sks, svb, svh, svs,
                        CAUSAL: tl.constexpr, DOCS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = bh % n_heads
    hk = (h // group).to(tl.int64)
    h = h.to(tl.int64)
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d[None, :] < head_dim
    mmask = rows[:, None] < seq_q
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqs + offs_d[None, :], mask=mmask & dmask, other=0.0)
    out = (bh.to(tl.int64) * seq_q + rows[:, None]) * head_dim + offs_d[None, :]  # dO, dQ contiguous
    do = tl.load(DO + out, mask=mmask & dmask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    stat = bh.to(tl.int64) * seq_q + rows
    lse = tl.load(LSE + stat, mask=rows < seq_q, other=0.0)
    delta = tl.load(DELTA + stat, mask=rows < seq_q, other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo = 0
    hi = seq_k
    if CAUSAL:
        hi = tl.minimum(seq_k, start_m + BLOCK_M)
    if DOCS:  # as in the forward: keys of the documents of this block's rows only
        doc_base = b * seq_q
        doc_q = tl.load(DOC + doc_base + rows, mask=rows < seq_q, other=-1)
        lo = (tl.load(DSTART + doc_base + start_m) // BLOCK_N) * BLOCK_N
        hi = tl.minimum(hi, tl.load(DEND + doc_base + tl.minimum(start_m + BLOCK_M, seq_q) - 1))
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        nmask = cols[:, None] < seq_k
        k = tl.load(k_base + cols[:, None] * sks + offs_d[None, :], mask=nmask & dmask, other=0.0)
        v = tl.load(v_base + cols[:, None] * svs + offs_d[None, :], mask=nmask & dmask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale
        valid = (rows[:, None] < seq_q) & (cols[None, :] < seq_k)
        if CAUSAL:
            valid = valid & (cols[None, :] <= rows[:, None])
        if DOCS:
            doc_k = tl.load(DOC + doc_base + cols, mask=cols < seq_k, other=-2)
            valid = valid & (doc_q[:, None] == doc_k[None, :])
        p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(DQ + out, (dq * sm_scale).to(DQ.dtype.element_ty), mask=mmask & dmask)


def _launch_config(head_dim: int, dtype: torch.dtype):
    """(BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, PRECISION). Untuned starting points for a GPU."""
    block_d = max(16, next_pow2(head_dim))
    if interpreting():  # fewer, larger programs run faster in the interpreter; exact fp32 dots
        return 32, 32, block_d, True, "ieee"
    if dtype == torch.float32:  # 3xTF32 on tensor cores: ~fp32 accuracy, far cheaper than ieee FMA dots
        return 64, 32, block_d, True, "tf32x3"
    return (128, 64, block_d, False, "tf32") if block_d <= 64 else (64, 64, block_d, False, "tf32")


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _FlashAttentionTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, doc_ids):
        q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
        docs = doc_ids is not None
        if docs:
            doc = doc_ids.to(device=q.device, dtype=torch.int32).contiguous()
            start, end, _ = document_bounds(doc)
        else:  # unused pointers (DOCS=False): any int32 tensor
            doc = start = end = torch.zeros(1, dtype=torch.int32, device=q.device)
        b, hq, sq, d = q.shape
        hkv, sk = k.shape[1], k.shape[2]
        group = hq // hkv
        scale = 1.0 / math.sqrt(d)
        bm, bn, bd, upcast, prec = _launch_config(d, q.dtype)
        o = torch.empty((b, hq, sq, d), dtype=q.dtype, device=q.device)
        lse = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device)
        if o.numel():
            _attn_fwd_kernel[(cdiv(sq, bm), b * hq)](
                q, k, v, o, lse, doc, start, end, scale, hq, group, sq, sk, d,
                q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
                CAUSAL=causal, DOCS=docs, UPCAST=upcast, PRECISION=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd)
        ctx.save_for_backward(q, k, v, o, lse, doc, start, end)
        ctx.causal, ctx.docs = causal, docs
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, doc, start, end = ctx.saved_tensors
        b, hq, sq, d = q.shape
        hkv, sk = k.shape[1], k.shape[2]
        group = hq // hkv
        scale = 1.0 / math.sqrt(d)
        bm, bn, bd, upcast, prec = _launch_config(d, q.dtype)
        do = do.contiguous()
        delta = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device)
        dq = torch.empty((b, hq, sq, d), dtype=q.dtype, device=q.device)
        dk = torch.empty((b, hkv, sk, d), dtype=k.dtype, device=k.device)
        dv = torch.empty((b, hkv, sk, d), dtype=v.dtype, device=v.device)
        if q.numel() == 0 or k.numel() == 0:
            return dq.zero_(), dk.zero_(), dv.zero_(), None, None
        n_rows = b * hq * sq
        _attn_bwd_delta_kernel[(cdiv(n_rows, 64),)](o, do, delta, n_rows, d, BLOCK_M=64, BLOCK_D=bd)
        strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                   v.stride(0), v.stride(1), v.stride(2))
        _attn_bwd_dkdv_kernel[(cdiv(sk, bn), b * hkv)](
            q, k, v, do, lse, delta, dk, dv, doc, start, end, scale, hq, hkv, group, sq, sk, d, *strides,
            CAUSAL=ctx.causal, DOCS=ctx.docs, UPCAST=upcast, PRECISION=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd)
        _attn_bwd_dq_kernel[(cdiv(sq, bm), b * hq)](
            q, k, v, do, lse, delta, dq, doc, start, end, scale, hq, group, sq, sk, d, *strides,
            CAUSAL=ctx.causal, DOCS=ctx.docs, UPCAST=upcast, PRECISION=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd)
        return dq, dk, dv, None, None


def _check(q, k, v):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be (batch, heads, seq, head_dim)")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit together")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"kv heads ({k.shape[1]}) must divide query heads ({q.shape[1]})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")


def _check_docs(q, k, doc_ids):
    if q.shape[2] != k.shape[2] or tuple(doc_ids.shape) != (q.shape[0], q.shape[2]):
        raise ValueError(f"doc_ids {tuple(doc_ids.shape)} must be (batch, seq) of a self-attention's q "
                         f"{tuple(q.shape)} and k {tuple(k.shape)}")
    if doc_ids.dtype.is_floating_point or doc_ids.dtype == torch.bool:
        raise ValueError(f"doc_ids must be an integer tensor, got {doc_ids.dtype}")
    # a value check (one sync), in eager code only: a compiled block cannot branch on values
    if (doc_ids.device.type != "meta" and doc_ids.shape[1] > 1 and not torch.compiler.is_compiling()
            and bool((doc_ids[:, 1:] < doc_ids[:, :-1]).any())):
        raise ValueError("doc_ids must be non-decreasing along the sequence (each document one contiguous run)")


def flash_attention(q, k, v, causal: bool = True, *, doc_ids: torch.Tensor | None = None,
                    backend: str | None = None):
    """Attention of q over k, v; with `doc_ids` (batch, seq) block-diagonal over documents."""
    if resolve(backend, q.device.type, IMPLEMENTED) == "triton":
        _check(q, k, v)
        if doc_ids is not None:
            _check_docs(q, k, doc_ids)
        return _FlashAttentionTriton.apply(q, k, v, bool(causal), doc_ids)
    return flash_attention_reference(q, k, v, causal, doc_ids)
