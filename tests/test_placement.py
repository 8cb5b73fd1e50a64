"""Topology and placement (issue 21): the maps `parallel.placement` builds, torch's constraint
on them, topology mistakes in one line, and one 8-rank gloo launch on 2 clusters of 2
simulated nodes (2 ranks each) whose clusters interleave the node numbers: pp = 2 x
dp_shard = 4 under `ordered` and `auto`, counted by link class from the observed
collectives, the same losses, and a resume of the ordered run under auto."""
from __future__ import annotations

import json

import pytest

from dist_train.config import ConfigError, load_config
from dist_train.layout import preflight
from dist_train.topology import Topology, build_topology, monotone, place
from tests.conftest import read_metrics, run_cli, sweep
from tests.equivalence import C_GRAD, assert_values_match

TOKENS = 16 * 128  # global batch x seq_len
INTERLEAVED = Topology(8, 2, (0, 1, 0, 1), ("a", "b"), {})  # nodes 0, 2 in cluster a; 1, 3 in b
CONTIGUOUS = Topology(8, 2, (0, 0, 1, 1), ("a", "b"), {})
TOPOLOGY = """[topology]
nodes = 4
cluster_map = { a = [0, 2], b = [1, 3] }
links = { inter_cluster = { bandwidth_gbps = 0.2, latency_ms = 1.0 } }
"""


def _classes(p, topo, dim):
    return {topo.group_link(g) for g in p.groups(dim)}


def test_auto_keeps_pp_on_the_slow_links_and_dp_shard_in_a_cluster():
    shape = (1, 2, 1, 4, 1)
    ordered = place("ordered", shape, INTERLEAVED)
    assert ordered.identity and _classes(ordered, INTERLEAVED, "dp_shard") == {"inter_cluster"}
    auto = place("auto", shape, INTERLEAVED)
    assert auto.mode == "auto" and not auto.identity
    assert _classes(auto, INTERLEAVED, "pp") == {"inter_cluster"}
    assert _classes(auto, INTERLEAVED, "dp_shard") == {"intra_cluster"}
    assert monotone(auto.ranks, shape)
    # numbered cluster by cluster, today's map is already that one; no topology: today's map
    assert place("auto", shape, CONTIGUOUS).identity and place("auto", shape, None).identity
    # tp inside a node, dp_shard across the cluster's nodes, dp_replicate between clusters
    hsdp = place("auto", (1, 1, 2, 2, 2), INTERLEAVED)
    assert [_classes(hsdp, INTERLEAVED, d) for d in ("dp_replicate", "dp_shard", "tp")] == [
        {"inter_cluster"}, {"intra_cluster"}, {"intra_node"}]
    # ep groups (blocks of dp_replicate x dp_shard x tp in mesh order) need increasing ranks too
    assert monotone(place("auto", (1, 1, 1, 4, 2), INTERLEAVED, ep=4).ranks, (1, 1, 1, 4, 2), ep=4)


def test_auto_refuses_maps_torch_cannot_build():
    """Clusters {0, 3} and {1, 2}: the map with pp between clusters and dp_shard inside has
    ranks decreasing along pp (torch sorts every group, so stage order would not be
    coordinate order); auto says so and keeps ordered's map."""
    assert not monotone((0, 2, 3, 1), (1, 1, 1, 2, 2))
    p = place("auto", (1, 1, 1, 8, 1), INTERLEAVED)
    assert p.identity  # one dim spanning everything: nothing to place
    p = place("auto", (1, 2, 1, 4, 1), Topology(8, 2, (0, 1, 1, 0), ("a", "b"), {}))
    assert p.identity and "decreasing" in p.note


@pytest.mark.parametrize("body,expected", [
    ("clusters = 3", "topology.clusters = 3 does not divide the launch's 4 node(s)"),
    ("links = { wan = { latency_ms = 5 } }", "unknown link class 'wan'"),
    ("nodes = 2", "topology.nodes = 2 but the launch has 4 node(s)"),
    ("cluster_map = { a = [0, 1, 2], b = [3] }", "every cluster must hold the same number of nodes"),
    ("cluster_map = { a = [0, 1], b = [1, 2] }", "node 1 is in both 'a' and 'b'"),
    ("links = { inter_cluster = { bandwidth_gbps = 0 } }", "must be a number > 0"),
])
def test_bad_topology_is_one_line(tmp_path, body, expected):
    path = tmp_path / "t.toml"
    path.write_text(f"[topology]\n{body}\n")
    with pytest.raises(ConfigError) as e:
        cfg = load_config("configs/tiny.toml", [f"topology.file={path}", f"run.dir={tmp_path}"])
        build_topology(cfg.topology, 8, 4)
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_bad_topology_through_the_cli(tmp_path):
    """`dist-train local --topology` refuses a topology that does not match the launch
    before any rank starts: one line, exit 2."""
    (tmp_path / "t.toml").write_text("[topology]\nclusters = 3\n")
    proc = run_cli("local", "--nproc", "8", "--nodes", "4", "configs/tiny.toml", "--topology",
                   str(tmp_path / "t.toml"), "--set", f"run.dir={tmp_path}", check=False, timeout=120)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err[-2000:]
    assert "topology.clusters = 3 does not divide the launch's 4 node(s)" in err


