"""RMSNorm: Triton (interpreter) against the torch reference, values and every gradient; the sum
of squares is shown to be accumulated in fp32."""
import pytest
import torch

from dist_train.kernels import rms_norm, rms_norm_reference
from dist_train.kernels.dispatch import resolve
from dist_train.kernels.rms_norm import IMPLEMENTED
from tests.conftest import bf16_running_sum, kernel_tol

pytest.importorskip("triton")

pytestmark = pytest.mark.usefixtures("triton_interpret")  # kernels run in the CPU interpreter


TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5)}


def _tol(dtype, k, ref):
    """fp32: as before. bf16: the kernel works in fp32 on the same bf16 values as the fp32
    reference and rounds each result once (y, dx to x's dtype; dw, summed over the rows in fp32,
    to w's), so they differ by one bf16 ulp plus fp32 noise over the k summed terms."""
    if dtype == torch.float32:
        return TOL[dtype]
    return kernel_tol(dtype, k=k, scale=ref.abs().max().item())


def _grads(fn, inputs, gen):
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    # the incoming gradient holds bf16 values, so a bf16 output receives it unrounded
    loss = sum((o.float() * torch.randn(o.shape, generator=gen).bfloat16().float()).sum() for o in outs)
    grads = torch.autograd.grad(loss, inputs)
    return outs, grads


def test_auto_picks_triton_under_interpreter():
    assert resolve("auto", "cpu", IMPLEMENTED) == "triton"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 5, 37), (1, 1, 96), (3, 130)])
def test_rms_norm_matches_reference(shape, dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).to(dtype).requires_grad_()

    def ours(x, w):
        return rms_norm(x, w, 1e-6, backend="triton")

    def ref(x, w):  # fp32 reference on the same values
        return rms_norm_reference(x.float(), w.float(), 1e-6)

    outs, grads = _grads(ours, (x, w), torch.Generator().manual_seed(1))
    routs, rgrads = _grads(ref, (x, w), torch.Generator().manual_seed(1))
    n_cols, n_rows = shape[-1], x.numel() // shape[-1]
    for o, ro in zip(outs, routs):
        assert o.dtype == dtype and o.shape == x.shape
        torch.testing.assert_close(o.float(), ro, **_tol(dtype, n_cols, ro))
    # dx: two reductions over the row (1/rms, mean(dy*w*x_hat)); dw: 1/rms, then over the rows
    for g, rg, t, k in zip(grads, rgrads, (x, w), (2 * n_cols, n_cols + n_rows)):
        assert g.dtype == t.dtype
        torch.testing.assert_close(g.float(), rg.float(), **_tol(dtype, k, rg))


def test_rms_norm_mixed_dtypes_and_noncontiguous():
    """bf16 activations with an fp32 weight; a transposed (non-contiguous) input."""
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(7, 3, 20, generator=gen)
    x = base.transpose(0, 1).requires_grad_()  # (3, 7, 20), rows not contiguous
    w = torch.randn(20, generator=gen, requires_grad=True)
    outs, grads = _grads(lambda x, w: rms_norm(x, w, 1e-5, backend="triton"), (x, w), torch.Generator().manual_seed(3))
    routs, rgrads = _grads(lambda x, w: rms_norm_reference(x, w, 1e-5), (x, w), torch.Generator().manual_seed(3))
    torch.testing.assert_close(outs[0], routs[0], **TOL[torch.float32])
    for g, rg in zip(grads, rgrads):
        torch.testing.assert_close(g, rg, **TOL[torch.float32])
    xb = torch.randn(4, 5, 20, generator=gen).bfloat16()
    y = rms_norm(xb, w.detach(), backend="triton")
    assert y.dtype == torch.bfloat16
    ref = rms_norm_reference(xb.float(), w.detach())
    torch.testing.assert_close(y.float(), ref, **_tol(torch.bfloat16, 20, ref))


def test_rms_norm_sums_squares_in_fp32():
    """Rows of 4096 bf16 values in [1, 1.1]: a running sum of squares kept in bf16 stops growing
    near 512 (its ulp there, 4, is over twice each term), so 1/rms would come out about sqrt(8)
    times too large. The kernel matches the fp32-accumulated reference within the bf16 tolerance;
    the same computation with a bf16 running sum misses it on every element by over 10 times."""
    rows, n_cols = 4, 4096
    gen = torch.Generator().manual_seed(4)
    x = (1 + 0.1 * torch.rand(rows, n_cols, generator=gen)).bfloat16()
    w = (1 + 0.1 * torch.randn(n_cols, generator=gen)).bfloat16()
    ref = rms_norm_reference(x.float(), w.float(), 1e-6)
    tol = kernel_tol(torch.bfloat16, k=n_cols, scale=ref.abs().max().item())
    y = rms_norm(x, w, 1e-6, backend="triton")
    torch.testing.assert_close(y.float(), ref, **tol)

    xf = x.float()
    rstd_bf16 = torch.rsqrt(bf16_running_sum(xf * xf) / n_cols + 1e-6)
    y_bf16 = (xf * rstd_bf16[:, None] * w.float()).bfloat16().float()
    allowed = tol["atol"] + tol["rtol"] * ref.abs()
    assert ((y_bf16 - ref).abs() > 10 * allowed).all()
