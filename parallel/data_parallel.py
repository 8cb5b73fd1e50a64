"""Sharded data parallelism with FSDP2 (`fully_shard`), HSDP on a 2-D mesh.

Each block is its own FSDP unit (gathered just before it runs, freed after), and the root
holds the rest (embedding, final norm, head). With dp_replicate > 1 the mesh is
(dp_replicate, dp_shard): parameters are sharded within a replica group and gradients
are reduce-scattered there, then all-reduced across replicas.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn


def dp_mesh_for(mesh, dp_replicate: int):
    """The mesh FSDP2 shards over: 1-D dp_shard, or 2-D (dp_replicate, dp_shard) for HSDP."""
    return mesh["dp_replicate", "dp_shard"] if dp_replicate > 1 else mesh["dp_shard"]


def apply_fsdp(model: nn.Module, units: Iterable[nn.Module], dp_mesh, *, param_dtype=None,
               reduce_dtype=torch.float32, reshard_after_forward: bool = True,
               root_reshard_after_forward: bool | None = None) -> nn.Module:
    """Shard `model` over `dp_mesh`: each of `units` (blocks, a pipeline stage's head) is
    one FSDP unit, the root takes the rest."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for unit in units:
        fully_shard(unit, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    root = reshard_after_forward if root_reshard_after_forward is None else root_reshard_after_forward
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=root)
    return model


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Whether this backward reduces gradients (off on all but a step's last micro-batch
    trades memory for one reduce-scatter per step). A no-op on an unsharded model."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)
