"""The MoE layer in one process: routing, the dropless layer against a per-token loop over
experts, grouped matmul against the loop, the aux losses' values and their gradient
injection, capacity drops, parameter counts and the config checks for expert parallelism."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dist_train.config import load_config
from dist_train.model import ModelArgs, Transformer, count_params, flops_per_token, init_weights
from dist_train.moe import MoE, experts_grouped_mm, experts_loop, route
from dist_train.layout import check_layout
from tests.conftest import REPO
from tests.test_model import assert_checkpointing_keeps_gradients

DIM, HIDDEN, E = 12, 20, 6


def _layer(top_k=2, **kw) -> MoE:
    torch.manual_seed(0)
    m = MoE(DIM, HIDDEN, E, top_k, **kw).double()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.4)
    return m


def _per_token(m: MoE, x: torch.Tensor) -> torch.Tensor:
    """The layer written as a loop over tokens and their chosen experts."""
    x2 = x.reshape(-1, DIM)
    probs = torch.softmax(x2 @ m.router.weight.t(), -1)
    out = torch.zeros_like(x2)
    for t in range(x2.shape[0]):
        top = probs[t].topk(m.top_k)
        w = top.values / top.values.sum() if m.top_k > 1 else top.values
        for wj, e in zip(w, top.indices):
            h = F.silu(x2[t] @ m.experts.w1[e].t()) * (x2[t] @ m.experts.w3[e].t())
            out[t] += wj * (h @ m.experts.w2[e].t())
    return out.view_as(x)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_dropless_layer_matches_per_token_loop(top_k):
    m = _layer(top_k)
    x = torch.randn(2, 7, DIM, dtype=torch.float64, requires_grad=True)
    out = m(x)
    ref_x = x.detach().clone().requires_grad_()
    ref = _per_token(m, ref_x)
    tol = dict(rtol=1e-5, atol=1e-6)  # kernels.moe_unpermute accumulates in fp32
    torch.testing.assert_close(out, ref, **tol)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    (ref * g).sum().backward()  # aux weights are 0: the layer adds no gradient of its own
    torch.testing.assert_close(x.grad, ref_x.grad, **tol)
    for n, p in m.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, **tol, msg=lambda msg, n=n: f"{n}: {msg}")


def test_route_top_k_and_renormalised_weights():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0], [3.0, 0.0, 0.0, 2.9]])
    probs, w, ids, kept = route(logits, 2)
    assert ids.tolist() == [[1, 2], [0, 3]] and bool(kept.all())
    torch.testing.assert_close(w.sum(-1), torch.ones(2))
    torch.testing.assert_close(probs, torch.softmax(logits, -1))
    _, w1, ids1, _ = route(logits, 1)  # k = 1 keeps the raw probability (Switch)
    torch.testing.assert_close(w1[:, 0], torch.softmax(logits, -1).max(-1).values)


def test_capacity_drops_later_tokens_and_counts_them():
    logits = torch.zeros(8, 4)
    logits[:, 2] = 5.0  # every token's first choice is expert 2
    logits[:, 0] = torch.arange(8.0) / 10
    _, _, ids, kept = route(logits, 1, capacity_factor=1.0)  # capacity = ceil(8 * 1 / 4) = 2
    assert kept[:, 0].tolist() == [True, True] + [False] * 6
    m = _layer(1, capacity_factor=1.0)
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[2, 0] = 10.0
    x = torch.randn(1, 8, DIM, dtype=torch.float64)
    x[..., 0] = 1.0
    out = m(x)
    assert m.stats.dropped == 6 and m.stats.load[2] == 8
    dense = _layer(1)
    dense.load_state_dict(m.state_dict())
    full = dense(x)
    torch.testing.assert_close(out[0, :2], full[0, :2])       # kept: the expert's output
    assert out[0, 2:].abs().max() == 0                          # dropped: nothing (the residual carries them)


def test_grouped_mm_matches_loop():
    g = torch.Generator().manual_seed(3)
    counts = [3, 0, 5, 1]  # an expert with no rows
    x = torch.randn(9, DIM, generator=g, requires_grad=True)
    shapes = ((HIDDEN, DIM), (HIDDEN, DIM), (DIM, HIDDEN))
    w1, w3, w2 = (torch.randn(4, *s, generator=g, requires_grad=True) for s in shapes)
    a = experts_grouped_mm(x, counts, w1, w3, w2)
    b = experts_loop(x, counts, w1, w3, w2)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    gout = torch.randn(a.shape, generator=g)
    ga = torch.autograd.grad(a, (x, w1, w3, w2), gout)
    gb = torch.autograd.grad(b, (x, w1, w3, w2), gout)
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)


def test_aux_losses_values_and_injected_gradient():
    m = _layer(2, aux_weight=0.5, z_weight=0.25)
    m.aux_grad_scale = 0.25
    x = torch.randn(3, 5, DIM, dtype=torch.float64)
    out = m(x)
    logits = x.reshape(-1, DIM) @ m.router.weight.t()
    probs = torch.softmax(logits, -1)
    ids = probs.topk(2).indices
    f = torch.bincount(ids.reshape(-1), minlength=E).double() / (15 * 2)
    aux = E * (f * probs.mean(0)).sum()
    z = torch.logsumexp(logits, -1).pow(2).mean()
    assert math.isclose(m.stats.aux, aux.item(), rel_tol=1e-9) and math.isclose(m.stats.z, z.item(), rel_tol=1e-9)
    assert m.stats.load.sum() == 30 and m.stats.dropped == 0
    # the layer's backward adds 0.25 x d(0.5 aux + 0.25 z)/d router, on top of the output's gradient
    out.sum().backward()
    got = m.router.weight.grad.clone()
    m.zero_grad()
    m.aux_weight = m.z_weight = 0.0
    m(x).sum().backward()
    plain = m.router.weight.grad.clone()
    w = m.router.weight.detach().clone().requires_grad_()
    lg = x.reshape(-1, DIM) @ w.t()
    pr = torch.softmax(lg, -1)
    weighted = 0.5 * E * (f * pr.mean(0)).sum() + 0.25 * torch.logsumexp(lg, -1).pow(2).mean()
    extra = torch.autograd.grad(0.25 * weighted, w)[0]
    torch.testing.assert_close(got, plain + extra)


def _moe_args(**kw) -> ModelArgs:
    base = dict(dim=32, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=64, ffn_dim=48, max_seq_len=16,
                moe_experts=4, moe_top_k=2, moe_every=2)
    return ModelArgs(**{**base, **kw})


@pytest.mark.parametrize("shared", [False, True])
def test_counts_and_model_shapes(shared):
    a = _moe_args(moe_shared_expert=shared)
    m = Transformer(a)
    assert a.moe_layer_ids() == [1, 3]
    assert [type(b.feed_forward).__name__ for b in m.layers.values()] == ["FeedForward", "MoE"] * 2
    counts = count_params(a)
    assert counts["total"] == sum(p.numel() for p in m.parameters())
    mlp = 3 * 32 * 48
    assert counts["total"] - counts["active"] == 2 * (4 - 2) * mlp  # two MoE layers, 2 of 4 experts idle
    dense = ModelArgs(**{**a.__dict__, "moe_experts": 0})
    extra = 2 * (32 * 4 + (2 - 1) * mlp + (mlp if shared else 0))
    assert flops_per_token(a, 16) - flops_per_token(dense, 16) == 6 * extra


def test_init_is_layout_independent_per_expert():
    a = _moe_args()
    m = Transformer(a)
    init_weights(m, 5)
    w2 = m.layers["1"].feed_forward.experts.w2
    assert w2.shape == (4, 32, 48)
    assert w2.std() < m.layers["1"].feed_forward.experts.w1.std() / 1.5  # residual scaling
    again = Transformer(a)
    init_weights(again, 5)
    assert torch.equal(again.layers["1"].feed_forward.experts.w1, m.layers["1"].feed_forward.experts.w1)
    assert not torch.equal(w2[0], w2[1])


@pytest.mark.parametrize("policy", ["full", "selective"])
def test_activation_checkpointing_counts_once_and_same_gradients(policy):
    a = _moe_args(moe_aux_weight=0.1, moe_z_weight=0.01)
    m = Transformer(a).double()
    init_weights(m, seed=1)
    m.double()
    tokens, targets = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    assert_checkpointing_keeps_gradients(m, tokens, targets, policy)
    assert m.layers["1"].feed_forward.stats.load.sum() == 2 * 2 * 16 * 2  # two forwards, not three


BAD = [  # (tests/test_config.py has the cases that need no node size)
    (["parallel.ep=4", "model.moe_experts=8", "parallel.a2a=hierarchical"], 12, 6,
     "ep must be a multiple or a divisor of the ranks per node"),
    (["parallel.ep=2", "model.moe_experts=8", "parallel.a2a=hierarchical"], 8, 3, "do not split into nodes of 3"),
]


@pytest.mark.parametrize("overrides,world,per_node,message", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_expert_parallel_layout_is_refused(overrides, world, per_node, message):
    cfg = load_config(REPO / "configs/tiny.toml", overrides + ["train.global_batch=24"])
    with pytest.raises(ValueError) as e:
        check_layout(cfg, world, per_node)
    assert message in str(e.value)


def test_top_k_above_experts_is_refused():
    with pytest.raises(ValueError, match="model.moe_top_k = 3 exceeds model.moe_experts = 2; set model.moe_top_k"):
        load_config(REPO / "configs/tiny-moe.toml", ["model.moe_experts=2", "model.moe_top_k=3"])


def test_good_layouts_resolve():
    cfg = load_config(REPO / "configs/tiny-moe.toml", ["parallel.ep=8", "parallel.a2a=hierarchical"])
    assert check_layout(cfg, 8, 4).ep == 8
