"""DiLoCo through real gloo ranks (parallel/diloco.py): one replica with H = 1, outer lr 1
and no momentum is the plain trainer, in every inner layout; two replicas keep bitwise
equal global parameters and momentum, move 1/H of HSDP's cross-replica bytes in fp32 and
under 1/(0.9 x 4 x H) in int8; streaming syncs a quarter of the model at a time; a bad
pseudo-gradient is rejected with its replica named; a run resumed mid inner loop (also
with an overlapped exchange in flight) continues exactly, and under another inner layout
within float tolerance.

Two launches: 2 ranks (the H = 1 equivalences), 4 ranks (two replicas of 2 ranks).
"""
from __future__ import annotations

import pytest

import torch

from tests.conftest import read_metrics, sweep
from tests.equivalence import SGD, assert_params_match, assert_values_match, initial_params, read_config

TOKENS = 16 * 128
ONE = {"diloco.enabled": "true", "diloco.replicas": 1, "diloco.inner_steps": 1, "diloco.outer_lr": 1.0,
       "diloco.outer_momentum": 0.0}
MOE = {"model.ffn_dim": 64, "model.moe_experts": 4, "model.moe_top_k": 2}
INNER = {  # the inner layouts on 2 ranks
    "dps2": {"parallel.dp_shard": 2},
    "tp2": {"parallel.tp": 2, "parallel.dp_shard": 1},
    "pp2": {"parallel.pp": 2, "parallel.dp_shard": 1},
    "ep2": {**MOE, "parallel.ep": 2, "parallel.dp_shard": 2},
}
H = 4
# constant lr after warm-up: a run stopped at step 6 and resumed has the schedule of one that ran through
TWO = {"diloco.enabled": "true", "diloco.replicas": 2, "diloco.inner_steps": H, "parallel.dp_shard": 2,
       "train.min_lr_ratio": 1.0}
REPLICAS = {  # 4 ranks: name -> overrides
    "hsdp": {"parallel.dp_replicate": 2, "parallel.dp_shard": 2, "train.min_lr_ratio": 1.0},
    "fp32": {**TWO, "checkpoint.every": 6},
    "int8": {**TWO, "diloco.quantize": "int8"},
    "stream": {**TWO, "diloco.inner_steps": 8, "diloco.fragments": 4, "diloco.overlap": "true",
               "diloco.quantize": "int8"},
    "bad": {**TWO, "diloco.inner_steps": 2, "fault.inject": '["bad_update:rank=2,step=6"]'},
    # resumed mid inner loop (step 6 of H = 4), as is and under tp = 2; streaming with an exchange in flight
    "again": {**TWO, "train.steps": 6, "checkpoint.every": 6},
    "again ": {**TWO, "run.name": "again", "checkpoint.every": 6},
    "moved": {**TWO, "train.steps": 6, "checkpoint.every": 6},
    "moved ": {**TWO, "run.name": "moved", "parallel.tp": 2, "parallel.dp_shard": 1},
}
REPLICAS["sgd"] = {**TWO, **SGD, "checkpoint.every": 8}  # against the single-process loop below
STREAM = REPLICAS["stream"]
REPLICAS["stream_again"] = {**STREAM, "train.steps": 5, "checkpoint.every": 5}
REPLICAS["stream_again "] = {**STREAM, "run.name": "stream_again", "checkpoint.every": 5}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("diloco")
    runs = {}
    for name, sets in INNER.items():
        runs[f"plain_{name}"] = sets
        runs[f"one_{name}"] = {**sets, **ONE}
    sweep(root, 2, runs, {"train.steps": 6, "checkpoint.every": 0, "eval.every": 3})
    sweep(root, 4, REPLICAS, {"train.steps": 8, "checkpoint.every": 0})
    return root


def column(run_dir, key):
    return [r.get(key) for r in read_metrics(run_dir)]


