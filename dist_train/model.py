"""Llama-style decoder: token embedding, RMSNorm, RoPE, grouped-query attention, SwiGLU MLP.

Every norm, rotary embedding, attention, activation and the loss goes through
`dist_train.kernels`, so the Triton/torch choice never touches the block's structure.
Blocks sit in a ModuleDict keyed by layer index so a pipeline stage can drop the ones it
does not own and keep checkpoint names stable. `Block.feed_forward` is built by
`build_feed_forward`, the one place the MoE layer (dist_train/moe.py) plugs in: with
`moe_experts > 0`, every `moe_every`-th block's MLP is a mixture of experts.

Init (documented because layouts must agree on it): every weight matrix ~ N(0, init_std);
the two projections that write into the residual stream (attention `wo`, MLP `w2`) use
init_std / sqrt(2 * n_layers) (GPT-2's residual scaling); norm weights are 1. Each
parameter draws from its own generator seeded by (seed, parameter name), so the values do
not depend on how the model is sharded or split. Stacked expert weights ([n_experts, ...])
are drawn as one full tensor too, so expert parallelism keeps the same values; the
experts' and shared expert's `w2` are residual projections; the router is N(0, init_std).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.utils.checkpoint

from dist_train import kernels as K

MODEL_PRESETS: dict[str, dict] = {
    "tiny": dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=0, vocab_size=0),
    "small": dict(dim=256, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=0, vocab_size=0),
    # Llama-3.2-1B's shape, with its RoPE scaling (rope_type "llama3", factor 32 over 8192)
    "llama-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
                     vocab_size=128256, rope_theta=500000.0, tie_embeddings=True,
                     rope_scaling="llama3", rope_factor=32.0, rope_low_freq_factor=1.0,
                     rope_high_freq_factor=4.0, rope_original_max_len=8192),
    "llama-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                     vocab_size=128256, rope_theta=500000.0),
}


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    ffn_dim: int
    max_seq_len: int
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: str = "none"    # or "llama3" (kernels/rope.py: Llama3Scaling)
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    norm_eps: float = 1e-5
    init_std: float = 0.02
    moe_experts: int = 0          # 0 = dense
    moe_top_k: int = 2
    moe_every: int = 1
    moe_aux_weight: float = 0.0
    moe_z_weight: float = 0.0
    moe_capacity_factor: float = 0.0
    moe_shared_expert: bool = False

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def rope_scaling_spec(self) -> "K.Llama3Scaling | None":
        if self.rope_scaling == "none":
            return None
        return K.Llama3Scaling(self.rope_factor, self.rope_low_freq_factor, self.rope_high_freq_factor,
                               self.rope_original_max_len)

    @classmethod
    def from_config(cls, model_cfg, seq_len: int, tokenizer_vocab: int) -> "ModelArgs":
        vocab = model_cfg.vocab_size or round_up(tokenizer_vocab, 64)
        ffn = model_cfg.ffn_dim or round_up(int(8 * model_cfg.dim / 3), 64)
        return cls(dim=model_cfg.dim, n_layers=model_cfg.n_layers, n_heads=model_cfg.n_heads,
                   n_kv_heads=model_cfg.n_kv_heads, vocab_size=vocab, ffn_dim=ffn, max_seq_len=seq_len,
                   tie_embeddings=model_cfg.tie_embeddings, rope_theta=model_cfg.rope_theta,
                   rope_scaling=model_cfg.rope_scaling, rope_factor=model_cfg.rope_factor,
                   rope_low_freq_factor=model_cfg.rope_low_freq_factor,
                   rope_high_freq_factor=model_cfg.rope_high_freq_factor,
                   rope_original_max_len=model_cfg.rope_original_max_len, norm_eps=model_cfg.norm_eps, init_std=model_cfg.init_std,
                   moe_experts=model_cfg.moe_experts, moe_top_k=model_cfg.moe_top_k, moe_every=model_cfg.moe_every,
                   moe_aux_weight=model_cfg.moe_aux_weight, moe_z_weight=model_cfg.moe_z_weight,
                   moe_capacity_factor=model_cfg.moe_capacity_factor,
                   moe_shared_expert=model_cfg.moe_shared_expert)

    def moe_layer_ids(self) -> list[int]:
        from .moe import is_moe_layer

        if not self.moe_experts:
            return []
        return [i for i in range(self.n_layers) if is_moe_layer(i, self.moe_every)]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return K.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    """Causal grouped-query self-attention. Head counts are read from the projections'
    output sizes, so a tensor-parallel shard simply holds fewer heads."""

    def __init__(self, a: ModelArgs):
        super().__init__()
        self.head_dim = a.head_dim
        self.wq = nn.Linear(a.dim, a.n_heads * a.head_dim, bias=False)
        self.wk = nn.Linear(a.dim, a.n_kv_heads * a.head_dim, bias=False)
        self.wv = nn.Linear(a.dim, a.n_kv_heads * a.head_dim, bias=False)
        self.wo = nn.Linear(a.n_heads * a.head_dim, a.dim, bias=False)

    def forward(self, x, cos, sin, docs=None):
        """`docs`: None, or the (batch, seq) document ids of packed sequences (attention stays
        inside each document; cos/sin are then the per-row tables at in-document positions,
        (batch, 1, seq, head_dim / 2), see `Transformer.forward`)."""
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        if docs is None:
            cos, sin = cos[:s], sin[:s]
        q, k = K.apply_rope(q, k, cos, sin)
        out = K.flash_attention(q, k, v, causal=True, doc_ids=docs)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    """SwiGLU MLP: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w2(K.swiglu(self.w1(x), self.w3(x)))


