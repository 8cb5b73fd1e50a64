"""Pipeline parallelism on the mesh's `pp` dim with torch.distributed.pipelining, and
layered gradient accumulation.

Placement. `gpipe` and `1f1b` cut the blocks into pp contiguous stages, one per rank;
`interleaved` into pp x 2 contiguous virtual stages, stage s on rank s mod pp. `layered`
uses the *modular* placement of Lamy-Poirier, "Layered gradient accumulation and modular
pipeline parallelism" (2021): every block is its own stage and block i sits on rank
i mod pp, so a micro-batch cycles through all ranks every pp blocks. It runs breadth
first (`ScheduleLoopedBFS`; "Breadth-First Pipeline Parallelism", Lamy-Poirier 2022):
each stage runs all its micro-batches before the next stage runs. With sharded data
parallelism that is layered gradient accumulation: a stage's weights are gathered once
for the forward and once for the backward of the whole step, and its gradients are
reduce-scattered once, as soon as its last micro-batch is done - instead of once per
micro-batch. The paper reports the data movement of sharded data parallelism cut by the
number of micro-batches and the shortest training time halved. With pp = 1 the same
schedule is layered accumulation without a pipeline (all stages on one rank; adjacent
stages hand activations over locally, no send/recv).

This module plans stages by block index and builds the torch schedule over the stage
modules it is handed; cutting a model into those modules (which parts sit on the first
and last stage) is the model's business (dist_train/parallelize.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .dims import MeshError

SCHEDULES = ("gpipe", "1f1b", "interleaved", "layered")
INTERLEAVE = 2  # virtual stages per rank for the interleaved schedule


@dataclass(frozen=True)
class StagePlan:
    """Which blocks each stage holds and which pp rank runs it."""

    stage_layers: tuple[tuple[int, ...], ...]
    stage_rank: tuple[int, ...]

    @property
    def num_stages(self) -> int:
        return len(self.stage_layers)

    def local_stages(self, pp_rank: int) -> list[int]:
        return [s for s, r in enumerate(self.stage_rank) if r == pp_rank]


def plan_stages(n_layers: int, pp: int, schedule: str) -> StagePlan:
    if schedule not in SCHEDULES:
        raise MeshError(f"parallel.pp_schedule = {schedule!r}: use one of {', '.join(SCHEDULES)}")
    if schedule == "layered":
        n_stages = n_layers
    elif schedule == "interleaved":
        n_stages = pp * INTERLEAVE
    else:
        n_stages = pp
    if n_layers % n_stages or n_stages % pp:
        need = {"layered": f"a multiple of pp = {pp}", "interleaved": f"a multiple of pp x {INTERLEAVE} = {n_stages}"}
        raise MeshError(f"model.n_layers = {n_layers} cannot be split for parallel.pp = {pp} with "
                        f"pp_schedule = {schedule!r}: n_layers must be {need.get(schedule, f'a multiple of pp = {pp}')}")
    per = n_layers // n_stages
    layers = tuple(tuple(range(s * per, (s + 1) * per)) for s in range(n_stages))
    return StagePlan(layers, tuple(s % pp for s in range(n_stages)))


def build_schedule(name: str, stages: list, n_microbatches: int, loss_fn):
    """The torch schedule for `name` over this rank's PipelineStages."""
    from torch.distributed.pipelining import (Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B,
                                              ScheduleLoopedBFS)

    if name in ("gpipe", "1f1b"):
        cls = ScheduleGPipe if name == "gpipe" else Schedule1F1B
        return cls(stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn)
    cls = ScheduleInterleaved1F1B if name == "interleaved" else ScheduleLoopedBFS
    return cls(stages, n_microbatches=n_microbatches, loss_fn=loss_fn)


def make_stages(parts: list[nn.Module], stage_ids: list[int], plan: StagePlan, pp_mesh, device: torch.device):
    from torch.distributed.pipelining import PipelineStage

    return [PipelineStage(part, stage_index=s, num_stages=plan.num_stages, device=device,
                          group=pp_mesh.get_group()) for part, s in zip(parts, stage_ids)]
