"""How the Llama-style model (model.py, moe.py) is parallelised: the plans that name its
modules, applied in TorchTitan's fixed order, each with the mesh it needs: pipeline split
(pp), tensor + sequence parallel (tp), expert parallel (ep, experts then FSDP-sharded over
the ranks holding the same experts), sharded data parallel (dp_shard / dp_replicate).

`dist_train.parallel` holds the mechanisms (dims, FSDP, TP styles and the vocab-parallel
loss, schedules, all-to-all plans, the expert dispatcher) and knows no model; this module
is where the model's names (`tok_embeddings`, `layers`, `attention.wq`, `feed_forward`,
`norm`, `output`) meet them, as TorchTitan keeps `parallelize_llama` beside its model.
The layout was checked before (dist_train/layout.py); nothing here re-checks it.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from dist_train.parallel.data_parallel import apply_fsdp, dp_mesh_for
from dist_train.parallel.dims import ParallelDims
from dist_train.parallel.expert_parallel import (ExpertDispatcher, expert_meshes, fully_shard_experts,
                                                 shard_expert_weights)
from dist_train.parallel.hierarchical_all_to_all import Topology, build_topology
from dist_train.parallel.pipeline import StagePlan, build_schedule, make_stages, plan_stages
from dist_train.parallel.tensor_parallel import vocab_parallel_loss

from .config import Config
from .distributed import RankEnv
from .layout import is_pipelined
from .model import ModelArgs, Transformer, init_weights
from .moe import MoE, moe_layers


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
                param_dtype, n_micro: int, reduce_dtype=torch.float32) -> Parallelized:
    """This rank's part of the model, parallelised in TorchTitan's order: pipeline split,
    tensor parallel, experts, activation checkpointing (a block attribute), torch.compile
    per block, FSDP (the experts' units, then blocks and root); then materialised and
    initialised. `param_dtype` / `reduce_dtype` are FSDP2's MixedPrecisionPolicy (None:
    parameters gathered as they are, fp32)."""
    with torch.device("meta"):
        model = Transformer(args)
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
        if cfg.train.compile:
            apply_compile(part, cfg.train.compile_backend)
        if moe_sharded:
            for moe in moe_layers(part):
                fully_shard_experts(moe.experts, edp_mesh, dims.dp_size, param_dtype=param_dtype,
                                    reduce_dtype=reduce_dtype,
                                    reshard_after_forward=not (pipelined and schedule_name == "layered"))
        if dp_mesh is not None:
            _shard(part, dp_mesh, pipelined, schedule_name, param_dtype, reduce_dtype)
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


# ----------------------------------------------------------------------------- pipeline stages


def prune_to_stage(model: Transformer, plan: StagePlan, stage: int) -> Transformer:
    """A copy of `model` (on the meta device) holding only `stage`'s part: its blocks, the
    embedding on the first stage, the final norm and the fused head + loss on the last.
    Parameter names (and checkpoints) stay those of the whole model."""
    part = copy.deepcopy(model)
    keep = {str(i) for i in plan.stage_layers[stage]}
    for name in list(part.layers.keys()):
        if name not in keep:
            del part.layers[name]
    if stage != 0:
        part.tok_embeddings = None
    if stage != plan.num_stages - 1:
        part.norm = None
        part.output = None
    return part


class LocalModel(nn.Module):
    """All stages this rank holds, under the whole model's attribute names, so the
    optimizer and the checkpoint see one module with the usual parameter names."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = parts  # a plain list: not registered twice
        self.tok_embeddings = next((p.tok_embeddings for p in parts if p.tok_embeddings is not None), None)
        self.layers = nn.ModuleDict({k: v for p in parts for k, v in p.layers.items()})
        self.norm = next((p.norm for p in parts if p.norm is not None), None)
        self.output = next((p.output for p in parts if getattr(p, "output", None) is not None), None)


def diloco_fragments(model: nn.Module, n_layers: int, fragments: int) -> list[list[tuple[str, torch.Tensor]]]:
    """This rank's parameters in `fragments` layer-contiguous groups for streaming DiLoCo:
    block i in fragment i x F // n_layers, the embedding with the first, the final norm and
    the head with the last (a rank may hold none of a fragment: a pipeline stage)."""
    out: list[list] = [[] for _ in range(fragments)]
    for name, p in model.named_parameters():
        if name.startswith("layers."):
            f = int(name.split(".")[1]) * fragments // n_layers
        else:
            f = 0 if name.startswith("tok_embeddings.") else fragments - 1
        out[f].append((name, p))
    return out


# ----------------------------------------------------------------------------- tensor parallel


