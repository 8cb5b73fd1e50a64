"""Global gradient-norm clipping that is correct across shards.

Gradients of sharded (DTensor) parameters hold only this rank's piece. torch's
`get_total_norm` keeps each shard's norm as a partial DTensor and stacks them, so one
`full_tensor()` reduces the total over the sharded dims with a single collective, and
the result equals the single-process norm. (Squaring the per-parameter norms first
would force one all-reduce per parameter.) Expert-parallel weights live on another mesh
than the rest, and DTensors of different meshes cannot be stacked: parameters are grouped
by their gradient's mesh, one norm (one collective) per group, and the squares summed.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float, pp_group=None) -> torch.Tensor:
    """Clip in place (max_norm = 0: measure only); returns the total norm as a plain tensor.
    With pipeline stages on other ranks, pass the pp group: the squared norms of all
    stages are summed over it (one more all-reduce)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    params = [p for p in parameters if p.grad is not None]
    groups: dict = {}
    for p in params:
        groups.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
    norms = []
    for group in groups.values():
        n = torch.nn.utils.get_total_norm([p.grad for p in group], norm_type=2.0, foreach=True)
        norms.append(n.full_tensor() if isinstance(n, DTensor) else n)
    if len(norms) == 1:
        total = norms[0]
    else:
        total = torch.stack([n.float() for n in norms]).square().sum().sqrt() if norms else torch.zeros(())
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        sq = total.float() ** 2
        dist.all_reduce(sq, group=pp_group)
        total = sq.sqrt()
    if max_norm > 0 and params:  # takes the parameters (it scales their .grad), not the grads
        for group in groups.values():
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total, foreach=True)
    return total
