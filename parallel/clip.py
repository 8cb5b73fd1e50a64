"""Global gradient-norm clipping that is correct across shards.

Gradients of sharded (DTensor) parameters hold only this rank's piece. torch's
`get_total_norm` keeps each shard's norm as a partial DTensor and stacks them, so one
`full_tensor()` reduces the total over the sharded dims with a single collective, and
the result equals the single-process norm. (Squaring the per-parameter norms first
would force one all-reduce per parameter.)
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
    grads = [p.grad for p in params]
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True) if grads else torch.zeros(())
    if isinstance(total, DTensor):
        total = total.full_tensor()
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        sq = total.float() ** 2
        dist.all_reduce(sq, group=pp_group)
        total = sq.sqrt()
    if max_norm > 0 and params:  # takes the parameters (it scales their .grad), not the grads
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
    return total
