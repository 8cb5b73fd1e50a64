"""Sharded data parallelism through real gloo ranks gives the single-process reference's
losses, gradient norms and parameters (tests/equivalence.py says how close, and why);
resuming (also on another layout) continues exactly.

One module-scoped set of launches of `dist-train local --runs` feeds every test here
(SGD without clipping, so a gradient's scale shows in the parameters):
  ref       1 rank, 10 steps, checkpoints at 5 and 10 (the reference)
  ref_adamw 1 rank, 10 steps of AdamW with clipping (checked against a plain torch loop)
  fsdp4     dp_shard=4, 10 steps
  hsdp      dp_replicate=2 x dp_shard=2, 5 steps, then resumed as dp_shard=2 to step 10
  fsdp2     dp_shard=2, 5 steps
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.conftest import read_metrics, run_cli, sweep, tiny_overrides
from tests.equivalence import (C_GRAD, SGD, assert_params_match, assert_run_matches, assert_values_match,
                               initial_params, load_params, read_config)

STEPS = 10
TOKENS = 16 * 128  # per step: global batch x seq_len of configs/tiny.toml


def local(root, name, nproc, steps, **sets):
    return run_cli("local", "--nproc", str(nproc), "configs/tiny.toml",
                   *tiny_overrides(root, name, steps, **{"checkpoint.every": 5, **SGD, **sets}))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp")
    common = {"checkpoint.every": 5, "train.steps": STEPS, **SGD}
    sweep(root, 1, {"ref": {}, "ref_adamw": {"train.optimizer": "adamw", "train.lr": 3e-3, "train.grad_clip": 1.0,
                                             "checkpoint.every": STEPS}}, common)
    sweep(root, 4, {"fsdp4": {"metrics.report": "true"},
                    "hsdp": {"parallel.dp_replicate": 2, "parallel.dp_shard": 2, "train.steps": 5}}, common)
    resumed = sweep(root, 2, {"hsdp": {"parallel.dp_shard": 2}, "fsdp2": {"train.steps": 5}}, common)
    return root, resumed


def losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir)]


def grad_norms(run_dir):
    return [r["grad_norm"] for r in read_metrics(run_dir)]


def assert_matches_reference(root, name, steps):
    """Losses and gradient norms of every step, and the parameters at `steps`."""
    assert_run_matches(root / name, root / "ref", steps, TOKENS)


def test_reference_loss_falls(runs):
    root, _ = runs
    ref = losses(root / "ref")
    assert len(ref) == STEPS and ref[-1] < ref[0] - 0.5


def plain_torch_loop(cfg, steps: int) -> tuple[list[float], list[float], dict[str, torch.Tensor]]:
    """The same training written directly against torch (its own clip_grad_norm_, AdamW or
    SGD and a hand-written warm-up + cosine schedule): what dist-train's single rank must
    reproduce. Returns per-step losses and gradient norms (before clipping), and the
    final parameters."""
    import math

    from dist_train.data import DistributedBatchSampler, TokenDataset, ensure_prepared
    from dist_train.model import ModelArgs, Transformer, init_weights

    t = cfg.train
    data = TokenDataset(ensure_prepared("bundled", None, "byte"), cfg.data.seq_len)
    sampler = DistributedBatchSampler(len(data), global_batch=t.global_batch, micro_batch=t.micro_batch,
                                      dp_size=1, dp_rank=0, seed=cfg.run.seed)
    model = Transformer(ModelArgs.from_config(cfg.model, cfg.data.seq_len, data.vocab_size))
    init_weights(model, cfg.run.seed)
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": t.weight_decay},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    if t.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum)
    else:
        opt = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8, foreach=True)
    out, norms = [], []
    for step in range(steps):
        if step < t.warmup:
            factor = (step + 1) / t.warmup
        else:
            factor = t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (
                1 + math.cos(math.pi * (step - t.warmup) / (t.steps - t.warmup)))
        for group in opt.param_groups:
            group["lr"] = t.lr * factor
        micro = sampler.next_step()
        total = 0.0
        for idx in micro:
            loss = model(*data.batch(idx)) / len(micro)
            loss.backward()
            total += loss.item()
        params = list(model.parameters())
        if t.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        opt.step()
        opt.zero_grad()
        out.append(total)
        norms.append(float(norm))
    return out, norms, {k: v.detach() for k, v in model.state_dict().items() if not k.startswith("rope")}


@pytest.mark.parametrize("name", ["ref", "ref_adamw"])
def test_reference_matches_a_plain_torch_loop(runs, name):
    """Guards what the layout comparisons cannot see (every layout shares the trainer):
    clipping, AdamW and SGD, the schedule, weight-decay groups, accumulation scaling. One
    process on both sides, the same kernels in the same order: only the optimizers'
    rounding may differ, so AdamW is compared here too."""
    root, _ = runs
    plain_losses, plain_norms, plain_params = plain_torch_loop(read_config(root / name), STEPS)
    assert_values_match(losses(root / name), plain_losses, TOKENS, f"{name} loss")
    assert_values_match(grad_norms(root / name), plain_norms, TOKENS, f"{name} grad_norm", c=C_GRAD)
    assert_params_match(load_params(root / name / "checkpoints/step-000010"), plain_params,
                        initial_params(root / name), STEPS, TOKENS, name)


@pytest.mark.parametrize("name,steps", [("fsdp4", STEPS), ("fsdp2", 5)])
def test_sharded_layout_matches_reference(runs, name, steps):
    root, _ = runs
    assert_matches_reference(root, name, steps)


def test_hsdp_matches_reference_and_resumes_on_another_layout(runs):
    """Steps 1-5 as HSDP (the replicate all-reduce really happens: one per FSDP unit, 4
    blocks + root, on each of 4 ranks), 6-10 resumed as dp_shard=2."""
    root, resumed = runs
    assert "resumed from" in resumed.stdout and "step-000005 at step 5" in resumed.stdout
    records = read_metrics(root / "hsdp")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for r in records[:5]:
        assert r["comm_by_dim"]["dp_replicate"]["count"] == 4 * 5, r["comm_by_dim"]
        assert r["comm_by_dim"]["dp_shard"]["count"] > 0
    assert "dp_replicate" not in records[5]["comm_by_dim"]  # dp_shard=2 alone after the resume
    assert_matches_reference(root, "hsdp", STEPS)
    state = json.loads((root / "hsdp/checkpoints/step-000010/train_state.json").read_text())
    ref_state = json.loads((root / "ref/checkpoints/step-000010/train_state.json").read_text())
    assert state["sampler"] == ref_state["sampler"]
    assert state["sampler"]["consumed_samples"] == STEPS * 16


def test_fsdp_step_comm_counts(runs):
    """Per rank and step: 2 all-gathers per block and micro-batch (forward, and again for
    backward), 1 for the root (kept gathered from forward through backward), one
    reduce-scatter per unit (gradient sync only on the last micro-batch), one all-reduce
    (the clipped norm). 5 units: 4 blocks + root."""
    root, _ = runs
    blocks, ranks, micro = 4, 4, 16 // 4 // 2
    for r in read_metrics(root / "fsdp4"):
        comm = r["comm"]
        assert comm["all_gather"]["count"] == ranks * micro * (2 * blocks + 1)
        assert comm["reduce_scatter"]["count"] == ranks * (blocks + 1)
        assert comm["all_reduce"]["count"] == ranks
    params = load_params(root / "ref/checkpoints/step-000005")
    in_blocks = sum(p.numel() for k, p in params.items() if k.startswith("layers."))
    in_root = sum(p.numel() for k, p in params.items() if not k.startswith("layers."))
    expect = micro * (2 * in_blocks + in_root) * 4
    per_rank_gather = read_metrics(root / "fsdp4")[0]["comm"]["all_gather"]["bytes"] / ranks
    assert expect <= per_rank_gather < expect * 1.05  # plus padding to the shard count only


def test_run_dir_layout(runs):
    root, _ = runs
    run = root / "fsdp4"
    for rel in ("config.toml", "metrics.jsonl", "checkpoints/latest", "report/loss.png", "report/throughput.png"):
        assert (run / rel).exists(), rel
    assert (run / "checkpoints/latest").read_text().strip() == "step-000010"
    record = read_metrics(run)[0]
    for key in ("step", "loss", "lr", "tokens", "tokens_per_s", "grad_norm", "step_time_s", "peak_memory_bytes", "comm"):
        assert key in record
    # CPU: the heap in use at the samples (dist_train/heap_peak.py), below the RSS that also keeps freed memory
    assert 0 < record["peak_allocated_bytes"] < record["peak_memory_bytes"]


def test_corrupted_latest_falls_back_to_previous(runs, tmp_path):
    root, _ = runs
    run = tmp_path / "ref"
    shutil.copytree(root / "ref", run)
    shard = run / "checkpoints/step-000010/__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(data)
    proc = local(tmp_path, "ref", 1, STEPS)
    assert "step-000010 is corrupted: __0_0.distcp fails its CRC32 check" in proc.stdout
    assert "resumed from" in proc.stdout and "step-000005 at step 5" in proc.stdout
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert_values_match([r["loss"] for r in records], losses(root / "ref"), TOKENS, "resumed loss")  # 6-10 redone
    discarded = (run / "metrics.discarded.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in discarded] == list(range(6, 11))