def build_feed_forward(a: ModelArgs, layer_id: int) -> nn.Module:
    """The MLP of block `layer_id`: dense, or on MoE layers a mixture of experts."""
    if layer_id not in a.moe_layer_ids():
        return FeedForward(a.dim, a.ffn_dim)
    from .moe import MoE

    return MoE(a.dim, a.ffn_dim, a.moe_experts, a.moe_top_k, aux_weight=a.moe_aux_weight, z_weight=a.moe_z_weight,
               capacity_factor=a.moe_capacity_factor,
               shared_expert=FeedForward(a.dim, a.ffn_dim) if a.moe_shared_expert else None)


class Head(nn.Module):
    """Output projection fused with the loss: forward(hidden, targets) -> mean loss.
    Its own module so a pipeline's loss function (and FSDP, as its own unit) can call it;
    tensor parallelism swaps `loss_fn` for the vocab-parallel one."""

    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, dim))
        self.loss_fn = K.linear_cross_entropy  # (hidden, weight, targets) -> mean loss

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(hidden, self.weight, targets)


# Selective recompute keeps what is costly to redo (matmul and attention outputs: most of
# the FLOPs) and recomputes the rest (norms, activations, RoPE: cheap, memory-bound).
_SAVED_OPS = ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention",
              "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
              "_scaled_dot_product_flash_attention_for_cpu")


def _keep_matmuls():
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    saved = {getattr(torch.ops.aten, name).default for name in _SAVED_OPS if hasattr(torch.ops.aten, name)}

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