def _mlp_plan(prefix: str) -> dict:
    """A SwiGLU MLP: gathered sequence in, column- then row-parallel, sequence-sharded out."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel

    return {prefix: PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            f"{prefix}.w1": ColwiseParallel(), f"{prefix}.w3": ColwiseParallel(),
            f"{prefix}.w2": RowwiseParallel(output_layouts=Shard(1))}


def _moe_plan(ff: MoE) -> dict:
    """An MoE layer keeps its tokens sequence-sharded: each tp rank routes its own slice and
    expert parallelism (which may borrow tp's ranks) moves the rows; the optional shared
    expert is a column/row-parallel MLP like the dense one."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import PrepareModuleInput

    plan = {"feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Shard(1),))}
    if ff.shared_expert is not None:
        plan.update(_mlp_plan("feed_forward.shared_expert"))
    return plan


def apply_tp(model: Transformer, tp_mesh) -> Transformer:
    """Tensor + sequence parallelism for the model (or one pipeline stage of it) over
    `tp_mesh`, in place, before FSDP wraps it (parallel/tensor_parallel.py explains the
    scheme). Parts a pipeline stage lacks (None) are skipped."""
    from torch.distributed.tensor import Replicate, Shard, distribute_module, distribute_tensor
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel, parallelize_module)

    top = {}
    if model.tok_embeddings is not None:
        top["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if model.norm is not None:
        # local output: stage boundaries and the loss get a plain tensor (this rank's
        # sequence shard), as between blocks
        top["norm"] = SequenceParallel(use_local_output=True)
    if top:
        parallelize_module(model, tp_mesh, top)
    for block in model.layers.values():
        ff = block.feed_forward
        moe = isinstance(ff, MoE)
        parallelize_module(block, tp_mesh, {
            "attention_norm": SequenceParallel(),
            # (x, cos, sin, docs): the sequence gathered; RoPE tables and document ids are
            # plain tensors of the whole sequence on every tp rank (from the replicated tokens)
            "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None, None),
                                            desired_input_layouts=(Replicate(), None, None, None)),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
            **(_moe_plan(ff) if moe else _mlp_plan("feed_forward")),
        })
        if moe:
            distribute_module(ff.router, tp_mesh)  # weight replicated over tp: its gradient sums every slice's
            ff.token_group = tp_mesh.get_group()   # the aux losses count the whole micro-batch
    loss_fn = vocab_parallel_loss(tp_mesh)
    model.loss_fn = loss_fn  # the tied head's
    if model.output is not None:  # only its weight is used, by the loss: shard the vocabulary rows
        distribute_module(model.output, tp_mesh, lambda name, mod, mesh: [
            mod.register_parameter(n, nn.Parameter(distribute_tensor(p, mesh, [Shard(0)])))
            for n, p in list(mod.named_parameters(recurse=False))])
        model.output.loss_fn = loss_fn
    return model


# ----------------------------------------------------------------------------- torch.compile


def apply_compile(model: nn.Module, backend: str) -> nn.Module:
    """torch.compile each block's forward (TorchTitan compiles per block, not the model):
    after tensor parallelism, so the DTensor ops are traced, and before FSDP, whose
    gather and reduce hooks run around the compiled forward, in eager code. The block
    stays the same module (its forward is the compiled one), so parameter names, the
    FSDP units and pipeline stages are unchanged. The blocks share one code object, so
    one graph serves every block of the same shape; a recompile past torch's limit is an
    error, not a silent fall-back to eager. fullgraph: a graph break is an error too.

    A block input that is a view gets a copy first: under tp the first block's input is
    the embedding's `to_local()`, a view of a DTensor's local tensor, and torch 2.13's
    compiled autograd sends that view's gradient to the DTensor's eager backward as a
    plain tensor ("'Tensor' object has no attribute '_local_tensor'"); a copy is a fresh
    input (the values are the same; one activation copied per step and micro-batch)."""
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    for block in model.layers.values():
        compiled = torch.compile(block.forward, backend=backend, fullgraph=True)

        def forward(x, cos, sin, docs=None, compiled=compiled):
            return compiled(x.clone() if x._base is not None else x, cos, sin, docs)

        block.forward = forward
    return model


# ----------------------------------------------------------------------------- experts and FSDP


def apply_ep(model: nn.Module, ep_mesh, topo: Topology) -> nn.Module:
    """Shard every MoE layer's stacked expert weights over `ep_mesh` and give it the
    dispatcher that moves its tokens to the ranks holding their experts."""
    for moe in moe_layers(model):
        shard_expert_weights(moe.experts, ep_mesh)
        moe.dispatcher = ExpertDispatcher(topo, moe.n_experts)
    return model


def _shard(part: nn.Module, dp_mesh, pipelined: bool, schedule: str, param_dtype, reduce_dtype) -> None:
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
    head = [part.output] if pipelined and part.output is not None else []
    if schedule == "layered" and pipelined:
        apply_fsdp(part, head, dp_mesh, param_dtype=param_dtype, reduce_dtype=reduce_dtype,
                   reshard_after_forward=False)
    else:
        apply_fsdp(part, list(part.layers.values()) + head, dp_mesh, param_dtype=param_dtype,
                   reduce_dtype=reduce_dtype, root_reshard_after_forward=False)
