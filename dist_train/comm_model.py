"""Analytic bytes per rank and optimizer step of each collective kind, for a dense model
under tensor (+ sequence), sharded and replicated data parallelism.

Derived from how the layouts work (fp32 unless FSDP's dtypes say otherwise, N micro-batches per rank, A = micro_batch x
seq_len x dim x 4 bytes, L blocks); bench/tensor_parallel.py compares it with what the
observed process group measures, and tests/test_tp_equivalence.py asserts it per layout.

tensor + sequence parallel (tp > 1), per micro-batch
  all-gather      4L + 2 of A: the input of attention and of the MLP per block (forward),
                  the backward of each block's two row-parallel reduce-scatters, the hidden
                  states gathered for the vocab-parallel loss, the backward of the embedding's
  reduce-scatter  4L + 2 of A: the mirror images of the above
  all-reduce      the vocab-parallel loss: max, then sum-exp and target logit, 12 bytes a token;
and once per step the sequence-parallel norm weights' partial gradients, (2L + 1) x dim x 4
(the trainer reduces them after the last micro-batch; with FSDP its reduce-scatter does)
FSDP over dp_shard > 1 (units = L blocks + root, P_u = a unit's parameters on this tp rank)
  all-gather      per micro-batch, 2 per block (forward, and again for backward) and 1 for
                  the root (kept gathered through backward): N x (2 x sum(P_block) + P_root) x 4
  reduce-scatter  1 per unit and step (gradient sync on the last micro-batch): sum(P_u) x 4
HSDP over dp_replicate > 1
  all-reduce      1 per unit and step of the shard: sum(P_u) / dp_shard x 4
and the gradient-norm all-reduce of one float per parameter tensor (over tp and, with
FSDP, once more over dp_shard).
"""
from __future__ import annotations

KINDS = ("all_gather", "reduce_scatter", "all_reduce")


def unit_params(a, tp: int) -> list[int]:
    """Parameters of each FSDP unit (blocks, then the root last) held by one tp rank."""
    hd = a.head_dim
    block = 2 * a.dim + (2 * a.n_heads * hd * a.dim + 2 * a.n_kv_heads * hd * a.dim + 3 * a.ffn_dim * a.dim) // tp
    root = a.vocab_size * a.dim // tp * (1 if a.tie_embeddings else 2) + a.dim
    return [block] * a.n_layers + [root]


def dense_step_bytes(a, tp: int, dp_shard: int, dp_replicate: int, seq_len: int, global_batch: int,
                     micro_batch: int, param_bytes: int = 4, reduce_bytes: int = 4) -> dict[str, int]:
    """Bytes one rank's collectives of each kind move per step (module docstring); `a` is
    the model's ModelArgs (a dense model, fp32 activations). `param_bytes` / `reduce_bytes`:
    the size of one parameter in FSDP's gathers and of one gradient in its reductions
    (train.param_dtype / train.reduce_dtype: 2 for bf16)."""
    n_micro = global_batch // (dp_shard * dp_replicate * micro_batch)
    act = micro_batch * seq_len * a.dim * 4
    L = a.n_layers
    out = dict.fromkeys(KINDS, 0)
    if tp > 1:
        out["all_gather"] += n_micro * (4 * L + 2) * act
        out["reduce_scatter"] += n_micro * (4 * L + 2) * act
        out["all_reduce"] += n_micro * 12 * micro_batch * seq_len
        out["all_reduce"] += (2 * L + 1) * a.dim * 4
    units = unit_params(a, tp)
    if dp_shard > 1:
        out["all_gather"] += n_micro * (2 * sum(units[:-1]) + units[-1]) * param_bytes
        out["reduce_scatter"] += sum(units) * reduce_bytes
    if dp_replicate > 1:
        out["all_reduce"] += sum(units) // dp_shard * reduce_bytes
    n_tensors = 2 + L * 9 + (0 if a.tie_embeddings else 1)
    out["all_reduce"] += n_tensors * 4 * (2 if tp > 1 and dp_shard > 1 else 1)  # + once over dp_shard
    return out
