"""`ParallelDims`: the degrees of each parallelism and the one device mesh built from them.

World = diloco x pp x dp_replicate x dp_shard x tp, outermost first, so tensor-parallel
peers are neighbouring ranks (same node). Every dimension is in the mesh even at size 1,
so code can always ask for `mesh["dp_shard"]`; "batch" (diloco x dp_replicate x dp_shard
flattened: every replica trains its own share) is the group the data is split over. `ep`
borrows dp_shard x tp ranks and adds no dimension.
"""
from __future__ import annotations

from dataclasses import dataclass

MESH_DIMS = ("diloco", "pp", "dp_replicate", "dp_shard", "tp")


class MeshError(ValueError):
    """The parallel degrees do not fit the world size; the message names the field."""


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int
    ep: int
    diloco: int
    world_size: int

    @classmethod
    def resolve(cls, world_size: int, *, dp_replicate=1, dp_shard=-1, tp=1, pp=1, ep=1, diloco=1) -> "ParallelDims":
        """Fill dp_shard = -1 with every rank the other dimensions leave, then validate."""
        for name, v in (("dp_replicate", dp_replicate), ("tp", tp), ("pp", pp), ("ep", ep), ("diloco", diloco)):
            if v < 1:
                raise MeshError(f"parallel.{name} = {v}: must be >= 1")
        others = dp_replicate * tp * pp * diloco
        if dp_shard == -1:
            if world_size % others:
                raise MeshError(
                    f"world size {world_size} is not divisible by diloco x pp x dp_replicate x tp = {others}; "
                    f"launch a multiple of {others} ranks or change those degrees")
            dp_shard = world_size // others
        elif dp_shard < 1:
            raise MeshError(f"parallel.dp_shard = {dp_shard}: must be >= 1, or -1 for every rank left")
        dims = cls(dp_replicate, dp_shard, tp, pp, ep, diloco, world_size)
        dims.validate()
        return dims

    def validate(self) -> None:
        product = self.diloco * self.pp * self.dp_replicate * self.dp_shard * self.tp
        if product != self.world_size:
            raise MeshError(
                f"diloco x pp x dp_replicate x dp_shard x tp = {self.diloco} x {self.pp} x {self.dp_replicate} x "
                f"{self.dp_shard} x {self.tp} = {product}, but the job has {self.world_size} ranks; "
                "set parallel.dp_shard = -1 to fill the rest, or launch that many ranks")
        if (self.dp_shard * self.tp) % self.ep:
            raise MeshError(f"parallel.ep = {self.ep} must divide dp_shard x tp = {self.dp_shard * self.tp} "
                            "(expert parallelism borrows those ranks); choose ep dividing it")

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.diloco, self.pp, self.dp_replicate, self.dp_shard, self.tp)

    @property
    def dp_size(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def batch_ranks(self) -> int:
        """Ranks the global batch is split over: every data-parallel rank of every replica."""
        return self.diloco * self.dp_size

    @property
    def fsdp_enabled(self) -> bool:
        return self.dp_size > 1

    def build_mesh(self, device_type: str, ranks=None):
        """One DeviceMesh over all ranks with named dims, and the flattened "batch" mesh
        (diloco x dp_replicate x dp_shard) the data is split over: returns (mesh, batch_mesh).
        `ranks` (an int tensor of `shape`, from a placement) says which rank holds each
        coordinate; None = row-major by rank. torch builds every group with its ranks sorted,
        so ranks must increase along each dim (dist_train/topology.py checks it)."""
        from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

        if ranks is None:
            mesh = init_device_mesh(device_type, self.shape, mesh_dim_names=MESH_DIMS)
        else:
            mesh = DeviceMesh(device_type, ranks, mesh_dim_names=MESH_DIMS)
        return mesh, mesh["diloco", "dp_replicate", "dp_shard"]._flatten("batch")

    def replica_mesh(self, mesh):
        """The ranks of this rank's replica (every dim but diloco), flattened."""
        return mesh["pp", "dp_replicate", "dp_shard", "tp"]._flatten("replica")

    def describe(self) -> str:
        text = " x ".join(f"{n}={s}" for n, s in zip(MESH_DIMS, self.shape) if s > 1) or "single process"
        return text + (f" (ep={self.ep})" if self.ep > 1 else "")
