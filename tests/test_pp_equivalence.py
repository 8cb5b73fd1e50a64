"""Pipeline schedules (gpipe, 1f1b, interleaved, layered) at pp=2 and pp=4, and pp composed
with dp_shard, dp_replicate and tp, give the single-process plain-accumulation reference's losses,
gradient norms (every step) and final parameters; checkpoints move between pp layouts;
layered accumulation gathers and reduce-scatters each layer a fixed number of times per
step, whatever the number of micro-batches.

Model: the tiny preset with 8 layers (so pp=4 x 2 virtual stages fits), global batch 16,
micro-batch 2: 8 micro-batches per step on one data-parallel rank. Four launches (1, 2,
4, then 1 rank) run all layouts.
"""
from __future__ import annotations

import json

import pytest

from tests.conftest import read_metrics, sweep
from tests.equivalence import SGD, assert_run_matches

STEPS = 5
TOKENS = 16 * 128  # per step: global batch x seq_len
COMMON = {"model.n_layers": 8, "train.steps": STEPS, "checkpoint.every": STEPS, **SGD}
SCHEDULES = ("gpipe", "1f1b", "interleaved", "layered")
PP2 = {f"pp2_{s}": {"parallel.pp": 2, "parallel.pp_schedule": s, "train.activation_checkpoint": "selective"}
       for s in SCHEDULES}  # recompute composed with every schedule (pp4: the same schedules without)
PP4 = {f"pp4_{s}": {"parallel.pp": 4, "parallel.pp_schedule": s} for s in SCHEDULES}
PP4["pp2_dps2_layered"] = {"parallel.pp": 2, "parallel.dp_shard": 2, "parallel.pp_schedule": "layered",
                           "train.activation_checkpoint": "full"}
PP4["pp2_tp2_1f1b"] = {"parallel.pp": 2, "parallel.tp": 2, "parallel.pp_schedule": "1f1b",
                       "train.activation_checkpoint": "selective"}
PP4["pp2_dpr2_gpipe"] = {"parallel.pp": 2, "parallel.dp_replicate": 2, "parallel.dp_shard": 1,
                         "parallel.pp_schedule": "gpipe"}
LAYOUTS = [*PP2, *PP4]
MICRO = (2, 4, 8)  # micro-batches per step for the layered-accumulation counts
UNITS = 8 + 1      # FSDP units with layered stages: one per layer stage, plus the head


def _counts_runs() -> dict:
    runs = {f"layered_{n}": {"parallel.pp_schedule": "layered", "parallel.dp_shard": 2,
                             "train.global_batch": 2 * 2 * n, "train.steps": 2, "checkpoint.every": 0,
                             "train.activation_checkpoint": "true"}
            for n in MICRO}
    runs["plain_8"] = {"parallel.pp_schedule": "1f1b", "parallel.dp_shard": 2, "train.global_batch": 32,
                       "train.steps": 2, "checkpoint.every": 0}
    return runs


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("pp")
    sweep(root, 1, {"ref": {"train.steps": STEPS + 2, "checkpoint.keep": 5, "checkpoint.every": 1}}, COMMON)
    sweep(root, 2, {**PP2, **_counts_runs()}, COMMON)
    # the pp=2 gpipe checkpoint continues as pp=4 layered, pp=2 1f1b as pp=2 x dp_shard=2
    # (after the equivalence runs); the second keeps every stage's parameters on the same stage
    sweep(root, 4, {**PP4, "pp2_gpipe": {"parallel.pp": 4, "parallel.pp_schedule": "layered",
                                         "train.steps": STEPS + 2},
                    "pp2_1f1b": {"parallel.pp": 2, "parallel.pp_schedule": "1f1b", "train.steps": STEPS + 2}},
          COMMON)
    sweep(root, 1, {"pp4_interleaved": {"train.steps": STEPS + 2}}, COMMON)  # ... and pp=4 as one process
    return root


def assert_matches_reference(root, name, steps):
    """Losses and gradient norms of every step, and the parameters at `steps`."""
    assert_run_matches(root / name, root / "ref", steps, TOKENS)


@pytest.mark.parametrize("name", LAYOUTS)
def test_schedule_matches_plain_accumulation(root, name):
    assert_matches_reference(root, name, STEPS)


def test_pipeline_metrics(root):
    rec = read_metrics(root / "pp4_1f1b")[-1]
    assert rec["comm"]["send_recv"]["count"] > 0
    assert 0.0 < rec["bubble_fraction"] < 1.0
    assert read_metrics(root / "ref")[-1]["bubble_fraction"] == 0.0


@pytest.mark.parametrize("name", ["pp2_gpipe", "pp2_1f1b", "pp4_interleaved"])
def test_checkpoint_moves_between_pp_layouts(root, name):
    """pp=2 gpipe -> pp=4 layered, pp=2 1f1b -> pp=2 x dp_shard=2 (each stage's optimizer
    hyper-parameters and state come back to the same stage), and pp=4 interleaved -> one
    process: the resumed steps
    equal the reference's, and the sampler is where the reference's is."""
    assert_matches_reference(root, name, STEPS + 2)
    state = json.loads((root / name / f"checkpoints/step-{STEPS + 2:06d}/train_state.json").read_text())
    ref = json.loads((root / f"ref/checkpoints/step-{STEPS + 2:06d}/train_state.json").read_text())
    assert state["sampler"] == ref["sampler"]


def test_layered_fsdp_gathers_do_not_grow_with_micro_batches(root):
    """Layered accumulation with activations checkpointed per micro-batch, pp=1,
    dp_shard=2 (2 ranks): per step each FSDP unit is
    reduce-scattered once and all-gathered at most twice (forward, backward) for 2, 4 and 8
    micro-batches; plain accumulation gathers every block twice per micro-batch (forward,
    backward) and the root once (it stays gathered from forward through backward)."""
    ranks = 2
    counts = {}
    for n in MICRO:
        comm = read_metrics(root / f"layered_{n}")[-1]["comm"]
        counts[n] = (comm["all_gather"]["count"], comm["reduce_scatter"]["count"])
    assert len(set(counts.values())) == 1, counts
    gathers, scatters = counts[MICRO[0]]
    assert scatters == ranks * UNITS and gathers <= ranks * 2 * UNITS, counts
    plain = read_metrics(root / "plain_8")[-1]["comm"]["all_gather"]["count"]
    assert plain == ranks * 8 * (2 * (UNITS - 1) + 1)  # 8 micro-batches: blocks twice, root once
    assert gathers * 8 <= plain
