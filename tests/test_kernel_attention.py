"""Flash attention: Triton (interpreter) against SDPA, values and dq/dk/dv, GQA and ragged blocks;
the softmax denominator and P @ V are shown to be accumulated in fp32."""
import pytest
import torch

from dist_train.kernels import flash_attention, flash_attention_reference
from dist_train.kernels.attention import IMPLEMENTED
from dist_train.kernels.dispatch import resolve
from tests.conftest import kernel_tol

pytest.importorskip("triton")

pytestmark = pytest.mark.usefixtures("triton_interpret")  # kernels run in the CPU interpreter


def _run(fn, q, k, v, do):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    o = fn(q, k, v)
    return (o, *torch.autograd.grad(o, (q, k, v), do))


def _inputs(b, hq, hkv, sq, sk, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, sq, d, generator=gen).to(dtype)
    k = torch.randn(b, hkv, sk, d, generator=gen).to(dtype)
    v = torch.randn(b, hkv, sk, d, generator=gen).to(dtype)
    do = torch.randn(b, hq, sq, d, generator=gen).to(dtype)
    return q, k, v, do


def test_auto_picks_triton_under_interpreter():
    assert resolve("auto", "cpu", IMPLEMENTED) == "triton"


@pytest.mark.parametrize("b,hq,hkv,sq,sk,d,causal", [
    (1, 4, 2, 37, 37, 24, True),    # GQA 2, seq not a multiple of the block, head_dim not a power of two
    (2, 3, 1, 70, 70, 16, True),    # MQA, three query blocks (causal block skipping)
    (1, 2, 2, 1, 1, 8, True),       # one token
    (1, 6, 3, 20, 45, 12, False),   # non-causal, different q/k lengths
    (1, 2, 1, 45, 20, 16, True),    # causal with fewer keys than queries (top-left aligned)
])
def test_flash_attention_fp32(b, hq, hkv, sq, sk, d, causal):
    q, k, v, do = _inputs(b, hq, hkv, sq, sk, d, torch.float32)
    ours = _run(lambda q, k, v: flash_attention(q, k, v, causal, backend="triton"), q, k, v, do)
    ref = _run(lambda q, k, v: flash_attention_reference(q, k, v, causal), q, k, v, do)
    for name, a, r in zip(("o", "dq", "dk", "dv"), ours, ref):
        assert a.dtype == torch.float32 and a.shape == r.shape, name
        torch.testing.assert_close(a, r, atol=2e-5, rtol=2e-5, msg=lambda m: f"{name}: {m}")


