"""Tensor + sequence parallelism (with a vocab-parallel loss), alone and composed with
sharded and replicated data parallelism, gives the single-process reference's losses,
gradient norms and final parameters (tests/equivalence.py); each layout moves exactly
the bytes the analytic model predicts (dist_train/comm_model.py); checkpoints reload
across tp and dp layouts.

All runs: the tiny model with 4 kv heads (so tp=4 divides them), global batch 8, 5 SGD
steps (3 for the layouts with dp_replicate: 8 ranks on 2 cores take seconds a step, and a
replicate all-reduce that is wrong is wrong from the first step). Four launches (1, 2, 4
and 8 ranks) run every layout.
"""
from __future__ import annotations

import json

import pytest

from tests.conftest import read_metrics, sweep
from tests.equivalence import SGD, assert_run_matches

STEPS = 5
TOKENS = 8 * 128  # per step: global batch x seq_len
COMMON = {"model.n_kv_heads": 4, "train.global_batch": 8, "train.steps": STEPS, "checkpoint.every": STEPS, **SGD}
SHORT = {"train.steps": 3, "checkpoint.every": 3}
LAYOUTS = {  # name: (ranks, overrides)
    "tp2": (2, {"parallel.tp": 2}),
    "tp4": (4, {"parallel.tp": 4}),
    "tp2_dps2": (4, {"parallel.tp": 2, "parallel.dp_shard": 2}),
    "tp2_dpr2": (4, {"parallel.tp": 2, "parallel.dp_replicate": 2, "parallel.dp_shard": 1, **SHORT}),
    "tp2_dps2_dpr2": (8, {"parallel.tp": 2, "parallel.dp_shard": 2, "parallel.dp_replicate": 2, **SHORT}),
}


def steps_of(name: str) -> int:
    return LAYOUTS[name][1].get("train.steps", STEPS)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    sweep(root, 1, {"ref": {"train.steps": STEPS + 3, "checkpoint.every": 1, "checkpoint.keep": 10},
                    "base": {}}, COMMON)
    for nproc in (2, 4, 8):
        runs = {name: sets for name, (n, sets) in LAYOUTS.items() if n == nproc}
        if nproc == 4:  # recompute policies beside it (bit for bit the same training)
            runs.update({f"tp2_dps2_{p}": {**LAYOUTS["tp2_dps2"][1], "train.activation_checkpoint": p}
                         for p in ("full", "selective")})
        if nproc == 4:  # then continue checkpoints on other layouts: tp -> plain dp, and dp -> tp
            runs["tp2_dps2 "] = {"run.name": "tp2_dps2", "parallel.dp_shard": 4, "train.steps": STEPS + 3}
            runs["base"] = {"parallel.tp": 2, "parallel.dp_shard": 2, "train.steps": STEPS + 3}
        sweep(root, nproc, runs, COMMON)
    return root


def assert_matches_reference(root, name, steps):
    """Losses and gradient norms of every step, and the parameters at `steps`."""
    assert_run_matches(root / name, root / "ref", steps, TOKENS)


@pytest.mark.parametrize("policy", ["full", "selective"])
def test_recompute_policies_train_bit_for_bit_alike(root, policy):
    """`train.activation_checkpoint` full or selective under tp = 2 x dp_shard = 2: the same
    losses and gradient norms as no recompute, bit for bit (the same ops on the same values)."""
    plain = [(r["loss"], r["grad_norm"]) for r in read_metrics(root / "tp2_dps2")[:STEPS]]
    assert [(r["loss"], r["grad_norm"]) for r in read_metrics(root / f"tp2_dps2_{policy}")] == plain


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(root, name):
    assert_matches_reference(root, name, steps_of(name))


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_moves_the_analytic_bytes(root, name):
    """Per rank and step, every collective kind moves exactly what the layout's analytic
    model says: TP's activation gathers and reduce-scatters, FSDP's parameter gathers on
    top with dp_shard, HSDP's replicate all-reduce with dp_replicate (and these counted
    on the right mesh dimension)."""
    from dist_train.comm_model import KINDS, dense_step_bytes
    from dist_train.model import ModelArgs
    from tests.equivalence import read_config

    ranks, sets = LAYOUTS[name]
    assert len(read_metrics(root / name)) >= steps_of(name)
    tp, dpr = sets["parallel.tp"], sets.get("parallel.dp_replicate", 1)
    dps = ranks // (tp * dpr)
    cfg = read_config(root / name)  # the model and batch (a resumed run's layout differs)
    a = ModelArgs.from_config(cfg.model, cfg.data.seq_len, tokenizer_vocab=258)
    expect = dense_step_bytes(a, tp, dps, dpr, cfg.data.seq_len, cfg.train.global_batch, cfg.train.micro_batch)
    for r in read_metrics(root / name)[:steps_of(name)]:
        assert {k: r["comm"][k]["bytes"] // ranks for k in KINDS} == expect, (r["step"], r["comm"])
        by_dim = r["comm_by_dim"]
        assert ("dp_replicate" in by_dim) == (dpr > 1) and ("dp_shard" in by_dim) == (dps > 1), by_dim
        assert by_dim["tp"]["count"] > 0


@pytest.mark.parametrize("name", ["tp2_dps2", "base"])
def test_checkpoint_resumes_on_another_layout(root, name):
    """tp=2 x dp_shard=2 continued as dp_shard=4, and a 1-rank run continued as
    tp=2 x dp_shard=2: the resumed steps equal the reference's."""
    assert_matches_reference(root, name, STEPS + 3)
    state = json.loads((root / name / f"checkpoints/step-{STEPS + 3:06d}/train_state.json").read_text())
    assert state["sampler"]["consumed_samples"] == (STEPS + 3) * 8