def test_preflight_checks_the_topology_against_the_launch(tmp_path):
    (tmp_path / "t.toml").write_text(TOPOLOGY)
    cfg = load_config("configs/tiny.toml", [f"topology.file={tmp_path / 't.toml'}", f"run.dir={tmp_path}"])
    assert cfg.topology.cluster_map == {"a": [0, 2], "b": [1, 3]}
    with pytest.raises(ConfigError, match="topology.nodes = 4 but the launch has 2"):
        preflight([cfg], 8, 2)


def _link(record, cls, kind):
    return record["comm_by_link"][cls][kind]


def test_placements_on_two_simulated_clusters(tmp_path):
    """One launch of 8 ranks on 4 nodes, the interleaved two-cluster topology with a slowed
    inter-cluster link, pp = 2 x dp_shard = 4, no clipping: ordered (2 steps, checkpoint),
    auto (4 steps), then the ordered run resumed under auto to step 4; and auto clipping (2).
    - auto: nothing but the pipeline's send/recv crosses clusters (no all-gather,
      reduce-scatter, all-reduce or all-to-all); clipping adds the one all-reduce of the
      global gradient norm over pp (4 bytes a rank), and its norm is the one the stages'
      squares add up to without it; ordered reduce-scatters and all-gathers across clusters;
    - every op is counted under exactly one class (the classes add up to `comm`);
    - the losses agree across placements, and after resuming under the other placement."""
    (tmp_path / "t.toml").write_text(TOPOLOGY)
    common = {"topology.file": str(tmp_path / "t.toml"), "parallel.pp": 2, "train.grad_clip": 0.0}
    runs = {"ordered": {"parallel.placement": "ordered", "train.steps": 2, "checkpoint.every": 2},
            "auto": {"parallel.placement": "auto", "train.steps": 4, "checkpoint.every": 0},
            "ordered ": {"parallel.placement": "auto", "train.steps": 4, "checkpoint.every": 0},  # resumed
            "clip": {"parallel.placement": "auto", "train.steps": 2, "checkpoint.every": 0, "train.grad_clip": 1.0}}
    out = sweep(tmp_path, 8, runs, common, nodes=4)
    assert "placement: auto" in out.stdout and "pp: [0,2] [1,3] [4,6] [5,7] over inter_cluster" in out.stdout
    assert "topology: simulating inter_cluster (1 ms, 0.2 Gbit/s)" in out.stdout
    ordered, auto = read_metrics(tmp_path / "ordered"), read_metrics(tmp_path / "auto")
    assert [r["step"] for r in ordered] == [1, 2, 3, 4] and [r["step"] for r in auto] == [1, 2, 3, 4]
    placed = json.loads((tmp_path / "auto" / "placement.json").read_text())
    assert placed["placement"] == "auto"
    assert [g["link"] for g in placed["dims"]["pp"]["groups"]] == ["inter_cluster"] * 4
    assert [g["link"] for g in placed["dims"]["dp_shard"]["groups"]] == ["intra_cluster"] * 2
    assert {r["rank"]: r["cluster"] for r in placed["ranks"]} == {0: "a", 1: "a", 2: "b", 3: "b", 4: "a", 5: "a",
                                                                   6: "b", 7: "b"}
    for r in auto + ordered:
        for kind, c in r["comm"].items():
            assert sum(r["comm_by_link"][cls][kind]["count"] for cls in r["comm_by_link"]) == c["count"], (r["step"], kind)
            assert sum(r["comm_by_link"][cls][kind]["bytes"] for cls in r["comm_by_link"]) == c["bytes"], (r["step"], kind)
    clip = read_metrics(tmp_path / "clip")
    for r in auto + ordered[2:] + clip:  # under auto
        for kind in ("all_gather", "reduce_scatter", "all_to_all"):
            assert _link(r, "inter_cluster", kind) == {"count": 0, "bytes": 0}, (r["step"], kind)
        clipping = r in clip  # the global norm's all-reduce over pp, 4 bytes from each of the 8 ranks
        assert _link(r, "inter_cluster", "all_reduce") == {"count": 8 * clipping, "bytes": 32 * clipping}, r["step"]
        assert _link(r, "inter_cluster", "send_recv")["count"] > 0
        assert _link(r, "intra_cluster", "reduce_scatter")["count"] > 0
    assert_values_match([clip[0]["grad_norm"]], [auto[0]["grad_norm"]], TOKENS, "step 1's norm: clipping vs not",
                        C_GRAD)
    for r in ordered[:2]:
        assert _link(r, "inter_cluster", "all_gather")["count"] > 0
        assert _link(r, "inter_cluster", "reduce_scatter")["count"] > 0
        assert _link(r, "inter_cluster", "send_recv")["count"] == 0
    assert_values_match([r["loss"] for r in ordered], [r["loss"] for r in auto], TOKENS, "ordered (resumed under auto) "
                        "vs auto")
    assert "at step 2" in out.stdout.split("resumed from", 1)[1].splitlines()[0]