class Block(nn.Module):
    def __init__(self, a: ModelArgs, layer_id: int):
        super().__init__()
        self.attention_norm = RMSNorm(a.dim, a.norm_eps)
        self.attention = Attention(a)
        self.ffn_norm = RMSNorm(a.dim, a.norm_eps)
        self.feed_forward = build_feed_forward(a, layer_id)
        self.checkpoint = "none"  # recompute in backward: none, full, selective (train.activation_checkpoint)

    def forward(self, x, cos, sin, docs=None):
        if self.checkpoint != "none" and torch.is_grad_enabled():
            # full: checkpoint's default context (torch.compile cannot trace one passed in)
            extra = {"context_fn": _keep_matmuls} if self.checkpoint == "selective" else {}
            return torch.utils.checkpoint.checkpoint(self._forward, x, cos, sin, docs, use_reentrant=False, **extra)
        return self._forward(x, cos, sin, docs)

    def _forward(self, x, cos, sin, docs=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, docs)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Embedding -> blocks -> final norm; the head is applied by `loss` (fused with the
    cross-entropy) or `logits`. A pipeline stage may set `tok_embeddings`, `norm` or
    `output` to None and delete blocks; forward then passes activations through."""

    def __init__(self, a: ModelArgs):
        super().__init__()
        self.args = a
        self.tok_embeddings = nn.Embedding(a.vocab_size, a.dim)
        self.layers = nn.ModuleDict({str(i): Block(a, i) for i in range(a.n_layers)})
        self.norm = RMSNorm(a.dim, a.norm_eps)
        self.output = None if a.tie_embeddings else Head(a.dim, a.vocab_size)
        self.loss_fn = K.linear_cross_entropy  # the tied head's loss: (hidden, weight, targets)
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)

    def init_buffers(self, device=None) -> None:
        cos, sin = K.rope_tables(self.args.max_seq_len, self.args.head_dim, self.args.rope_theta, device,
                                 scaling=self.args.rope_scaling_spec())
        self.rope_cos, self.rope_sin = cos, sin

    def head_weight(self) -> torch.Tensor:
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, *,
                docs: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states, or with `targets` the mean next-token loss. The loss is computed
        inside forward so that wrappers which gather parameters around forward (FSDP2)
        have the head's weight in hand. `docs` (data.document_mask): the (batch, seq)
        document ids of the packed rows (`kernels.document_ids`); every block's attention
        stays inside each document and RoPE positions restart at each document's start.
        A pipeline stage other than the first gets them as a keyword, like the first."""
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        if self.rope_cos.numel() == 0 or self.rope_cos.device != h.device:
            self.init_buffers(h.device)
        cos, sin = self.rope_cos, self.rope_sin
        if docs is not None:
            docs = docs.to(h.device)
            pos = K.document_bounds(docs)[2].long()
            cos, sin = cos[pos][:, None], sin[pos][:, None]  # (batch, 1, seq, head_dim / 2)
        for block in self.layers.values():
            h = block(h, cos, sin, docs)
        h = self.norm(h) if self.norm is not None else h
        return h if targets is None else self.loss(h, targets)

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy, fused with the head: full logits never exist."""
        if self.output is not None:
            return self.output(hidden, targets)
        return self.loss_fn(hidden, self.tok_embeddings.weight, targets)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.head_weight().t()


def _residual_out(name: str) -> bool:
    return name.endswith(("attention.wo.weight", "feed_forward.w2.weight", "experts.w2", "shared_expert.w2.weight"))


def param_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


@torch.no_grad()
def init_weights(model: nn.Module, seed: int, args: ModelArgs | None = None) -> None:
    """Initialise in place, layout-independently (see module docstring).

    Works on plain, FSDP2-sharded and tensor-parallel (DTensor) parameters: each full
    tensor is drawn on the CPU and this rank keeps its own shard of it. Also on a module
    holding some pipeline stages (pass `args`); RoPE tables are built at first forward.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    a = args or model.args
    for name, p in model.named_parameters():
        if p.dim() == 1:
            full = torch.ones(p.shape)
        else:
            std = a.init_std / math.sqrt(2 * a.n_layers) if _residual_out(name) else a.init_std
            g = torch.Generator().manual_seed(param_seed(seed, name))
            full = torch.randn(p.shape, generator=g) * std
        if isinstance(p, DTensor):
            local = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
            p.to_local().copy_(local)
        else:
            p.copy_(full)


def _ffn_params(a: ModelArgs, layer_id: int, active: bool) -> int:
    """MLP parameters of one block; `active`: those one token uses (top-k experts)."""
    mlp = 3 * a.dim * a.ffn_dim
    if layer_id not in a.moe_layer_ids():
        return mlp
    experts = a.moe_top_k if active else a.moe_experts
    return a.dim * a.moe_experts + experts * mlp + (mlp if a.moe_shared_expert else 0)


def count_params(a: ModelArgs) -> dict:
    """Parameters in total, without the embedding (the usual FLOP-count convention), and
    active per token (MoE: router + top-k experts + shared expert); from the shapes, so it
    is the same on every rank whatever the sharding."""
    embed = a.vocab_size * a.dim * (1 if a.tie_embeddings else 2)
    attn = 2 * a.dim + a.dim * a.n_heads * a.head_dim * 2 + a.dim * a.n_kv_heads * a.head_dim * 2  # + norms
    total = embed + a.n_layers * attn + a.dim + sum(_ffn_params(a, i, False) for i in range(a.n_layers))
    active = embed + a.n_layers * attn + a.dim + sum(_ffn_params(a, i, True) for i in range(a.n_layers))
    return {"total": total, "non_embedding": total - a.vocab_size * a.dim, "active": active}


def flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 x matmul parameters (head included)
    plus causal attention scores and values, 12 x n_layers x dim x seq_len (Kaplan et al.
    2020, PaLM appendix B). MoE layers count the parameters a token is routed through."""
    matmul = (args.n_layers * (2 * args.dim * args.n_heads * args.head_dim
                               + 2 * args.dim * args.n_kv_heads * args.head_dim)
              + sum(_ffn_params(args, i, True) for i in range(args.n_layers))
              + args.vocab_size * args.dim)
    return 6.0 * matmul + 12.0 * args.n_layers * args.dim * seq_len