@pytest.mark.parametrize("inner", list(INNER))
def test_one_replica_h1_is_the_plain_trainer(root, inner):
    """H = 1, outer lr 1, no momentum: each outer step sets the global parameters to the
    local ones, so the losses are the plain trainer's (within 1e-6: global - (global -
    local) rounds once per step)."""
    for key in ("loss", "eval_loss"):  # eval (held-out split, every 3 steps) on the global parameters
        plain, one = column(root / f"plain_{inner}", key), column(root / f"one_{inner}", key)
        assert len(one) == 6 and all((a is None) == (b is None) for a, b in zip(one, plain)), (key, one, plain)
        assert all(abs(a - b) <= 1e-6 for a, b in zip(one, plain) if a is not None), (key, one, plain)
    assert [e is not None for e in column(root / f"one_{inner}", "eval_loss")] == [False, False, True] * 2
    assert column(root / f"one_{inner}", "outer_step") == list(range(1, 7))


@pytest.mark.parametrize("name", ["fp32", "int8", "stream", "bad"])
def test_replicas_agree_bit_for_bit_after_every_outer_step(root, name):
    records = read_metrics(root / name)
    synced = [r for r in records if r["applied_fragments"]]
    assert synced and all(r["replicas_agree"] for r in synced), [(r["step"], r.get("replicas_agree")) for r in records]


def _bytes(run_dir, dim):
    return [r["comm_by_dim"].get(dim, {}).get("wire_bytes", 0) for r in read_metrics(run_dir)]