def test_flash_attention_bf16_against_fp32():
    b, hq, hkv, s, d = 2, 4, 2, 33, 20
    q, k, v, do = _inputs(b, hq, hkv, s, s, d, torch.bfloat16, seed=1)
    ours = _run(lambda q, k, v: flash_attention(q, k, v, True, backend="triton"), q, k, v, do)
    ref = _run(lambda q, k, v: flash_attention_reference(q, k, v, True), q.float(), k.float(), v.float(), do.float())
    # In the interpreter every dot runs on fp32 operands, statistics and accumulators are fp32 and
    # each result is rounded to bf16 once; the fp32 sums on the way: scores over head_dim, the
    # softmax and P @ V over keys, dK/dV over the queries of the kv head's group.
    k_sum = d + s + s * (hq // hkv)
    for name, a, r in zip(("o", "dq", "dk", "dv"), ours, ref):
        assert a.dtype == torch.bfloat16, name
        torch.testing.assert_close(a.float(), r, **_bf16_tol(name, k_sum, r), msg=lambda m: f"{name}: {m}")


def _bf16_tol(name, k_sum, ref):
    """Tolerance of a bf16 result against the fp32 reference on the same bf16 inputs. dq and dk
    also carry the rounding of O to bf16: the backward's D = rowsum(dO * O) uses the stored O,
    and dS = P * (dP - D) passes D's error (one ulp of the terms) on to them."""
    return kernel_tol(torch.bfloat16, k=k_sum, scale=ref.abs().max().item(), term_roundings=int(name in ("dq", "dk")))


def _flash_forward_bf16_state(q, k, v, block):
    """The forward's online softmax with the running sum l and the accumulator acc rounded to bf16
    after every block of `block` keys (what a kernel keeping them in bf16 computes); fp32 else."""
    scale = q.shape[-1] ** -0.5
    m = torch.full(q.shape[:-1], float("-inf"))
    l = torch.zeros(q.shape[:-1])
    acc = torch.zeros(q.shape)
    for start in range(0, k.shape[-2], block):
        s = q @ k[..., start:start + block, :].transpose(-1, -2) * scale
        m_new = torch.maximum(m, s.amax(-1))
        alpha, p = torch.exp(m - m_new), torch.exp(s - m_new[..., None])
        l = (l * alpha + p.sum(-1)).bfloat16().float()
        acc = (acc * alpha[..., None] + p @ v[..., start:start + block, :]).bfloat16().float()
        m = m_new
    return (acc / l[..., None]).bfloat16().float()


def test_flash_attention_accumulates_in_fp32():
    """The first key scores 10.375 above 4095 others, which then weigh e**-10.375 ~ 2**-15 each
    against it: together an eighth of the softmax, but one key, and one block of 32 or 64 keys
    (at most 2**-9), is under half a bf16 ulp (2**-8) of the running sum (near 1) and of the
    accumulator (near v of the first key, 1.5). A running sum and accumulator kept in bf16 drop
    them all: o would be 1.5 instead of about 1.21. The kernel (bf16 inputs) matches the fp32
    reference within the bf16 tolerance, gradients too; the bf16-state forward, in blocks of 1,
    32 or 64 keys, misses it on every element by over 10 times."""
    sq, sk, d = 16, 4096, 16
    gen = torch.Generator().manual_seed(5)
    q = torch.zeros(1, 1, sq, d)
    q[..., 0] = 4.0
    k = torch.zeros(1, 1, sk, d)
    k[:, :, 0, 0] = 10.375  # score 4 * 10.375 / sqrt(16); the others score 0
    v = -(1 + 0.1 * torch.rand(1, 1, sk, d, generator=gen))
    v[:, :, 0] = 1.5
    do = torch.randn(1, 1, sq, d, generator=gen)
    q, k, v, do = (t.bfloat16() for t in (q, k, v, do))
    ours = _run(lambda q, k, v: flash_attention(q, k, v, False, backend="triton"), q, k, v, do)
    ref = _run(lambda q, k, v: flash_attention_reference(q, k, v, False), q.float(), k.float(), v.float(), do.float())
    k_sum = d + sk + sq
    for name, a, r in zip(("o", "dq", "dk", "dv"), ours, ref):
        torch.testing.assert_close(a.float(), r, **_bf16_tol(name, k_sum, r), msg=lambda m: f"{name}: {m}")

    o_ref, tol = ref[0], _bf16_tol("o", k_sum, ref[0])
    assert 1.15 < o_ref.mean().item() < 1.27  # the tail's eighth of the weight is really there
    allowed = tol["atol"] + tol["rtol"] * o_ref.abs()
    for block in (1, 32, 64):
        o_bf16 = _flash_forward_bf16_state(q.float(), k.float(), v.float(), block)
        assert ((o_bf16 - o_ref).abs() > 10 * allowed).all(), block


def test_flash_attention_strided_inputs():
    """q/k/v as transposed views of (b, s, h, d) projections."""
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 19, 4, 16, generator=gen).transpose(1, 2)
    k = torch.randn(1, 19, 2, 16, generator=gen).transpose(1, 2)
    v = torch.randn(1, 19, 2, 16, generator=gen).transpose(1, 2)
    do = torch.randn(1, 4, 19, 16, generator=gen)
    ours = _run(lambda q, k, v: flash_attention(q, k, v, backend="triton"), q, k, v, do)
    ref = _run(flash_attention_reference, q, k, v, do)
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, atol=2e-5, rtol=2e-5)


# ----------------------------------------------------------------------------- document masking


def _packed_docs(b, s, lengths_per_row):
    """(batch, seq) int32 document ids: row r holds documents of the given lengths (the last one
    runs to the end of the row)."""
    rows = []
    for lengths in lengths_per_row:
        ids = torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(lengths)])
        ids = torch.cat([ids, torch.full((s - len(ids),), len(lengths), dtype=torch.int32)])[:s]
        rows.append(ids)
    return torch.stack(rows)[:b]


def test_document_ids_and_bounds():
    from dist_train.kernels import document_bounds, document_ids

    eos = 9
    tokens = torch.tensor([[1, 2, eos, 3, eos, eos, 4, 5], [eos, 1, 1, 1, 1, 1, 1, eos]])
    docs = document_ids(tokens, eos)
    assert docs.tolist() == [[0, 0, 0, 1, 1, 2, 3, 3], [0, 1, 1, 1, 1, 1, 1, 1]]  # an EOS ends its document
    start, end, pos = document_bounds(docs)
    assert start.tolist() == [[0, 0, 0, 3, 3, 5, 6, 6], [0, 1, 1, 1, 1, 1, 1, 1]]
    assert end.tolist() == [[3, 3, 3, 5, 5, 6, 8, 8], [1, 8, 8, 8, 8, 8, 8, 8]]
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], [0, 0, 1, 2, 3, 4, 5, 6]]


