"""Mixture-of-experts feed-forward layer: a top-k router, SwiGLU experts, auxiliary losses.

Routing: softmax over the router logits (fp32), the top-k experts per token, their k
probabilities renormalised to sum to 1 (k = 1 keeps the raw probability, as Switch does).
Dropless by default: every chosen expert sees the token. With a capacity factor c > 0 each
expert takes at most ceil(c x tokens x k / experts) copies, in token order; the rest are
dropped (the token keeps only its residual path for that slot) and counted.

Auxiliary losses, per MoE layer and micro-batch:
- Switch load balancing (Fedus et al. 2021): E x sum_e f_e x P_e, f_e the fraction of token
  copies routed to expert e, P_e the mean router probability of e;
- router z-loss (Zoph et al. 2022, ST-MoE): mean over tokens of logsumexp(logits)^2.
Both are computed over the micro-batch's tokens. Under tensor (sequence) parallelism each
rank holds a slice of the sequence: the expert counts are all-reduced over `token_group`
and each rank adds its slice's share, so the sum over ranks is the full micro-batch's loss.

The weighted aux loss does not join the language-model loss: `_AuxLossGrad` passes the
layer's output through and, in backward, adds the aux loss's gradient scaled like the
main loss (`aux_grad_scale` = 1 / micro-batches, set by the trainer; 1 under a pipeline
schedule, which divides every gradient by the micro-batches after the backward). So it
reaches the router wherever the layer sits, also on a pipeline stage that computes no loss.

Experts are stored stacked ([n_experts, ...]) so expert parallelism can shard dim 0;
tokens are grouped by expert with `kernels.moe_permute` and combined with
`moe_unpermute`. They run as one grouped matmul (`torch.nn.functional.grouped_mm`) on
CUDA, a loop over experts elsewhere. `dispatcher` (set by parallel/expert_parallel.py)
sends each expert's rows to the rank holding it and brings the outputs back.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from dist_train import kernels as K


def _fp32_or_wider(t):
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _local(t):
    """The local tensor of a DTensor (tensor parallelism), else the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def is_moe_layer(layer_id: int, every: int) -> bool:
    """Every `every`-th block is an MoE block (blocks every-1, 2*every-1, ...)."""
    return (layer_id + 1) % every == 0


# ----------------------------------------------------------------------------- routing


def route(logits: torch.Tensor, top_k: int, capacity_factor: float = 0.0):
    """(probs (T, E), weights (T, k), ids (T, k), kept (T, k) bool) for router logits (T, E)."""
    probs = torch.softmax(_fp32_or_wider(logits), dim=-1)
    weights, ids = probs.topk(top_k, dim=-1)
    if top_k > 1:
        weights = weights / weights.sum(-1, keepdim=True)
    kept = torch.ones_like(ids, dtype=torch.bool)
    if capacity_factor > 0:
        n_experts = logits.shape[-1]
        capacity = math.ceil(capacity_factor * ids.shape[0] * top_k / n_experts)
        flat = ids.reshape(-1)  # token-major: earlier tokens (then lower slots) win
        onehot = F.one_hot(flat, n_experts)
        position = (onehot.cumsum(0) * onehot).sum(-1) - 1
        kept = (position < capacity).view_as(ids)
    return probs, weights, ids, kept


def load_balancing_loss(probs, counts, n_tokens_total: int, top_k: int):
    """Switch aux loss contribution of these tokens: E * sum_e f_e * P_e, with f from the
    (group-wide) expert counts and P_e's sum over these tokens / all tokens of the group."""
    n_experts = probs.shape[-1]
    f = counts.to(probs.dtype) / (n_tokens_total * top_k)
    p = probs.sum(0) / n_tokens_total
    return n_experts * (f * p).sum()


def z_loss(logits, n_tokens_total: int):
    return torch.logsumexp(_fp32_or_wider(logits), dim=-1).pow(2).sum() / n_tokens_total


class _AuxLossGrad(torch.autograd.Function):
    """Identity on `hidden`; backward also sends `scale` as the gradient of `aux`."""

    @staticmethod
    def forward(ctx, hidden, aux, scale: float):
        ctx.scale = scale
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.full((), ctx.scale, dtype=torch.float32, device=grad.device), None


