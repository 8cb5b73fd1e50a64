"""SwiGLU: Triton (interpreter) against the torch reference, values and both gradients."""
import pytest
import torch

from dist_train.kernels import swiglu, swiglu_reference
from dist_train.kernels.dispatch import resolve
from dist_train.kernels.swiglu import IMPLEMENTED
from tests.conftest import kernel_tol

pytest.importorskip("triton")

pytestmark = pytest.mark.usefixtures("triton_interpret")  # kernels run in the CPU interpreter


def _run(fn, gate, up, dy):
    gate = gate.detach().requires_grad_()
    up = up.detach().requires_grad_()
    y = fn(gate, up)
    dg, du = torch.autograd.grad(y, (gate, up), dy)
    return y, dg, du


def test_auto_picks_triton_under_interpreter():
    assert resolve("auto", "cpu", IMPLEMENTED) == "triton"


@pytest.mark.parametrize("shape", [(2, 3, 37), (1, 1, 1), (5, 1100), (7,)])
def test_swiglu_fp32(shape):
    gen = torch.Generator().manual_seed(0)
    g, u, dy = (torch.randn(shape, generator=gen) * 3 for _ in range(3))
    ours = _run(lambda a, b: swiglu(a, b, backend="triton"), g, u, dy)
    ref = _run(swiglu_reference, g, u, dy)
    for a, b in zip(ours, ref):
        assert a.dtype == torch.float32 and a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_swiglu_bf16_against_fp32():
    gen = torch.Generator().manual_seed(1)
    g, u, dy = (torch.randn(3, 4, 50, generator=gen).bfloat16() for _ in range(3))
    ours = _run(lambda a, b: swiglu(a, b, backend="triton"), g, u, dy)
    ref = _run(swiglu_reference, g.float(), u.float(), dy.float())
    for a, b in zip(ours, ref):
        assert a.dtype == torch.bfloat16
        # elementwise, in fp32 from the same bf16 values, each result rounded to bf16 once
        torch.testing.assert_close(a.float(), b, **kernel_tol(torch.bfloat16, scale=b.abs().max().item()))


def test_swiglu_strided_halves_of_fused_projection():
    """gate/up as the two halves of one (tokens, 2*ffn) projection: strided rows, no copy needed."""
    gen = torch.Generator().manual_seed(2)
    proj = torch.randn(2, 5, 2 * 19, generator=gen, requires_grad=True)
    dy = torch.randn(2, 5, 19, generator=gen)
    outs = []
    for fn in (lambda a, b: swiglu(a, b, backend="triton"), swiglu_reference):
        g, u = proj.chunk(2, dim=-1)
        y = fn(g, u)
        (grad,) = torch.autograd.grad(y, proj, dy)
        outs.append((y, grad))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=1e-5, rtol=1e-5)


def test_swiglu_empty():
    g = torch.randn(0, 8, requires_grad=True)
    y = swiglu(g, g.detach().clone(), backend="triton")
    assert y.shape == (0, 8)
    y.sum().backward()
    assert g.grad.shape == (0, 8)
