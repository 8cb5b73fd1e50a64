"""Expert parallelism: each MoE layer's experts split over the `ep` group, tokens sent to
the rank holding their expert by an all-to-all and brought back by the reverse one.

Carving the ep group from the mesh (TorchTitan's choice: ep borrows the innermost
data-parallel and tensor-parallel ranks). The ranks of (dp_replicate, dp_shard, tp) are
flattened (tp fastest) and unflattened as (edp, ep): ep groups are blocks of ep consecutive
ranks, so a small ep stays inside a node, and an ep that spans nodes spans them evenly.
Every rank of the block holds different tokens (tp ranks hold different sequence slices
under sequence parallelism), so ep can use tp's ranks too. `edp` groups the ranks holding
the same experts (size dp_replicate x dp_shard x tp / ep); FSDP2 shards the expert weights
over it (after ep has sharded them over the experts dim), as a 1-D mesh even with
dp_replicate > 1.

Gradient scale. Each rank's loss is the mean over its own tokens, and dense weights are
averaged over the dp = dp_replicate x dp_shard data-parallel ranks. An expert's gradient
on one rank already sums the contributions of every token routed to it from the whole ep
group, and the edp reduce-scatter sums over the rest, so each token counts once in the
sum; dividing by dp (not by the edp size FSDP would use) gives the single-process
gradient: `set_gradient_divide_factor(dp)`, with sum-only collectives (gloo has no
pre-multiplied sum).

Dispatch per layer: tokens arrive grouped by global expert (`moe_permute`); the counts per
(destination rank, expert) go first (an all-to-all of E/ep counts per rank), the rows
follow with uneven splits, are regrouped by local expert, run, regrouped back, and return
by the reversed plan (flat or hierarchical, parallel/hierarchical_all_to_all.py).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .hierarchical_all_to_all import Topology, exchange_counts, run_plan


def expert_meshes(mesh, dims):
    """(edp_mesh, ep_mesh): 1-D meshes from the same root as `mesh`, see module docstring."""
    width = dims.dp_replicate * dims.dp_shard * dims.tp
    flat = mesh["dp_replicate", "dp_shard", "tp"]._flatten("dp_tp")
    two = flat._unflatten(0, (width // dims.ep, dims.ep), ("edp", "ep"))
    return two["edp"], two["ep"]


class ExpertDispatcher:
    """Called by an MoE layer as dispatcher(rows, counts, run_experts): `rows` grouped by
    global expert, counts (E,) per expert, `run_experts(rows, counts_per_local_expert)` this
    rank's experts; returns the experts' outputs for the given rows, in order."""

    def __init__(self, topo: Topology, n_experts: int):
        self.topo = topo
        self.n_local = n_experts // topo.size

    def __call__(self, rows: torch.Tensor, counts: torch.Tensor, run_experts) -> torch.Tensor:
        P, E_l = self.topo.size, self.n_local
        recv, plan = exchange_counts(counts.view(P, E_l), self.topo)
        x = run_plan(rows, plan, self.topo)             # from each source, its rows per local expert
        order, inverse = _by_local_expert(recv)
        y = run_experts(x.index_select(0, order), recv.sum(0).tolist())
        return run_plan(y.index_select(0, inverse), plan.reversed(), self.topo)


def _by_local_expert(recv: torch.Tensor):
    """Row order that turns (source, local expert) groups into (local expert, source)
    groups, and its inverse. recv (P, E_l): rows per (source, local expert)."""
    P, E_l = recv.shape
    seg = torch.arange(P * E_l, device=recv.device)
    key = (seg % E_l) * P + seg // E_l
    row_key = torch.repeat_interleave(key, recv.reshape(-1))
    order = torch.sort(row_key, stable=True).indices
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return order, inverse


def shard_expert_weights(module: nn.Module, ep_mesh) -> None:
    """Shard a module of stacked expert weights ([n_experts, ...] parameters) on dim 0 over
    `ep_mesh`, as DTensors (so checkpoints hold the full tensors)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    for name, p in list(module.named_parameters(recurse=False)):
        module.register_parameter(name, nn.Parameter(distribute_tensor(p, ep_mesh, [Shard(0)])))


def fully_shard_experts(module: nn.Module, edp_mesh, dp_size: int, *, param_dtype=None,
                        reduce_dtype=torch.float32, reshard_after_forward: bool = True) -> None:
    """Make a module of expert weights its own FSDP2 unit over `edp_mesh` (before its
    block is wrapped), with gradients divided by the data-parallel size (module docstring)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    unit = fully_shard(module, mesh=edp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    unit.set_gradient_divide_factor(float(dp_size))
    # with one rank there is no collective, and torch then divides once by itself
    unit.set_force_sum_reduction_for_comms(edp_mesh.size() > 1)