def attach_aux_loss(hidden: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
    if not aux.requires_grad:
        return hidden
    return _AuxLossGrad.apply(hidden, aux, scale)


# ----------------------------------------------------------------------------- experts


def experts_loop(x, counts: list[int], w1, w3, w2):
    """Rows of `x` grouped by expert (counts[e] rows for expert e) through their SwiGLU."""
    outs, start = [], 0
    for e, n in enumerate(counts):
        rows = x[start:start + n]
        outs.append(K.swiglu(rows @ w1[e].t(), rows @ w3[e].t()) @ w2[e].t())
        start += n
    return torch.cat(outs) if outs else x.new_zeros(0, w2.shape[1])


def experts_grouped_mm(x, counts: list[int], w1, w3, w2):
    """The same as `experts_loop` as three grouped matmuls (one kernel each on CUDA)."""
    offs = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)
    h = F.grouped_mm(x, w1.transpose(-2, -1), offs=offs)
    g = F.grouped_mm(x, w3.transpose(-2, -1), offs=offs)
    return F.grouped_mm(K.swiglu(h, g), w2.transpose(-2, -1), offs=offs)


class Experts(nn.Module):
    """`n` SwiGLU experts as stacked weights: w1, w3 (n, hidden, dim), w2 (n, dim, hidden).
    Under expert parallelism the weights are DTensors sharded on dim 0 and this rank runs
    its slice. `grouped_mm`: None = on CUDA only (torch's grouped GEMM wants bf16 there)."""

    def __init__(self, n: int, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n, hidden, dim))
        self.w3 = nn.Parameter(torch.empty(n, hidden, dim))
        self.w2 = nn.Parameter(torch.empty(n, dim, hidden))
        self.grouped_mm: bool | None = None

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        w1, w3, w2 = _local(self.w1), _local(self.w3), _local(self.w2)
        grouped = self.grouped_mm
        if grouped is None:
            grouped = x.is_cuda and x.dtype == torch.bfloat16 and hasattr(F, "grouped_mm")
        if grouped and x.shape[0]:
            return experts_grouped_mm(x, counts, w1.to(x.dtype), w3.to(x.dtype), w2.to(x.dtype))
        return experts_loop(x, counts, w1.to(x.dtype), w3.to(x.dtype), w2.to(x.dtype))


# ----------------------------------------------------------------------------- the layer


class MoEStats:
    """Per-rank sums since the last `take`: tokens routed per expert, dropped copies, and the
    aux losses' local contributions (unweighted). Not module state: never checkpointed."""

    def __init__(self, n_experts: int):
        self.n_experts = n_experts
        self.reset()

    def reset(self) -> None:
        self.load = torch.zeros(self.n_experts, dtype=torch.float64, device="cpu")  # also under a meta-device build
        self.dropped = 0.0
        self.aux = 0.0
        self.z = 0.0

    def add(self, counts, dropped, aux, z) -> None:
        self.load += counts.detach().to("cpu", torch.float64)
        self.dropped += float(dropped)
        self.aux += float(aux)
        self.z += float(z)


