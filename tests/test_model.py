"""The Llama-style model: shapes, counts, init, and agreement with a plain-torch forward."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dist_train.config import load_config
from dist_train.model import ModelArgs, Transformer, count_params, flops_per_token, init_weights


def tiny_args(**kw) -> ModelArgs:
    base = dict(dim=48, n_layers=3, n_heads=6, n_kv_heads=2, vocab_size=83, ffn_dim=80, max_seq_len=17)
    return ModelArgs(**{**base, **kw})


def naive_forward(m: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """Logits written out with plain torch ops: what the kernel-routed model must equal."""
    a = m.args

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + a.norm_eps) * w

    def rope(x, cos, sin):
        h = x.shape[-1] // 2
        return torch.cat((x[..., :h] * cos - x[..., h:] * sin, x[..., h:] * cos + x[..., :h] * sin), -1)

    b, s = tokens.shape
    pos = torch.arange(s, dtype=torch.float32)
    inv = 1.0 / (a.rope_theta ** (torch.arange(0, a.head_dim, 2, dtype=torch.float32) / a.head_dim))
    cos, sin = torch.outer(pos, inv).cos(), torch.outer(pos, inv).sin()
    h = m.tok_embeddings.weight[tokens]
    for blk in m.layers.values():
        x = norm(h, blk.attention_norm.weight)
        at = blk.attention
        q = (x @ at.wq.weight.T).view(b, s, a.n_heads, a.head_dim).transpose(1, 2)
        k = (x @ at.wk.weight.T).view(b, s, a.n_kv_heads, a.head_dim).transpose(1, 2)
        v = (x @ at.wv.weight.T).view(b, s, a.n_kv_heads, a.head_dim).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        rep = a.n_heads // a.n_kv_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(a.head_dim)
        att = att.masked_fill(torch.triu(torch.ones(s, s, dtype=torch.bool), 1), float("-inf")).softmax(-1)
        h = h + (att @ v).transpose(1, 2).reshape(b, s, -1) @ at.wo.weight.T
        x = norm(h, blk.ffn_norm.weight)
        ff = blk.feed_forward
        h = h + (F.silu(x @ ff.w1.weight.T) * (x @ ff.w3.weight.T)) @ ff.w2.weight.T
    return norm(h, m.norm.weight) @ m.head_weight().T


@pytest.mark.parametrize("tie", [False, True])
def test_forward_and_loss_match_plain_torch(tie):
    torch.manual_seed(0)
    m = Transformer(tiny_args(tie_embeddings=tie)).double()
    init_weights(m, seed=3)
    m.double()
    tokens = torch.randint(0, 83, (2, 17))
    targets = torch.randint(0, 83, (2, 17))
    ref_logits = naive_forward(m, tokens)
    torch.testing.assert_close(m.logits(m(tokens)), ref_logits)
    loss = m(tokens, targets)
    ref = F.cross_entropy(ref_logits.reshape(-1, 83), targets.reshape(-1))
    torch.testing.assert_close(loss, ref)
    grads = torch.autograd.grad(loss, list(m.parameters()))
    ref_grads = torch.autograd.grad(ref, list(m.parameters()))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_parameter_count_matches_modules():
    for tie in (False, True):
        a = tiny_args(tie_embeddings=tie)
        m = Transformer(a)
        assert count_params(a)["total"] == sum(p.numel() for p in m.parameters())


def test_llama_presets_have_published_sizes():
    """Llama 3.2 1B has 1.24B parameters, Llama 3.1 8B 8.03B (Meta's model cards)."""
    for name, billions in (("llama-1b", 1.24), ("llama-8b", 8.03)):
        cfg = load_config(None, [f"model.preset={name}"])
        a = ModelArgs.from_config(cfg.model, 4096, 128256)
        assert abs(count_params(a)["total"] / 1e9 - billions) < 0.01, name
        assert flops_per_token(a, 4096) > 6 * count_params(a)["non_embedding"]


def test_init_is_deterministic_and_scaled():
    a = tiny_args()
    m1, m2 = Transformer(a), Transformer(a)
    init_weights(m1, 7)
    init_weights(m2, 7)
    for (n, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        assert torch.equal(p1, p2), n
    wo = m1.layers["0"].attention.wo.weight.std().item()
    wq = m1.layers["0"].attention.wq.weight.std().item()
    assert wo < wq / 1.5  # residual projections scaled by 1/sqrt(2 n_layers)
    init_weights(m2, 8)
    assert not torch.equal(m1.layers["0"].attention.wq.weight, m2.layers["0"].attention.wq.weight)


def test_vocab_and_ffn_default_from_tokenizer_and_dim():
    cfg = load_config(None)
    a = ModelArgs.from_config(cfg.model, 128, 258)
    assert a.vocab_size == 320 and a.ffn_dim == 192 and a.max_seq_len == 128


def assert_checkpointing_keeps_gradients(m, tokens, targets, policy: str = "full") -> None:
    """Loss and gradients with every block recomputed under `policy` equal those without,
    bit for bit (recomputing runs the same ops on the same values); recompute is left on."""
    loss = m(tokens, targets)
    plain = torch.autograd.grad(loss, list(m.parameters()))
    for block in m.layers.values():
        block.checkpoint = policy
    again = m(tokens, targets)
    ckpt = torch.autograd.grad(again, list(m.parameters()))
    assert torch.equal(loss, again)
    for a, b in zip(plain, ckpt):
        assert torch.equal(a, b)


@pytest.mark.parametrize("policy", ["full", "selective"])
def test_activation_checkpointing_gives_the_same_gradients(policy):
    m = Transformer(tiny_args()).double()
    init_weights(m, seed=1)
    m.double()
    tokens, targets = torch.randint(0, 83, (2, 17)), torch.randint(0, 83, (2, 17))
    assert_checkpointing_keeps_gradients(m, tokens, targets, policy)


def test_selective_recompute_saves_the_matmuls_and_recomputes_the_rest():
    """Under the selective policy the block's backward recomputes elementwise ops but no
    matmul: counted through torch's dispatch, the recomputation holds no mm/addmm/bmm."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    def ops(policy):
        m = Transformer(tiny_args())
        init_weights(m, seed=1)
        for block in m.layers.values():
            block.checkpoint = policy
        loss = m(torch.randint(0, 83, (2, 17)), torch.randint(0, 83, (2, 17)))
        with Ops() as mode:
            loss.backward()
        return mode.seen

    plain, full, selective = ops("none"), ops("full"), ops("selective")
    matmuls = ("mm", "addmm", "bmm")
    assert sum(full.count(k) for k in matmuls) > sum(plain.count(k) for k in matmuls), "full recomputes matmuls"
    assert sum(selective.count(k) for k in matmuls) == sum(plain.count(k) for k in matmuls), "selective saves them"
    assert len(selective) > len(plain), "selective recomputes the elementwise ops"