@pytest.mark.parametrize("b,hq,hkv,s,d,causal,lengths", [
    (2, 4, 2, 45, 24, True, [[7, 9, 1, 1, 2], [45]]),          # GQA, odd sizes, 1-token documents, one doc
    (1, 3, 1, 70, 16, True, [[32, 32]]),                      # MQA, boundaries on the interpreter's blocks
    (1, 2, 2, 70, 12, True, [[3, 40, 1, 20]]),                # a document spanning three query blocks
    (1, 4, 2, 37, 8, False, [[10, 5, 11]]),                   # non-causal: whole documents visible
])
def test_flash_attention_documents_fp32(b, hq, hkv, s, d, causal, lengths):
    """With document ids: values, dq, dk and dv against the masked SDPA reference."""
    q, k, v, do = _inputs(b, hq, hkv, s, s, d, torch.float32, seed=3)
    docs = _packed_docs(b, s, lengths)
    ours = _run(lambda q, k, v: flash_attention(q, k, v, causal, doc_ids=docs, backend="triton"), q, k, v, do)
    ref = _run(lambda q, k, v: flash_attention_reference(q, k, v, causal, docs), q, k, v, do)
    for name, a, r in zip(("o", "dq", "dk", "dv"), ours, ref):
        # sums over head_dim, over a document's keys and over the group's queries of a key
        tol = kernel_tol(torch.float32, k=d + s * (hq // hkv), scale=r.abs().max().item(), roundings=0)
        torch.testing.assert_close(a, r, **tol, msg=lambda m: f"{name}: {m}")
    # and the reference is the plain causal attention of each document on its own
    o_ref = ref[0]
    for row, lens in enumerate(lengths):
        at = 0
        for n in lens + [s]:
            n = min(n, s - at)
            if n <= 0:
                break
            sl = slice(at, at + n)
            alone = flash_attention_reference(q[row:row + 1, :, sl], k[row:row + 1, :, sl], v[row:row + 1, :, sl], causal)
            torch.testing.assert_close(o_ref[row:row + 1, :, sl], alone, atol=1e-6, rtol=1e-6)
            at += n


def test_flash_attention_skips_blocks_of_other_documents():
    """Blocks wholly outside a row's document are never read: NaN in the first document's q, k,
    v and dO (two interpreter blocks long) leave the second document's outputs and gradients
    finite and equal to that document attended on its own. A masked block that was read would
    carry the NaN in (0 x NaN = NaN in P @ V and the gradient products)."""
    from dist_train.kernels.attention import _launch_config

    block = _launch_config(16, torch.float32)[1]
    first, s = 2 * block, 2 * block + 29
    q, k, v, do = _inputs(1, 4, 2, s, s, 16, torch.float32, seed=4)
    docs = _packed_docs(1, s, [[first]])
    for t in (q, k, v, do):
        t[:, :, :first] = float("nan")
    o, dq, dk, dv = _run(lambda q, k, v: flash_attention(q, k, v, True, doc_ids=docs, backend="triton"), q, k, v, do)
    sl = slice(first, s)
    alone = _run(lambda q, k, v: flash_attention_reference(q, k, v, True), q[:, :, sl], k[:, :, sl], v[:, :, sl],
                 do[:, :, sl])
    for name, a, r in zip(("o", "dq", "dk", "dv"), (o, dq, dk, dv), alone):
        assert torch.isfinite(a[:, :, sl]).all(), name
        torch.testing.assert_close(a[:, :, sl], r, atol=2e-5, rtol=2e-5, msg=lambda m: f"{name}: {m}")


def test_flash_attention_bf16_documents_against_fp32():
    b, hq, hkv, s, d = 2, 4, 2, 33, 20
    q, k, v, do = _inputs(b, hq, hkv, s, s, d, torch.bfloat16, seed=6)
    docs = _packed_docs(b, s, [[5, 17], [30]])
    ours = _run(lambda q, k, v: flash_attention(q, k, v, True, doc_ids=docs, backend="triton"), q, k, v, do)
    ref = _run(lambda q, k, v: flash_attention_reference(q, k, v, True, docs),
               q.float(), k.float(), v.float(), do.float())
    k_sum = d + s + s * (hq // hkv)
    for name, a, r in zip(("o", "dq", "dk", "dv"), ours, ref):
        assert a.dtype == torch.bfloat16, name
        torch.testing.assert_close(a.float(), r, **_bf16_tol(name, k_sum, r), msg=lambda m: f"{name}: {m}")


def test_flash_attention_document_ids_checked():
    q, k, v, _ = _inputs(1, 2, 2, 8, 8, 8, torch.float32)
    for backend in ("triton", "torch"):
        with pytest.raises(ValueError, match="non-decreasing"):
            flash_attention(q, k, v, doc_ids=torch.tensor([[0, 0, 1, 1, 0, 0, 2, 2]]), backend=backend)
        with pytest.raises(ValueError, match="batch, seq"):
            flash_attention(q, k, v, doc_ids=torch.zeros(1, 7, dtype=torch.int32), backend=backend)
