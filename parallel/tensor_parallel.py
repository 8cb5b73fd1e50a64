"""Tensor and sequence parallelism (Megatron-LM style) with torch's DTensor API.

Inside a block, q/k/v and the MLP's gate/up projections are column-parallel (each tp
rank holds a slice of the heads / hidden units), the attention output and MLP down
projections are row-parallel; between blocks, activations are sharded along the
sequence (sequence parallelism, Korthikanti et al. 2022), so norms and residual adds
run on 1/tp of the tokens and the all-reduce of plain TP becomes an all-gather before
and a reduce-scatter after each parallel region. The embedding is sharded over the
vocabulary, and the head + loss run vocab-parallel: each rank multiplies the full
(gathered) hidden states by its vocabulary slice of the head, and the log-sum-exp is
all-reduced over tp (`kernels.vocab_parallel_linear_cross_entropy`), so the full logits
never sit on one rank.

MoE blocks (a `feed_forward` with a `router`) keep their tokens sequence-sharded: each tp
rank routes its own slice and expert parallelism (which may borrow tp's ranks) moves the
rows; the router weight is replicated over tp (a DTensor, so its gradient sums every
slice's), the optional shared expert is a column/row-parallel MLP like the dense one, and
the layer's `token_group` is the tp group (its aux losses count the whole micro-batch).

The plan names submodules the way a Llama-style model does (`tok_embeddings`, `layers`,
`attention.wq`, `feed_forward.w1`, `norm`, `output`); it is handed the module and the
tp mesh and imports no model class.
"""
from __future__ import annotations

import torch.nn as nn

from .dims import MeshError


class TensorParallelError(MeshError):
    """The model's shape does not split over the tp degree (names the field)."""


def check_tp_shapes(tp: int, *, n_heads: int, n_kv_heads: int, ffn_dim: int, vocab_size: int | None) -> None:
    """Every split dimension must divide by tp; GQA needs tp to divide the kv heads.
    (vocab_size None: not known yet, checked later.)"""
    for field, value in (("model.n_kv_heads", n_kv_heads), ("model.n_heads", n_heads),
                         ("model.ffn_dim", ffn_dim), ("model.vocab_size", vocab_size)):
        if value is not None and value % tp:
            raise TensorParallelError(
                f"parallel.tp = {tp} must divide {field} = {value} (each tensor-parallel rank holds "
                f"an equal slice); choose tp dividing {value}, or change {field}")


def vocab_parallel_loss(tp_mesh):
    """A loss function (hidden, head_weight, targets) -> mean loss for a vocab-sharded head.

    `hidden` arrives as this rank's sequence shard; it is all-gathered to every tp rank, and
    its gradient comes back as a partial sum that DTensor reduce-scatters to the sequence
    shards. `head_weight` is a DTensor sharded on the vocabulary (dim 0).
    """
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    from dist_train.kernels import vocab_parallel_linear_cross_entropy

    group = tp_mesh.get_group()
    tp_rank = tp_mesh.get_local_rank()

    def loss_fn(hidden, weight, targets):
        if not isinstance(hidden, DTensor):
            hidden = DTensor.from_local(hidden, tp_mesh, [Shard(1)], run_check=False)
        hidden = hidden.redistribute(tp_mesh, [Replicate()]).to_local(grad_placements=[Partial()])
        w = weight.to_local() if isinstance(weight, DTensor) else weight
        vocab = weight.shape[0]
        start = tp_rank * -(-vocab // tp_mesh.size())
        return vocab_parallel_linear_cross_entropy(hidden, w, targets, group, start, vocab_size=vocab,
                                                   reduce_grad_input=False)

    return loss_fn


def _mlp_plan(prefix: str) -> dict:
    """A SwiGLU MLP: gathered sequence in, column- then row-parallel, sequence-sharded out."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel

    return {prefix: PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            f"{prefix}.w1": ColwiseParallel(), f"{prefix}.w3": ColwiseParallel(),
            f"{prefix}.w2": RowwiseParallel(output_layouts=Shard(1))}


def _moe_plan(ff) -> dict:
    """An MoE layer takes its input as a sequence-sharded DTensor (see module docstring)."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import PrepareModuleInput

    plan = {"feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Shard(1),))}
    if getattr(ff, "shared_expert", None) is not None:
        plan.update(_mlp_plan("feed_forward.shared_expert"))
    return plan


def apply_tp(model: nn.Module, tp_mesh) -> nn.Module:
    """Parallelise a Llama-style model (or one pipeline stage of it) over `tp_mesh` in
    place, before FSDP wraps it. Parts a pipeline stage lacks (None) are skipped."""
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
        parallelize_module(block, tp_mesh, {
            "attention_norm": SequenceParallel(),
            "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                            desired_input_layouts=(Replicate(), None, None)),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
            **(_moe_plan(ff) if hasattr(ff, "router") else _mlp_plan("feed_forward")),
        })
        if hasattr(ff, "router"):
            distribute_module(ff.router, tp_mesh)  # weight replicated over tp
            ff.token_group = tp_mesh.get_group()
    loss_fn = vocab_parallel_loss(tp_mesh)
    model.loss_fn = loss_fn  # the tied head's
    head = getattr(model, "output", None)
    if head is not None:  # only its weight is used, by the loss: shard the vocabulary rows
        distribute_module(head, tp_mesh, lambda name, mod, mesh: [
            mod.register_parameter(n, nn.Parameter(distribute_tensor(p, mesh, [Shard(0)])))
            for n, p in list(mod.named_parameters(recurse=False))])
        head.loss_fn = loss_fn
    return model
