"""RoPE: Triton (interpreter) against the torch reference for q and k (GQA), values and gradients."""
import pytest
import torch

from dist_train.kernels import apply_rope, apply_rope_reference, rope_tables
from dist_train.kernels.dispatch import resolve
from dist_train.kernels.rope import IMPLEMENTED
from tests.conftest import kernel_tol

pytest.importorskip("triton")

pytestmark = pytest.mark.usefixtures("triton_interpret")  # kernels run in the CPU interpreter


def _run(fn, q, k, cos, sin, gen):
    q = q.detach().requires_grad_()
    k = k.detach().requires_grad_()
    qr, kr = fn(q, k, cos, sin)
    # bf16 values, so a bf16 output receives its gradient unrounded
    gq, gk = (torch.randn(t.shape, generator=gen).bfloat16().float() for t in (qr, kr))
    dq, dk = torch.autograd.grad((qr.float() * gq).sum() + (kr.float() * gk).sum(), (q, k))
    return qr, kr, dq, dk


def test_auto_picks_triton_under_interpreter():
    assert resolve("auto", "cpu", IMPLEMENTED) == "triton"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,hq,hkv,s,d", [(2, 6, 2, 13, 10), (1, 3, 3, 1, 4), (1, 4, 1, 70, 24)])
def test_rope_matches_reference(b, hq, hkv, s, d, dtype):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(b, hq, s, d, generator=gen).to(dtype)
    k = torch.randn(b, hkv, s, d, generator=gen).to(dtype)
    cos, sin = rope_tables(s, d)
    ours = _run(lambda *a: apply_rope(*a, backend="triton"), q, k, cos, sin, torch.Generator().manual_seed(1))
    if dtype == torch.float32:
        ref = _run(apply_rope_reference, q, k, cos, sin, torch.Generator().manual_seed(1))
        tol = dict(atol=1e-5, rtol=1e-5)
    else:  # fp32 math on the same bf16 values
        ref = _run(apply_rope_reference, q.float(), k.float(), cos, sin, torch.Generator().manual_seed(1))
    for a, r, src in zip(ours, ref, (q, k, q, k)):
        assert a.dtype == dtype and a.shape == src.shape
        if dtype == torch.bfloat16:  # each output: two products summed in fp32, rounded to bf16 once
            tol = kernel_tol(dtype, k=2, scale=r.abs().max().item())
        torch.testing.assert_close(a.float(), r.float(), **tol)


def test_rope_strided_input_and_only_q_used():
    """q as the transposed view of a (b, s, h, d) projection; k's output unused."""
    gen = torch.Generator().manual_seed(3)
    proj = torch.randn(2, 9, 4, 8, generator=gen, requires_grad=True)
    k = torch.randn(2, 2, 9, 8, generator=gen, requires_grad=True)
    cos, sin = rope_tables(9, 8)
    grads = []
    for fn in (lambda *a: apply_rope(*a, backend="triton"), apply_rope_reference):
        qr, _ = fn(proj.transpose(1, 2), k, cos, sin)
        grads.append(torch.autograd.grad(qr.pow(2).sum() + qr.sum(), proj)[0])
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-5)


def test_rope_rejects_bad_tables():
    q = torch.randn(1, 2, 5, 8)
    cos, sin = rope_tables(6, 8)
    with pytest.raises(ValueError):
        apply_rope(q, q, cos, sin, backend="triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_per_row_tables(dtype):
    """Tables gathered at per-row positions (positions restarting at packed documents),
    (batch, 1, seq, half): values and gradients against the reference, and each row equals
    the rotation by its own positions' shared table."""
    b, hq, hkv, s, d = 2, 4, 2, 13, 10
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(b, hq, s, d, generator=gen).to(dtype)
    k = torch.randn(b, hkv, s, d, generator=gen).to(dtype)
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 0, 0, 1, 2, 3], list(range(s))])
    cos_t, sin_t = rope_tables(s, d)
    cos, sin = cos_t[pos][:, None], sin_t[pos][:, None]
    ours = _run(lambda *a: apply_rope(*a, backend="triton"), q, k, cos, sin, torch.Generator().manual_seed(1))
    ref = _run(apply_rope_reference, q.float(), k.float(), cos, sin, torch.Generator().manual_seed(1))
    for a, r in zip(ours, ref):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), r.float(), **kernel_tol(dtype, k=2, scale=r.abs().max().item()))
    # row 1 holds positions 0..s-1: the shared table's result
    shared = apply_rope(q[1:], k[1:], cos_t, sin_t, backend="triton")
    assert torch.equal(ours[0][1:], shared[0]) and torch.equal(ours[1][1:], shared[1])