def test_link_model_is_the_ring_time_over_the_slowest_link():
    """The topology's link model (fault/inject.py): latency per ring step + wire bytes /
    bandwidth, for the slowest class among the op's members; other classes cost nothing."""
    from dist_train.fault.inject import LinkModel
    from dist_train.fault.recorder import CollectiveRecord

    model = LinkModel(INTERLEAVED.group_link, {"inter_cluster": (0.002, 1e6)})
    ar = CollectiveRecord("dp_shard", "allreduce", "all_reduce", 1, 4000, (0, 1, 2, 3), True)
    assert model.seconds(ar) == pytest.approx(2 * 3 * 0.002 + 2 * 3 * 4000 / 4 / 1e6)
    recv = CollectiveRecord("pp", "recv", "send_recv", 1, 5000, (2, 0), True)
    assert model.seconds(recv) == pytest.approx(0.002 + 5000 / 1e6)
    inside = CollectiveRecord("dp_shard", "allgather", "all_gather", 1, 4000, (0, 1, 4, 5), True)
    assert model.seconds(inside) == 0.0


class _Done:
    def __init__(self, done: bool):
        self.done = done

    def is_completed(self):
        return self.done

    def wait(self, timeout=None):
        return True


@pytest.mark.parametrize("done_before_wait", [True, False])
def test_observed_work_holds_an_op_for_its_link_time(done_before_wait):
    """Completed before its wait, an op ends link_s after it was entered; waited while in
    flight, link_s after it completes (lower bounds only: sleeping guarantees them)."""
    import time

    from dist_train.fault.collectives import _ObservedWork
    from dist_train.fault.recorder import CollectiveRecord, GroupState, _now

    st = GroupState("pp", (0, 2))
    rec = CollectiveRecord("pp", "send", "send_recv", 1, 10, (0, 2), True)
    rec.link_s, rec.t_enter = 0.05, _now()
    t0 = time.monotonic()
    _ObservedWork(_Done(done_before_wait), st, rec).wait()
    assert time.monotonic() - t0 >= 0.05 - 1e-3 and rec.t_exit - rec.t_enter >= 0.05e9


def test_c4_names_the_link_class_of_a_slow_link(tmp_path):
    from dist_train.fault.watcher import Watcher, link_class
    from dist_train.topology import write_placement

    write_placement(tmp_path, place("auto", (1, 2, 1, 4, 1), INTERLEAVED), INTERLEAVED)
    assert [link_class(tmp_path, r) for r in ([0, 1], [0, 4], [0, 2])] == ["intra_node", "intra_cluster",
                                                                            "inter_cluster"]
    assert link_class(tmp_path / "elsewhere", [0, 2]) is None  # no topology: no class
    lines = []
    w = Watcher(None, 8, log=lines.append)
    [out] = w._emit({"kind": "slow_link", "ranks": [0, 2], "group": "pp", "since_onset_s": 1.0, "run": str(tmp_path),
                     "step": 7, "why": "slow"}, {}, 0.0, dedupe=None)
    assert out["link_class"] == "inter_cluster" and "inter_cluster link" in lines[0]
