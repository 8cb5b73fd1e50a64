"""Tensor + sequence parallelism (with a vocab-parallel loss), alone and composed with
sharded and replicated data parallelism, gives the single-process reference's losses and
final parameters; checkpoints reload across tp and dp layouts.

All runs: the tiny model with 4 kv heads (so tp=4 divides them), global batch 8, 5 steps.
"""
from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import read_metrics, run_cli, tiny_overrides
from tests.test_dp_equivalence import TOL, load_params

STEPS = 5
COMMON = {"model.n_kv_heads": 4, "train.global_batch": 8, "checkpoint.every": STEPS}
LAYOUTS = {  # name: (ranks, overrides)
    "tp2": (2, {"parallel.tp": 2}),
    "tp4": (4, {"parallel.tp": 4}),
    "tp2_dps2": (4, {"parallel.tp": 2, "parallel.dp_shard": 2}),
    "tp2_dpr2": (4, {"parallel.tp": 2, "parallel.dp_replicate": 2, "parallel.dp_shard": 1}),
    "tp2_dps2_dpr2": (8, {"parallel.tp": 2, "parallel.dp_shard": 2, "parallel.dp_replicate": 2}),
}


def local(root, name, nproc, steps, **sets):
    return run_cli("local", "--nproc", str(nproc), "configs/tiny.toml",
                   *tiny_overrides(root, name, steps, **{**COMMON, **sets}), timeout=600)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    local(root, "ref", 1, STEPS + 3, **{"checkpoint.every": 1, "checkpoint.keep": 10})
    for name, (nproc, sets) in LAYOUTS.items():
        local(root, name, nproc, STEPS, **sets)
    return root


def losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir)]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(root, name):
    torch.testing.assert_close(losses(root / name), losses(root / "ref")[:STEPS], **TOL)
    ref = load_params(root / f"ref/checkpoints/step-{STEPS:06d}")
    got = load_params(root / name / f"checkpoints/step-{STEPS:06d}")
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], **TOL, msg=lambda m, k=k: f"{name} {k}: {m}")


def test_tp_step_counts_bytes_by_kind(root):
    """TP moves activations: all-gathers and reduce-scatters of the sequence-parallel
    regions show up per step, and the metrics carry bytes for every kind."""
    comm = read_metrics(root / "tp2")[0]["comm"]
    assert comm["all_gather"]["count"] > 0 and comm["reduce_scatter"]["count"] > 0
    assert comm["all_reduce"]["bytes"] > 0  # vocab-parallel log-sum-exp and the grad norm
    dp = read_metrics(root / "tp2_dps2")[0]["comm"]
    assert dp["all_gather"]["bytes"] > comm["all_gather"]["bytes"]  # FSDP's parameter gathers on top


def test_tp_checkpoint_resumes_as_plain_dp(root, tmp_path):
    """Saved as tp=2 x dp_shard=2, continued as dp_shard=4."""
    import shutil

    saved = "tp2_dps2"
    shutil.copytree(root / saved, tmp_path / saved)
    proc = local(tmp_path, saved, 4, STEPS + 3, **{"parallel.dp_shard": 4})
    assert f"step-{STEPS:06d} at step {STEPS}" in proc.stdout
    torch.testing.assert_close(losses(tmp_path / saved), losses(root / "ref"), **TOL)
    state = json.loads((tmp_path / saved / f"checkpoints/step-{STEPS + 3:06d}/train_state.json").read_text())
    assert state["sampler"]["consumed_samples"] == (STEPS + 3) * 8


def test_dp_checkpoint_resumes_under_tp(root, tmp_path):
    """The reverse direction: a plain (1-rank) checkpoint continued as tp=2 x dp_shard=2."""
    import shutil

    shutil.copytree(root / "ref", tmp_path / "ref")
    for step in range(STEPS + 1, STEPS + 4):  # resume from step 5, not the ref's later ones
        shutil.rmtree(tmp_path / f"ref/checkpoints/step-{step:06d}")
    local(tmp_path, "ref", 4, STEPS + 3, **{"parallel.tp": 2, "parallel.dp_shard": 2, "checkpoint.every": 1})
    torch.testing.assert_close(losses(tmp_path / "ref"), losses(root / "ref"), **TOL)
    last = f"checkpoints/step-{STEPS + 3:06d}"
    ref, got = load_params(root / "ref" / last), load_params(tmp_path / "ref" / last)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], **TOL)
