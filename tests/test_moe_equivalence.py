"""Expert parallelism through real gloo ranks gives the single-process MoE model's losses,
aux losses, gradient norms and final parameters (dropless, fp32): ep=2 and ep=4 with
dp_shard, with dp_replicate (HSDP: experts sharded over the replicas too), composed with tp
(with activation checkpointing; with a shared expert, against its own reference), with a
pipeline under 1f1b, interleaved and layered schedules (the aux losses' gradient injected on
stages that compute no loss), layered accumulation without a pipeline, and ep=8 with
the hierarchical all-to-all on 2 simulated nodes; checkpoints reload across ep layouts; the
per-step "moe" metrics add up.

Model: configs/tiny-moe.toml (8 experts of width 64, top-2, every block). Launches:
1 rank (the references without and with a shared expert, and a capacity-limited run),
4 ranks, then 8 ranks as 2 nodes.
"""
from __future__ import annotations

import json

import pytest

from tests.conftest import read_metrics, sweep
from tests.equivalence import C_VALUE, LOSS_AND_NORM, SGD, assert_run_matches, metric

STEPS = 3
CONFIG = "configs/tiny-moe.toml"
COMMON = {"train.steps": STEPS, "checkpoint.every": STEPS, **SGD}
TOKENS = 16 * 128  # per step: global batch x seq_len
COPIES = TOKENS * 2  # token copies per MoE layer and step (top-2)
LAYOUTS = {  # name: (ranks, overrides); all dp_shard = -1 (fills the rest)
    "ep4": (4, {"parallel.ep": 4}),
    "ep2": (4, {"parallel.ep": 2}),
    "tp2_ep2": (4, {"parallel.tp": 2, "parallel.ep": 2, "train.activation_checkpoint": "true"}),
    "tp2_ep4": (4, {"parallel.tp": 2, "parallel.ep": 4}),
    "pp2_ep2": (4, {"parallel.pp": 2, "parallel.ep": 2}),
    "pp2_ep2_layered": (4, {"parallel.pp": 2, "parallel.ep": 2, "parallel.pp_schedule": "layered"}),
    "pp2_ep2_interleaved": (4, {"parallel.pp": 2, "parallel.ep": 2, "parallel.pp_schedule": "interleaved"}),
    "layered_ep4": (4, {"parallel.ep": 4, "parallel.pp_schedule": "layered"}),
    "hsdp_ep2": (4, {"parallel.dp_replicate": 2, "parallel.ep": 2}),
    "tp2_ep2_shared": (4, {"parallel.tp": 2, "parallel.ep": 2, "model.moe_shared_expert": "true"}),
    "ep8_hier": (8, {"parallel.ep": 8, "parallel.a2a": "hierarchical"}),
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    sweep(root, 1, {"ref": {"train.steps": STEPS + 2, "checkpoint.every": 1, "checkpoint.keep": 10},
                    "ref_shared": {"model.moe_shared_expert": "true"},
                    "capped": {"model.moe_capacity_factor": 1.0, "train.steps": 1, "checkpoint.every": 0}},
          COMMON, config=CONFIG)
    runs = {name: sets for name, (n, sets) in LAYOUTS.items() if n == 4}
    runs["ep2 "] = {"run.name": "ep2", "parallel.ep": 4, "train.steps": STEPS + 2}  # continue ep=2 as ep=4
    sweep(root, 4, runs, COMMON, config=CONFIG)
    # ... and tp=2 x ep=4 on 4 ranks as ep=8 on 8 ranks over 2 nodes, hierarchical
    sweep(root, 8, {"ep8_hier": LAYOUTS["ep8_hier"][1],
                    "tp2_ep4 ": {"run.name": "tp2_ep4", "parallel.ep": 8, "parallel.a2a": "hierarchical",
                                 "train.steps": STEPS + 2}}, COMMON, config=CONFIG, nodes=2)
    return root


def reference(name: str) -> str:
    return "ref_shared" if name.endswith("_shared") else "ref"


def assert_matches_reference(root, name, steps):
    """Losses, aux losses and gradient norms of every step, the expert loads exactly, and
    the parameters at `steps` (tests/equivalence.py)."""
    ref = root / reference(name)
    values = LOSS_AND_NORM + (("aux_loss", lambda r: r["moe"]["aux_loss"], C_VALUE),
                              ("z_loss", lambda r: r["moe"]["z_loss"], C_VALUE))
    want = assert_run_matches(root / name, ref, steps, TOKENS, values)
    assert metric(root / name, lambda r: r["moe"]["load"], steps) == metric(ref, lambda r: r["moe"]["load"], steps)
    assert "layers.0.feed_forward.experts.w1" in want and want["layers.0.feed_forward.experts.w1"].shape == (8, 64, 64)
    assert ("layers.0.feed_forward.shared_expert.w1.weight" in want) == name.endswith("_shared")


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(root, name):
    assert_matches_reference(root, name, STEPS)


@pytest.mark.parametrize("name", ["ep2", "tp2_ep4"])
def test_checkpoint_resumes_on_another_ep_layout(root, name):
    """ep=2 continued as ep=4; tp=2 x ep=4 (4 ranks) continued as ep=8 over 2 nodes."""
    assert_matches_reference(root, name, STEPS + 2)
    state = json.loads((root / name / f"checkpoints/step-{STEPS + 2:06d}/train_state.json").read_text())
    assert state["sampler"]["consumed_samples"] == (STEPS + 2) * 16


def test_moe_metrics(root):
    ref = read_metrics(root / "ref")
    for r in ref:
        moe = r["moe"]
        assert sorted(moe["load"]) == ["0", "1", "2", "3"]
        assert all(sum(load) == COPIES for load in moe["load"].values())  # dropless: every copy counted once
        assert moe["dropped_tokens"] == 0 and moe["aux_loss"] > 3.9 and moe["z_loss"] > 0  # aux ~ 1 per layer
        assert moe["a2a"]["messages"] == 0 and r["comm"]["all_to_all"]["count"] == 0
    capped = read_metrics(root / "capped")[0]["moe"]
    assert capped["dropped_tokens"] > 0 and all(sum(v) == COPIES for v in capped["load"].values())
    # one node: no all-to-all crosses a node boundary; ep=8 on 2 nodes: some do
    ep4 = read_metrics(root / "ep4")[0]
    assert ep4["moe"]["a2a"]["messages"] > 0 and ep4["moe"]["a2a"]["cross_node_messages"] == 0
    assert ep4["comm"]["all_to_all"]["count"] > 0
    hier = read_metrics(root / "ep8_hier")[0]["moe"]["a2a"]
    # per MoE layer, forward and backward: counts + rows, rows back (forward), rows and rows back (backward):
    # at most 5 exchanges x P(N-1) = 8 messages across nodes
    assert 0 < hier["cross_node_messages"] <= 4 * 5 * 8 and hier["cross_node_bytes"] > 0
