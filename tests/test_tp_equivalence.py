"""Tensor + sequence parallelism (with a vocab-parallel loss), alone and composed with
sharded and replicated data parallelism, gives the single-process reference's losses and
final parameters; checkpoints reload across tp and dp layouts.

All runs: the tiny model with 4 kv heads (so tp=4 divides them), global batch 8, 5 steps.
Four launches (1, 2, 4 and 8 ranks) run every layout.
"""
from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import read_metrics, sweep
from tests.test_dp_equivalence import TOL, load_params

STEPS = 5
COMMON = {"model.n_kv_heads": 4, "train.global_batch": 8, "train.steps": STEPS, "checkpoint.every": STEPS}
LAYOUTS = {  # name: (ranks, overrides)
    "tp2": (2, {"parallel.tp": 2}),
    "tp4": (4, {"parallel.tp": 4}),
    "tp2_dps2": (4, {"parallel.tp": 2, "parallel.dp_shard": 2}),
    "tp2_dpr2": (4, {"parallel.tp": 2, "parallel.dp_replicate": 2, "parallel.dp_shard": 1}),
    "tp2_dps2_dpr2": (8, {"parallel.tp": 2, "parallel.dp_shard": 2, "parallel.dp_replicate": 2}),
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    sweep(root, 1, {"ref": {"train.steps": STEPS + 3, "checkpoint.every": 1, "checkpoint.keep": 10},
                    "base": {}}, COMMON)
    for nproc in (2, 4, 8):
        runs = {name: sets for name, (n, sets) in LAYOUTS.items() if n == nproc}
        if nproc == 4:  # then continue checkpoints on other layouts: tp -> plain dp, and dp -> tp
            runs["tp2_dps2 "] = {"run.name": "tp2_dps2", "parallel.dp_shard": 4, "train.steps": STEPS + 3}
            runs["base"] = {"parallel.tp": 2, "parallel.dp_shard": 2, "train.steps": STEPS + 3}
        sweep(root, nproc, runs, COMMON)
    return root


def losses(run_dir, n=STEPS):
    return [r["loss"] for r in read_metrics(run_dir)][:n]


def assert_params_match(root, name, step):
    ref = load_params(root / f"ref/checkpoints/step-{step:06d}")
    got = load_params(root / name / f"checkpoints/step-{step:06d}")
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], **TOL, msg=lambda m, k=k: f"{name} {k}: {m}")


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(root, name):
    torch.testing.assert_close(losses(root / name), losses(root / "ref"), **TOL)
    assert_params_match(root, name, STEPS)


def test_tp_step_counts_bytes_by_kind(root):
    """TP moves activations: all-gathers and reduce-scatters of the sequence-parallel
    regions show up per step, and the metrics carry bytes for every kind."""
    comm = read_metrics(root / "tp2")[0]["comm"]
    assert comm["all_gather"]["count"] > 0 and comm["reduce_scatter"]["count"] > 0
    assert comm["all_reduce"]["bytes"] > 0  # vocab-parallel log-sum-exp and the grad norm
    dp = read_metrics(root / "tp2_dps2")[0]["comm"]
    assert dp["all_gather"]["bytes"] > comm["all_gather"]["bytes"] / 2  # FSDP's parameter gathers on top


@pytest.mark.parametrize("name", ["tp2_dps2", "base"])
def test_checkpoint_resumes_on_another_layout(root, name):
    """tp=2 x dp_shard=2 continued as dp_shard=4, and a 1-rank run continued as
    tp=2 x dp_shard=2: the resumed steps equal the reference's."""
    torch.testing.assert_close(losses(root / name, STEPS + 3), losses(root / "ref", STEPS + 3), **TOL)
    assert_params_match(root, name, STEPS + 3)
    state = json.loads((root / name / f"checkpoints/step-{STEPS + 3:06d}/train_state.json").read_text())
    assert state["sampler"]["consumed_samples"] == (STEPS + 3) * 8
