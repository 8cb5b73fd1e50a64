"""Flash attention: Triton (interpreter) against SDPA, values and dq/dk/dv, GQA and ragged blocks."""
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
