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

This module holds the mechanisms (the vocab-parallel loss); the plan that says which of
a model's modules take which parallel style lives beside the model
(dist_train/parallelize.py), as TorchTitan keeps `parallelize_llama` beside its model.
"""
from __future__ import annotations


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


def reduce_partial_grads(params) -> int:
    """Reduce once the gradients that tensor parallelism left as partial sums.

    A replicated weight used on sequence-sharded activations (a sequence-parallel norm, a
    tp-replicated MoE router) gets a `Partial` gradient: each tp rank holds its slice's
    share. Left so, every later use (the gradient-norm clip, each of the optimizer's
    reads of the gradient) all-reduces it again, 4 times per step under AdamW; reduced
    here once per step, after the last micro-batch. (With FSDP its reduce-scatter does
    it.) Returns the number of gradients reduced."""
    from torch.distributed.tensor import DTensor, Partial

    n = 0
    for p in params:
        g = p.grad
        if isinstance(g, DTensor) and any(isinstance(pl, Partial) for pl in g.placements):
            p.grad = g.redistribute(g.device_mesh, p.placements)
            n += 1
    return n