class MoE(nn.Module):
    """Router + experts (+ optional shared expert) replacing a block's dense MLP."""

    def __init__(self, dim: int, hidden: int, n_experts: int, top_k: int, *, aux_weight: float = 0.0,
                 z_weight: float = 0.0, capacity_factor: float = 0.0, shared_expert: nn.Module | None = None):
        super().__init__()
        self.n_experts, self.top_k = n_experts, top_k
        self.aux_weight, self.z_weight, self.capacity_factor = aux_weight, z_weight, capacity_factor
        self.router = nn.Linear(dim, n_experts, bias=False)
        self.experts = Experts(n_experts, dim, hidden)
        self.shared_expert = shared_expert
        self.dispatcher = None     # expert parallelism: (rows, counts, experts) -> outputs
        self.token_group = None    # tensor parallelism: ranks holding slices of the same micro-batch
        self.aux_grad_scale = 1.0  # 1 / micro-batches per step (the trainer sets it)
        self.unrecorded_forwards = 0  # forwards left out of the stats (a pipeline's metadata inference)
        self.stats = MoEStats(n_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = _fp32_or_wider(_local(self.router(x)))  # the router may be tensor-parallel (replicated weight)
        xl = _local(x)
        shape, n_experts = xl.shape, self.n_experts
        x2, logits = xl.reshape(-1, shape[-1]), logits.reshape(-1, n_experts)
        probs, weights, ids, kept = route(logits, self.top_k, self.capacity_factor)
        counts = torch.bincount(ids.reshape(-1), minlength=n_experts)
        dropped = ids.numel() - int(kept.sum())
        # dropped copies go to an extra bucket (index E), last after the sort: not computed
        permuted, row_map, per_bucket = K.moe_permute(x2, torch.where(kept, ids, n_experts), n_experts + 1)
        kept_counts = per_bucket[:n_experts]
        rows = permuted[:permuted.shape[0] - dropped]
        if self.dispatcher is None:
            out_rows = self.experts(rows, kept_counts.tolist())
        else:
            out_rows = self.dispatcher(rows, kept_counts, self.experts)
        if dropped:
            out_rows = torch.cat([out_rows, out_rows.new_zeros(dropped, out_rows.shape[-1])])
        y = K.moe_unpermute(out_rows, row_map, weights.to(out_rows.dtype)).view(shape)
        if self.shared_expert is not None:
            y = y + _local(self.shared_expert(x))
        return self._aux(y, logits, probs, counts, dropped)

    def _aux(self, y, logits, probs, counts, dropped):
        group_counts, group_size = counts, 1
        if self.token_group is not None:
            import torch.distributed as dist

            group_size = dist.get_world_size(self.token_group)
            if group_size > 1:
                group_counts = counts.clone()
                dist.all_reduce(group_counts, group=self.token_group)
        n_total = logits.shape[0] * group_size
        aux = load_balancing_loss(probs, group_counts, n_total, self.top_k)
        z = z_loss(logits, n_total)
        # not an activation-checkpoint recompute, nor a pipeline stage's shape inference
        if torch._C._current_graph_task_id() != -1 or logits.device.type == "meta":
            pass
        elif self.unrecorded_forwards:
            self.unrecorded_forwards -= 1
        else:
            self.stats.add(counts, dropped, aux.detach(), z.detach())
        weighted = self.aux_weight * aux + self.z_weight * z
        return attach_aux_loss(y, weighted, self.aux_grad_scale)


def moe_layers(module: nn.Module):
    return [m for m in module.modules() if isinstance(m, MoE)]


def reset_stats(parts) -> None:
    """Forget what the MoE layers routed since the last step (an evaluation's tokens)."""
    for part in parts:
        for m in moe_layers(part):
            m.stats.reset()


def set_aux_grad_scale(parts, scale: float, pipelined: bool = False) -> None:
    """Scale of the aux losses' gradient. A torch pipeline stage runs one forward on
    uninitialised inputs at its first step to learn shapes: `pipelined` keeps it out of
    the stats."""
    for part in parts:
        for m in moe_layers(part):
            m.aux_grad_scale = scale
            m.unrecorded_forwards = 1 if pipelined else 0


# ----------------------------------------------------------------------------- per-step metrics

A2A_KEYS = ("messages", "bytes", "cross_node_messages", "cross_node_bytes")


def add_stats(stats, parts, layer_ids: list[int], n_experts: int, a2a: dict) -> None:
    """This rank's MoE numbers since the last call, as named blocks of the step's
    `StepStats` (the same blocks on every rank): tokens per expert for each MoE layer
    (zeros for layers held elsewhere), dropped copies, aux and z-loss sums, the
    all-to-all counts. Resets the layers' stats."""
    load = torch.zeros(len(layer_ids), n_experts, dtype=torch.float64)
    dropped = aux = z = 0.0
    for part in parts:
        for key, block in part.layers.items():
            ff = block.feed_forward
            if isinstance(ff, MoE):
                s = ff.stats
                load[layer_ids.index(int(key))] += s.load
                dropped, aux, z = dropped + s.dropped, aux + s.aux, z + s.z
                s.reset()
    stats.add("moe.load", *load.view(-1).tolist())
    stats.add("moe.dropped", dropped)
    stats.add("moe.aux", aux)
    stats.add("moe.z", z)
    for k in A2A_KEYS:
        stats.add(f"moe.a2a.{k}", a2a.get(k, 0))


def stats_record(gathered, layer_ids: list[int], n_experts: int, micro_batches: int) -> dict:
    """The "moe" entry of metrics.jsonl from every rank's `add_stats` blocks. Losses are
    unweighted, summed over MoE layers and averaged over the step's micro-batches (all
    data-parallel ranks), like the loss; all-to-all counts are this step's, all ranks."""
    load = gathered.block("moe.load").sum(0).view(len(layer_ids), n_experts)
    return {
        "load": {str(layer): [int(x) for x in row] for layer, row in zip(layer_ids, load.tolist())},
        "dropped_tokens": gathered.total("moe.dropped"),
        "aux_loss": float(gathered.column("moe.aux").sum()) / micro_batches,
        "z_loss": float(gathered.column("moe.z").sum()) / micro_batches,
        "a2a": {k: gathered.total(f"moe.a2a.{k}") for k in A2A_KEYS},
    }
