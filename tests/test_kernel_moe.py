"""MoE permute/unpermute: Triton (interpreter) against the torch reference and against a
plain per-token loop; gradients for tokens, expert_out and probs; ragged and empty experts."""
import pytest
import torch

from dist_train.kernels import moe_permute, moe_permute_reference, moe_unpermute, moe_unpermute_reference
from dist_train.kernels.dispatch import resolve
from dist_train.kernels.moe import IMPLEMENTED
from tests.conftest import kernel_tol

pytest.importorskip("triton")

pytestmark = pytest.mark.usefixtures("triton_interpret")  # kernels run in the CPU interpreter


def _routing(n_tokens, top_k, num_experts, used, gen):
    """Distinct experts per token drawn from the `used` subset (others stay empty)."""
    used = torch.tensor(used)
    pick = torch.stack([torch.randperm(len(used), generator=gen)[:top_k] for _ in range(n_tokens)])
    ids = used[pick]
    probs = torch.softmax(torch.randn(n_tokens, top_k, generator=gen), -1)
    return ids, probs


def _pipeline(backend, tokens, ids, probs, num_experts, expert_scale):
    """permute -> a per-row 'expert' (scale by a per-expert factor) -> unpermute."""
    tokens = tokens.detach().requires_grad_()
    probs = probs.detach().requires_grad_()
    permuted, row_map, counts = moe_permute(tokens, ids, num_experts, backend=backend)
    per_row = torch.repeat_interleave(expert_scale, counts)[:, None].to(permuted.dtype)
    expert_out = (permuted * per_row).detach().requires_grad_()
    out = moe_unpermute(expert_out, row_map, probs, backend=backend)
    # two backward passes: through unpermute alone, then through permute with d_permuted given
    d_out = torch.linspace(-1, 1, out.numel()).view(out.shape).to(out.dtype)
    d_eo, d_probs = torch.autograd.grad(out, (expert_out, probs), d_out)
    (d_tokens,) = torch.autograd.grad(permuted, tokens, d_eo)
    return dict(permuted=permuted, row_map=row_map, counts=counts, out=out, d_eo=d_eo, d_probs=d_probs,
                d_tokens=d_tokens)


def test_auto_picks_triton_under_interpreter():
    assert resolve("auto", "cpu", IMPLEMENTED) == "triton"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_tokens,top_k,num_experts,used,dim", [
    (13, 2, 6, [0, 2, 3, 5], 40),    # experts 1 and 4 empty, ragged counts, dim not a power of two
    (1, 1, 3, [1], 7),               # one token
    (9, 3, 4, [0, 1, 2, 3], 1100),   # dim over one block
])
def test_moe_matches_reference(n_tokens, top_k, num_experts, used, dim, dtype):
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(n_tokens, dim, generator=gen).to(dtype)
    ids, probs = _routing(n_tokens, top_k, num_experts, used, gen)
    scale = torch.arange(1, num_experts + 1, dtype=torch.float32)
    ours = _pipeline("triton", tokens, ids, probs, num_experts, scale)
    ref = _pipeline("torch", tokens, ids, probs, num_experts, scale)
    assert torch.equal(ours["row_map"], ref["row_map"]) and torch.equal(ours["counts"], ref["counts"])
    assert ours["counts"].tolist() == torch.bincount(ids.view(-1), minlength=num_experts).tolist()
    torch.testing.assert_close(ours["permuted"], ref["permuted"], atol=0, rtol=0)  # pure copies
    # bf16: both backends sum in fp32 and round once, so out and d_eo (the same fp32 values
    # rounded on each side) differ by at most one ulp; d_tokens sums each side's own rounded d_eo
    # (terms of one sign: one ulp of the sum) before its final rounding on each side (3 ulps in
    # all); d_probs (fp32, as probs) is a length-dim dot in fp32 on both sides.
    bf16 = {"out": dict(roundings=1, k=top_k), "d_eo": dict(roundings=1, k=1),
            "d_probs": dict(roundings=1, k=dim), "d_tokens": dict(roundings=3, k=top_k)}
    for name in ("out", "d_eo", "d_probs", "d_tokens"):
        a, r = ours[name], ref[name]
        assert a.dtype == r.dtype and a.shape == r.shape, name
        if dtype == torch.float32:
            tol = dict(atol=1e-5, rtol=1e-5)
        else:
            tol = kernel_tol(a.dtype, scale=r.abs().max().item(), **bf16[name])
        torch.testing.assert_close(a.float(), r.float(), **tol, msg=lambda m: f"{name}: {m}")


def test_moe_semantics_against_loop():
    """Grouping by expert with stable token order; unpermute is the probability-weighted sum."""
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randn(2, 5, 12, generator=gen)  # (batch, seq, dim): leading dims are kept
    ids = torch.tensor([[[3, 0], [0, 3], [2, 0], [3, 2], [0, 2]], [[2, 3], [0, 2], [3, 0], [2, 3], [0, 3]]])
    probs = torch.rand(2, 5, 2, generator=gen)
    permuted, row_map, counts = moe_permute(tokens, ids, 5, backend="triton")
    flat_tokens, flat_ids = tokens.view(-1, 12), ids.view(-1, 2)
    expected = [flat_tokens[t] for e in range(5) for t in range(10) for j in range(2) if flat_ids[t, j] == e]
    torch.testing.assert_close(permuted, torch.stack(expected), atol=0, rtol=0)
    assert counts.tolist() == [7, 0, 6, 7, 0]
    expert_out = torch.randn(permuted.shape, generator=gen)
    out = moe_unpermute(expert_out, row_map, probs, backend="triton")
    assert out.shape == (2, 5, 12)
    loop = torch.stack([sum(probs.view(-1, 2)[t, j] * expert_out[row_map[t, j]] for j in range(2)) for t in range(10)])
    torch.testing.assert_close(out.view(-1, 12), loop, atol=1e-6, rtol=1e-6)


def test_moe_unpermute_padded_expert_buffer_and_empty():
    """expert_out with more rows than copies (padding): unreferenced rows get zero gradient."""
    gen = torch.Generator().manual_seed(2)
    ids = torch.tensor([[1], [0], [1]])
    probs = torch.ones(3, 1)
    _, row_map, _ = moe_permute(torch.randn(3, 4), ids, 2, backend="triton")
    eo = torch.randn(5, 4, generator=gen, requires_grad=True)
    moe_unpermute(eo, row_map, probs, backend="triton").sum().backward()
    assert eo.grad[3:].abs().sum() == 0 and torch.equal(eo.grad[:3], torch.ones(3, 4))
    empty, rm, counts = moe_permute(torch.randn(0, 4), torch.zeros(0, 2, dtype=torch.long), 3, backend="triton")
    assert empty.shape == (0, 4) and rm.shape == (0, 2) and counts.tolist() == [0, 0, 0]
    assert moe_unpermute(torch.randn(0, 4), rm, torch.ones(0, 2), backend="triton").shape == (0, 4)


def test_moe_rejects_bad_expert_ids():
    with pytest.raises((IndexError, RuntimeError)):
        moe_permute(torch.randn(2, 4), torch.tensor([[0], [3]]), 3, backend="triton")


def test_references_exported():
    tokens, ids = torch.randn(4, 3), torch.tensor([[1], [0], [1], [0]])
    p, rm, c = moe_permute_reference(tokens, ids, 2)
    torch.testing.assert_close(moe_unpermute_reference(p, rm, torch.ones(4, 1)), tokens)