def test_cross_replica_bytes_against_hsdp(root):
    """Per step, the diloco dim moves 1/H of HSDP's dp_replicate wire bytes in fp32, and at
    most 1/(0.9 x 4 x H) of them in int8 (the INTELLECT-1 ratio within 10%)."""
    hsdp = sum(_bytes(root / "hsdp", "dp_replicate")) / 8
    assert hsdp > 0
    norms = (8 // H) * 4 * 8  # per sync each of 4 ranks all_gathers its replica's norm: 8 bytes to its peer
    fp32 = (sum(_bytes(root / "fp32", "diloco")) - norms) / 8
    int8 = (sum(_bytes(root / "int8", "diloco")) - norms) / 8
    assert fp32 == pytest.approx(hsdp / H, rel=1e-9), (fp32, hsdp)
    assert int8 <= hsdp / (0.9 * 4 * H), (int8, hsdp)


def test_streaming_syncs_a_quarter_of_the_model_at_a_time(root):
    """F = 4 fragments: every sync moves at most 1/4 of the parameters (+ one tensor) and the
    four fragments take turns, one every H / F = 2 steps, applied 2 steps later."""
    from dist_train.model import ModelArgs, count_params
    from tests.equivalence import read_config

    records = read_metrics(root / "stream")
    assert [r["synced_fragments"] for r in records] == [[], [1], [], [2], [], [3], [], [0]]
    assert [r["applied_fragments"] for r in records] == [[], [], [], [1], [], [2], [], [3]]
    cfg = read_config(root / "stream")
    a = ModelArgs.from_config(cfg.model, cfg.data.seq_len, tokenizer_vocab=258)
    largest = a.vocab_size * a.dim / count_params(a)["total"]  # the embedding (or the head), of all parameters
    full = max(_bytes(root / "int8", "diloco"))  # one whole int8 sync of the same model
    for r, b in zip(records, _bytes(root / "stream", "diloco")):
        assert b <= full * (0.25 + largest), (r["step"], b, full)


def test_bad_pseudo_gradient_is_rejected_and_the_replica_named(root):
    records = read_metrics(root / "bad")
    rejected = [(r["step"], r["rejected"]) for r in records if r["rejected"]]
    assert len(rejected) == 1 and rejected[0][0] == 6, rejected
    (entry,) = rejected[0][1]
    assert entry["replica"] == 1 and "running median" in entry["why"]
    assert all(r["loss"] == r["loss"] and r["loss"] < 6 for r in records)


def test_resume_mid_inner_loop_continues_exactly(root):
    """Saved at step 6 (2 steps into an inner round of 4) and resumed: the losses of steps
    7-8 are the uninterrupted run's; with an overlapped exchange in flight at the save
    (streaming, fragment 2 issued at step 4, applied at 6) too."""
    assert column(root / "again", "loss") == column(root / "fp32", "loss")
    assert column(root / "stream_again", "loss") == column(root / "stream", "loss")
    assert column(root / "again", "step") == list(range(1, 9))


def test_resume_under_another_inner_layout(root):
    """dp_shard = 2 replicas resumed as tp = 2 replicas: the outer state reshards like the
    model; losses within float tolerance of the uninterrupted run."""
    assert_values_match(column(root / "moved", "loss"), column(root / "fp32", "loss"), TOKENS, "resumed as tp=2")


def diloco_reference(cfg, steps: int, replicas: int, ranks_per_replica: int):
    """DiLoCo written directly against torch in one process: `replicas` models, each stepping
    on the micro-batches its ranks would draw (the sampler split over replicas x ranks, the
    ranks' mean losses averaged, as FSDP averages their gradients), plain SGD inside (the
    trainer's LR schedule), and every H steps the mean pseudo-gradient and a Nesterov outer
    step. Returns per-step mean losses and the final global parameters."""
    import math

    from dist_train.data import DistributedBatchSampler, TokenDataset, ensure_prepared
    from dist_train.model import ModelArgs, Transformer, init_weights

    t, d = cfg.train, cfg.diloco
    data = TokenDataset(ensure_prepared("bundled", None, "byte"), cfg.data.seq_len)
    models = []
    for _ in range(replicas):
        m = Transformer(ModelArgs.from_config(cfg.model, cfg.data.seq_len, data.vocab_size))
        init_weights(m, cfg.run.seed)
        models.append(m)
    n = replicas * ranks_per_replica
    samplers = [DistributedBatchSampler(len(data), global_batch=t.global_batch, micro_batch=t.micro_batch,
                                        dp_size=n, dp_rank=k, seed=cfg.run.seed) for k in range(n)]
    opts = [torch.optim.SGD([{"params": [p for p in m.parameters() if p.dim() >= 2], "weight_decay": t.weight_decay},
                             {"params": [p for p in m.parameters() if p.dim() < 2], "weight_decay": 0.0}], lr=t.lr)
            for m in models]
    glob = [p.detach().clone() for p in models[0].parameters()]
    mom = [torch.zeros_like(g) for g in glob]
    losses = []
    for step in range(steps):
        factor = (step + 1) / t.warmup if step < t.warmup else t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (
            1 + math.cos(math.pi * (step - t.warmup) / (t.steps - t.warmup)))
        total = 0.0
        for r, (m, opt) in enumerate(zip(models, opts)):
            for group in opt.param_groups:
                group["lr"] = t.lr * factor
            for k in range(r * ranks_per_replica, (r + 1) * ranks_per_replica):
                micro = samplers[k].next_step()
                for idx in micro:
                    loss = m(*data.batch(idx)) / (len(micro) * ranks_per_replica)
                    loss.backward()
                    total += loss.item() / replicas
            opt.step()
            opt.zero_grad()
        losses.append(total)
        if (step + 1) % d.inner_steps == 0:
            with torch.no_grad():
                for i, ps in enumerate(zip(*[m.parameters() for m in models])):
                    delta = sum(glob[i] - p for p in ps) / replicas
                    mom[i].mul_(d.outer_momentum).add_(delta)
                    glob[i].sub_(delta + d.outer_momentum * mom[i], alpha=d.outer_lr)
                    for p in ps:
                        p.copy_(glob[i])
    names = [k for k, _ in models[0].named_parameters()]
    return losses, dict(zip(names, glob))


def test_two_replicas_equal_a_single_process_diloco_loop(root):
    """The backbone check for DiLoCo: 2 replicas x dp_shard = 2 through real gloo ranks give
    the losses of every step and the final global parameters of the same loop written
    plainly in one process (SGD inside, so parameters carry rounding linearly)."""
    cfg = read_config(root / "sgd")
    want_losses, want_global = diloco_reference(cfg, 8, replicas=2, ranks_per_replica=2)
    assert_values_match(column(root / "sgd", "loss"), want_losses, TOKENS, "2 replicas vs one process")
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    ckpt = root / "sgd" / "checkpoints" / "step-000008"
    dcp_to_torch_save(ckpt, ckpt.parent / "all.pt")
    saved = torch.load(ckpt.parent / "all.pt", weights_only=False)
    assert {"replica0", "replica1", "diloco"} <= saved.keys()  # each replica's own model and optimizer, and the outer state
    assert_params_match(saved["diloco"]["global"], want_global, initial_params(root / "sgd"), 8, TOKENS,
                        "global parameters")
