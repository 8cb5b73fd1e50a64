"""Apply the parallelisms to the model in TorchTitan's fixed order, each with the mesh it
needs: pipeline split (pp), tensor + sequence parallel (tp), expert parallel (ep, experts
then FSDP-sharded over the ranks holding the same experts), sharded data parallel
(dp_shard / dp_replicate). Returns what the trainer steps and checkpoints."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from dist_train.parallel.data_parallel import apply_fsdp, dp_mesh_for
from dist_train.parallel.dims import ParallelDims
from dist_train.parallel.expert_parallel import apply_ep, expert_meshes, shard_experts
from dist_train.parallel.hierarchical_all_to_all import Topology, build_topology
from dist_train.parallel.pipeline import (LocalModel, build_schedule, make_stages, plan_stages,
                                          prune_to_stage)
from dist_train.parallel.tensor_parallel import apply_tp, check_tp_shapes

from .config import Config, ConfigError
from .distributed import RankEnv
from .model import ModelArgs, Transformer, init_weights


def is_pipelined(cfg: Config, dims: ParallelDims) -> bool:
    """Pipeline stages are used for pp > 1, and for layered accumulation at any pp."""
    return dims.pp > 1 or cfg.parallel.pp_schedule == "layered"


def check_pipeline(cfg: Config, dims: ParallelDims, n_micro: int) -> None:
    if not is_pipelined(cfg, dims):
        return
    plan_stages(cfg.model.n_layers, dims.pp, cfg.parallel.pp_schedule)  # raises with the fix
    if cfg.model.tie_embeddings:
        raise ConfigError("model.tie_embeddings = true cannot be used with pipeline stages (parallel.pp > 1 or "
                          "pp_schedule = 'layered'): the embedding and the head sit on different stages; "
                          "set model.tie_embeddings = false")
    if n_micro < dims.pp:
        raise ConfigError(f"each data-parallel rank runs {n_micro} micro-batch(es) per step, fewer than "
                          f"parallel.pp = {dims.pp} pipeline stages; raise train.global_batch or lower "
                          "train.micro_batch")


def check_moe(cfg: Config, dims: ParallelDims, local_world_size: int | None) -> None:
    """Expert-parallel settings that cannot work, named with their fix."""
    m, p = cfg.model, cfg.parallel
    if dims.ep > 1 and not m.moe_experts:
        raise ConfigError(f"parallel.ep = {dims.ep} needs mixture-of-experts layers: set model.moe_experts "
                          "(a multiple of ep), or parallel.ep = 1")
    if m.moe_experts and m.moe_experts % dims.ep:
        raise ConfigError(f"model.moe_experts = {m.moe_experts} is not divisible by parallel.ep = {dims.ep} "
                          "(each expert-parallel rank holds the same number of experts); choose ep dividing "
                          f"{m.moe_experts}, or a multiple of ep experts")
    if p.a2a == "hierarchical" and dims.ep > 1 and local_world_size:
        if dims.world_size % local_world_size:
            raise ConfigError(f"parallel.a2a = 'hierarchical': {dims.world_size} ranks do not split into nodes of "
                              f"{local_world_size} (LOCAL_WORLD_SIZE); launch whole nodes or set parallel.a2a = 'flat'")
        # ep groups are blocks of ep consecutive ranks (parallel/expert_parallel.py): every group must
        # split into nodes the same way
        if dims.ep % local_world_size and local_world_size % dims.ep:
            raise ConfigError(f"parallel.a2a = 'hierarchical' with parallel.ep = {dims.ep} on nodes of "
                              f"{local_world_size} ranks (LOCAL_WORLD_SIZE): ep must be a multiple or a divisor "
                              "of the ranks per node; change parallel.ep or --nodes, or set parallel.a2a = 'flat'")


@dataclass
class Parallelized:
    view: nn.Module                   # this rank's model: what the optimizer and checkpoints see
    parts: list[nn.Module]            # pipeline stages held here (the model itself if not pipelined)
    schedule: object | None = None    # the pipelining schedule, when pipelined
    first: bool = True                # holds the first stage (feeds the tokens)
    last: bool = True                 # holds the last stage (computes the loss)
    pp_group: object | None = None
    stage_ids: list[int] = field(default_factory=list)
    ep_topology: Topology | None = None  # the expert-parallel group (its all-to-all counts)


def parallelize(args: ModelArgs, cfg: Config, dims: ParallelDims, mesh, device: torch.device,
                param_dtype, n_micro: int) -> Parallelized:
    with torch.device("meta"):
        model = Transformer(args)
    if dims.tp > 1:
        check_tp_shapes(dims.tp, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads, ffn_dim=args.ffn_dim,
                        vocab_size=args.vocab_size)
    schedule_name = cfg.parallel.pp_schedule
    pipelined = is_pipelined(cfg, dims)
    if pipelined:
        plan = plan_stages(args.n_layers, dims.pp, schedule_name)
        pp_mesh = mesh["pp"]
        stage_ids = plan.local_stages(pp_mesh.get_local_rank())
        parts = [prune_to_stage(model, plan, s) for s in stage_ids]
    else:
        parts, stage_ids = [model], []
    dp_mesh = dp_mesh_for(mesh, dims.dp_replicate) if dims.fsdp_enabled else None
    moe_sharded = bool(args.moe_experts) and dims.dp_replicate * dims.dp_shard * dims.tp > 1
    topo = None
    if moe_sharded:
        edp_mesh, ep_mesh = expert_meshes(mesh, dims)
        if dims.ep > 1:
            topo = build_topology(ep_mesh, RankEnv.from_environ().local_world_size,
                                  hierarchical=cfg.parallel.a2a == "hierarchical")
    for part in parts:
        for block in part.layers.values():
            block.checkpoint = cfg.train.activation_checkpoint
        if dims.tp > 1:
            apply_tp(part, mesh["tp"])
        if topo is not None:
            apply_ep(part, ep_mesh, topo)
        if moe_sharded:
            shard_experts(part, edp_mesh, dims.dp_size, param_dtype=param_dtype,
                          reshard_after_forward=not (pipelined and schedule_name == "layered"))
        if dp_mesh is not None:
            _shard(part, dp_mesh, pipelined, schedule_name, param_dtype)
        part.to_empty(device=device)
    view = LocalModel(parts) if pipelined else model
    init_weights(view, cfg.run.seed, args)
    if not pipelined:
        return Parallelized(view, parts, ep_topology=topo)
    last_part = parts[-1]
    stages = make_stages(parts, stage_ids, plan, pp_mesh, device)
    schedule = build_schedule(schedule_name, stages, n_micro, loss_fn=lambda h, t: last_part.loss(h, t))
    return Parallelized(view, parts, schedule, first=0 in stage_ids, last=plan.num_stages - 1 in stage_ids,
                        pp_group=pp_mesh.get_group(), stage_ids=stage_ids, ep_topology=topo)


def _shard(part: nn.Module, dp_mesh, pipelined: bool, schedule: str, param_dtype) -> None:
    """FSDP units of one model or stage.

    Not pipelined, or gpipe/1f1b/interleaved stages: every block is a unit, gathered for
    each micro-batch. Layered (breadth-first) stages: the stage is the unit and is kept
    gathered across its micro-batches, so it is gathered once for the forward and once for
    the backward of the whole step; the pipelining runtime unshards and reshards it.
    A stage's head is its own unit, because the schedule's loss function calls it outside
    the stage's forward. The root is never resharded after forward: without a pipeline the
    loss is computed inside forward, so backward needs the root's weights (head, final
    norm) at once and would gather them straight back (measured: 7% of a step with
    dp_shard=4, bench/_dp_paired.py), while peak memory is the same either way.
    """
    head = [part.output] if pipelined and getattr(part, "output", None) is not None else []
    if schedule == "layered" and pipelined:
        apply_fsdp(part, head, dp_mesh, param_dtype=param_dtype, reshard_after_forward=False)
    else:
        apply_fsdp(part, list(part.layers.values()) + head, dp_mesh, param_dtype=param_dtype,
                   root_reshard_after_forward=False)
