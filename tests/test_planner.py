"""The layout planner (dist_train/planner.py): its memory pieces against hand counts and
against what autograd really keeps, ranking sanity, the CLI table and one-line errors.
Single-process and fast; bench/planner.py compares it with real runs."""
from __future__ import annotations

import pytest
import torch

from conftest import run_cli
from dist_train.config import load_config
from dist_train.errors import ConfigError
from dist_train.errors import UserError
from dist_train import planner as P

GB = P.GB


def tiny(*sets):
    return load_config("configs/tiny.toml", list(sets))


def cpu_files(tmp_path, nodes=1, **dev):
    """A topology file in dist_train/topology.py's schema (the one `dist-train local
    --topology` takes: Gbit/s, ms) and a device file, as bench/planner.py writes them."""
    d = {"peak_tflops": 0.04, "memory_gb": 5.0, "baseline_gb": 0.0, **dev}
    device = tmp_path / "cpu-device.toml"
    device.write_text("[device]\n" + "".join(f"{k} = {v}\n" for k, v in d.items()))
    topo = tmp_path / "cpu-topology.toml"
    topo.write_text(f"[topology]\nnodes = {nodes}\n"
                    "links = { intra_node = { bandwidth_gbps = 3.2, latency_ms = 0.1 } }\n")
    return topo, device


def cpu_network(tmp_path, gpus=4, **dev):
    topo, device = cpu_files(tmp_path, **dev)
    return P.network(tiny(f"topology.file={topo}"), gpus, "cpu", device_file=device)


def cpu_device(tmp_path, **dev):
    return P.load_device(cpu_files(tmp_path, **dev)[1], "cpu")


# ----------------------------------------------------------------------------- memory pieces


def test_parameters_weights_and_adamw_by_hand(tmp_path):
    """tiny: dim 64, 4 blocks, 4 heads of 16, 2 kv heads, ffn 192 (8/3 x 64 rounded to 64),
    vocab 320 (258 byte ids rounded to 64). A block: 2 norms (2 x 64) + wq, wo (2 x 64 x 64)
    + wk, wv (2 x 32 x 64) + w1, w2, w3 (3 x 192 x 64) = 128 + 8192 + 4096 + 36864 = 49280;
    embedding and head 2 x 320 x 64 + the final norm 64 = 41024; total 238144."""
    cfg = tiny()
    a = P.model_args(cfg)
    assert (a.ffn_dim, a.vocab_size) == (192, 320)
    whole = P.rank_params(a, P.Layout(), 0)
    assert whole["blocks"] == [49280] * 4 and whole["total"] == 4 * 49280 + 41024 == 238144
    from dist_train.model import count_params
    assert whole["total"] == count_params(a)["total"]
    # pp = 2: rank 0 has blocks 0-1 and the embedding, rank 1 blocks 2-3, the norm and head
    lay = P.Layout(pp=2, schedule="1f1b", dp_shard=2)
    assert P.rank_params(a, lay, 0)["total"] == 2 * 49280 + 320 * 64
    assert P.rank_params(a, lay, 1)["total"] == 2 * 49280 + 320 * 64 + 64
    # tp = 2 halves every matrix; the norms stay whole
    assert P.rank_params(a, P.Layout(tp=2), 0)["blocks"][0] == 128 + (8192 + 4096 + 36864) // 2
    dev = cpu_device(tmp_path)
    m = P.memory_per_rank(cfg, P.Layout(dp_shard=4, micro_batch=2), dev)
    assert m.parts["weights"] == 4 * 238144 / 4           # fp32 master weights, sharded over 4
    assert m.parts["grads"] == 4 * 238144 / 4
    assert m.parts["optimizer"] == 8 * 238144 / 4         # AdamW m and v
    assert m.parts["grad_accumulation"] == 4 * 238144     # 2 micro-batches: unsharded grads kept
    sgd = P.memory_per_rank(tiny("train.optimizer=sgd", "train.momentum=0.9"), P.Layout(dp_shard=4, micro_batch=2), dev)
    assert sgd.parts["optimizer"] == 4 * 238144 / 4
    one = P.memory_per_rank(cfg, P.Layout(dp_shard=4, micro_batch=4), dev)  # 16 / 4 ranks: 1 micro-batch
    assert one.parts["grad_accumulation"] == 4 * 49280


def _saved_bytes(block, x, cos, sin, skip) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of block(x)."""
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, cos, sin)
    return sum(seen.values())


def test_block_activations_match_what_autograd_keeps():
    """The torch-path formulas (none: 11 sbh + 4 sbf at tp = 1; full: the input) against the
    tensors a real block saves; selective against the outputs of the ops the policy keeps.
    The difference allowed is the small per-row statistics (rstd, logsumexp)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from dist_train.model import _SAVED_OPS, Block, Transformer

    cfg = tiny("data.seq_len=32")
    a = P.model_args(cfg)
    m = Transformer(a)
    m.init_buffers()
    b, s = 2, 32
    small = 2 * b * s * 4 + b * a.n_heads * s * 4  # two rstd columns and the logsumexp
    x = torch.randn(b, s, a.dim, requires_grad=True)
    for mode in ("none", "full"):
        blk = Block(a, 0)
        blk.checkpoint = mode
        skip = {p.untyped_storage().data_ptr() for p in blk.parameters()} | {
            m.rope_cos.untyped_storage().data_ptr(), m.rope_sin.untyped_storage().data_ptr()}
        got = _saved_bytes(blk, x, m.rope_cos, m.rope_sin, skip)
        want = P.block_activation_bytes(a, b, s, 1, mode, "torch", 4)
        assert want <= got <= want + small, (mode, got, want)
    saved_ops = {getattr(torch.ops.aten, n).default for n in _SAVED_OPS if hasattr(torch.ops.aten, n)}

    class Record(TorchDispatchMode):
        kept = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in saved_ops:
                outs = out if isinstance(out, (tuple, list)) else [out]
                self.kept += sum(o.numel() * o.element_size() for o in outs if isinstance(o, torch.Tensor))
            return out

    with Record() as rec:
        Block(a, 0)._forward(x, m.rope_cos, m.rope_sin)
    got = rec.kept + x.numel() * 4  # + the checkpoint's input
    want = P.block_activation_bytes(a, b, s, 1, "selective", "torch", 4)
    assert want <= got <= want + small


def test_in_flight_micro_batches_per_schedule():
    lay = lambda sched, pp=4: P.Layout(pp=pp, schedule=sched)
    assert P.in_flight(P.Layout(), 8, 0) == (1.0, 1)
    assert P.in_flight(lay("gpipe"), 8, 0) == (8.0, 8)
    assert P.in_flight(lay("layered"), 8, 3) == (8.0, 8)
    assert [P.in_flight(lay("1f1b"), 8, r)[0] for r in range(4)] == [4, 3, 2, 1]
    assert P.in_flight(lay("1f1b"), 2, 0)[0] == 2                      # capped by the micro-batches
    # interleaved, v = 2: (v - 1) p + 2 (p - 1 - r) + 1 chunks of half a rank's blocks
    assert [P.in_flight(lay("interleaved"), 8, r)[0] for r in range(4)] == [11 / 2, 9 / 2, 7 / 2, 5 / 2]


def test_checkpointing_and_sharding_lower_memory(tmp_path):
    cfg = tiny("model.dim=256", "model.n_layers=8", "model.n_heads=8", "data.seq_len=256", "train.global_batch=32")
    dev = cpu_device(tmp_path)
    peak = lambda **kw: P.memory_per_rank(cfg, P.Layout(micro_batch=4, **kw), dev).peak
    assert peak(dp_shard=4, checkpoint="full") < peak(dp_shard=4, checkpoint="selective") < peak(dp_shard=4)
    assert peak(dp_shard=4) < peak(dp_replicate=4)  # FSDP shards the state
    pp = lambda sched: P.memory_per_rank(cfg, P.Layout(pp=2, schedule=sched, dp_shard=2, micro_batch=4), dev)
    assert pp("1f1b").peak < pp("gpipe").peak and pp("1f1b").pp_rank == 0  # 1f1b: rank 0 holds pp micro-batches


# ----------------------------------------------------------------------------- time and ranking


def test_bubble_shrinks_with_micro_batches(tmp_path):
    topo = cpu_network(tmp_path)
    frac = lambda gb, sched="1f1b": P.step_time(tiny(f"train.global_batch={gb}"),
                                               P.Layout(pp=4, schedule=sched, micro_batch=1), topo)[1]["bubble_fraction"]
    assert frac(4) == pytest.approx(3 / (4 + 3))      # (p - 1) / (m + p - 1)
    assert frac(16) == pytest.approx(3 / (16 + 3))
    assert frac(16, "gpipe") == frac(16)
    assert frac(16, "interleaved") == pytest.approx((3 / 32) / (1 + 3 / 32))  # / v


def test_ranks_sharing_cores_fill_the_bubble(tmp_path):
    """device.cores < ranks on the node: a rank in the bubble yields its core, so the time is
    max(busy, busy (1 + bubble) c / n); with a core per rank the full bubble is paid."""
    (tmp_path / "shared").mkdir()
    own, shared = cpu_network(tmp_path), cpu_network(tmp_path / "shared", cores=2)  # 4 ranks on one node
    cfg = tiny("train.global_batch=16")
    two = P.Layout(pp=2, schedule="gpipe", dp_shard=2, micro_batch=2)  # m = 4: bubble (p - 1)/m = 1/4
    t_own, d_own = P.step_time(cfg, two, own)
    t_sh, d_sh = P.step_time(cfg, two, shared)
    assert d_own["bubble_fraction"] == pytest.approx(0.25 / 1.25)
    assert d_sh["bubble"] == 0 and t_sh == pytest.approx(t_own - d_own["bubble"])  # 1.25 x 2/4 < 1
    deep = P.Layout(pp=4, schedule="gpipe", micro_batch=16)  # m = 1: bubble 3, (1 + 3) x 2/4 = 2
    assert P.step_time(cfg, deep, own)[1]["bubble_fraction"] == pytest.approx(3 / 4)
    assert P.step_time(cfg, deep, shared)[1]["bubble_fraction"] == pytest.approx(1 / 2)
    flat = P.Layout(dp_shard=4, micro_batch=4)  # no pipeline: nothing changes
    assert P.step_time(cfg, flat, own)[0] == P.step_time(cfg, flat, shared)[0]


def test_sync_floor_is_paid_by_every_call(tmp_path):
    """device.sync_ms: each collective call costs max(hops x latency, sync), each p2p message
    max(latency, sync); layered gathers a stage's units once a pass, not once a micro-batch."""
    (tmp_path / "sync").mkdir()
    idle, loaded = cpu_network(tmp_path), cpu_network(tmp_path / "sync", sync_ms=2.0)  # latency 0.1 ms a hop
    cfg = tiny()  # 4 blocks, global batch 16
    gap = 2e-3 - 1e-4
    tp = P.Layout(tp=2, dp_shard=2, micro_batch=2)  # m = 4: tp 2 x 4 (4 L + 2) + 2 x 4 calls, FSDP 4 (2 L + 1) + L + 1
    a, b = P.step_time(cfg, tp, idle)[1], P.step_time(cfg, tp, loaded)[1]
    assert b["tp"] - a["tp"] == pytest.approx((2 * 4 * 18 + 8) * gap)
    assert b["dp"] - a["dp"] == pytest.approx((4 * 9 + 5) * gap)
    layered = P.Layout(pp=2, schedule="layered", dp_shard=2, micro_batch=2)  # stage of 2 blocks, m = 4
    a, b = P.step_time(cfg, layered, idle)[1], P.step_time(cfg, layered, loaded)[1]
    assert b["dp"] - a["dp"] == pytest.approx((2 * 2 + 1 + 3) * gap)
    assert b["pp_p2p"] - a["pp_p2p"] == pytest.approx(2 * 4 * 2 * gap)  # 2 m messages at each of 2 boundaries


def test_recompute_costs_a_forward(tmp_path):
    topo = cpu_network(tmp_path)
    cfg = tiny()
    t = lambda ac: P.step_time(cfg, P.Layout(dp_shard=4, micro_batch=4, checkpoint=ac), topo)[1]["compute"]
    assert t("full") == pytest.approx(t("none") * 4 / 3)
    assert t("selective") == t("none")  # torch path: only elementwise ops are recomputed


def test_a_layout_that_does_not_fit_is_listed_with_its_reason():
    cfg = load_config("configs/llama-13b.toml", [])
    topo = P.default_topology("h100", 8)
    p = P.plan(cfg, 8, topo, micro_batches=[1], checkpoints=("none",), schedules=("1f1b",))
    assert all(x.memory.peak <= 80 * GB for x in p.fitting)
    lone = next(x for x in p.too_big if x.layout.tp == 1 and x.layout.pp == 1 and x.layout.dp_replicate == 8)
    assert "> 80 GB" in lone.reason and "largest" in lone.reason  # 13B replicated with AdamW: ~200 GB
    assert lone.memory.peak > 16 * 13e9
    # the same layouts fit on B200's 192 GB where they need less
    big = P.plan(cfg, 8, P.default_topology("b200", 8), micro_batches=[1], checkpoints=("none",), schedules=("1f1b",))
    assert len(big.fitting) >= len(p.fitting)


def test_links_follow_the_mesh(tmp_path):
    topo = P.default_topology("h100", 64)
    assert topo.gpus_per_node == 8 and topo.topo.nodes == 8 and not topo.given
    # the preset's datasheet links in topology.py's classes and units: 3600 Gbit/s = 450 GB/s
    assert topo.link("intra_node").bandwidth == 450 * GB and topo.link("intra_cluster").bandwidth == 50 * GB
    assert topo.link("intra_node").latency == pytest.approx(3e-6)
    assert P.preset_links("h100")["intra_node"] == {"bandwidth_gbps": 3600.0, "latency_ms": 0.003}
    links = topo.dim_links(P.Layout(tp=8, dp_shard=8))
    assert links["tp"].name == "intra_node" and links["dp_shard"].name == "intra_cluster"
    # tp across nodes pays InfiniBand: slower than tp inside a node
    cfg = load_config("configs/llama-13b.toml", [])
    t8 = P.step_time(cfg, P.Layout(tp=8, dp_shard=8), topo)[1]["tp"]
    assert topo.dim_links(P.Layout(tp=16, dp_shard=4))["tp"].name == "intra_cluster"
    t16 = P.step_time(cfg, P.Layout(tp=16, dp_shard=4), topo)[1]["tp"]
    assert t16 > t8
    # with --nodes 4 a node holds 16: the same tp = 16 stays on NVLink
    wide = P.network(cfg, 64, "h100", nodes=4)
    assert wide.gpus_per_node == 16 and wide.dim_links(P.Layout(tp=16, dp_shard=4))["tp"].name == "intra_node"


def test_links_follow_the_trainers_placement():
    """configs/topology/two-clusters.toml (the file `dist-train local --topology` takes: 4
    nodes, clusters a = nodes 0, 2 and b = 1, 3, inter_cluster 0.1 Gbit/s 5 ms) on 32 H100s:
    `ordered` puts dp_shard's groups (ranks 0-15: nodes 0, 1) across the clusters, `auto`
    (topology.place) keeps them in one and puts pp across; the planner charges each dim the
    class the trainer's placement crosses, and the file's figures in Gbit/s and ms."""
    from dist_train.topology import place

    lay = P.Layout(pp=2, dp_shard=16)
    got = {}
    for mode in ("ordered", "auto"):
        cfg = load_config("configs/llama-13b.toml", ["topology.file=configs/topology/two-clusters.toml",
                                                     f"parallel.placement={mode}"])
        net = P.network(cfg, 32, "h100")
        assert net.given and net.gpus_per_node == 8
        ic = net.link("inter_cluster")
        assert ic.bandwidth == pytest.approx(0.1e9 / 8) and ic.latency == pytest.approx(5e-3)
        got[mode] = {k: v.name for k, v in net.dim_links(lay).items()}
        p = place(mode, (1, 2, 1, 16, 1), net.topo)
        assert got[mode]["dp_shard"] == max((net.topo.group_link(g) for g in p.groups("dp_shard")),
                                            key=["intra_node", "intra_cluster", "inter_cluster"].index)
        got[mode + "_time"] = P.step_time(cfg, lay, net)[0]
    assert got["ordered"] == {"pp": "intra_cluster", "dp_shard": "inter_cluster"}
    assert got["auto"] == {"pp": "inter_cluster", "dp_shard": "intra_cluster"}
    assert got["auto_time"] < got["ordered_time"] / 10


def test_topology_and_device_errors_are_one_line(tmp_path):
    topo, device = cpu_files(tmp_path)
    cfg = tiny(f"topology.file={topo}")
    with pytest.raises(UserError, match=r"topology.nodes = 1 but the launch has 2 node"):
        P.network(cfg, 4, "cpu", nodes=2, device_file=device)
    with pytest.raises(UserError, match=r"does not fill 4 nodes \(--nodes\)"):
        P.network(tiny(), 6, "cpu", nodes=4, device_file=device)
    with pytest.raises(UserError, match="nodes hold 8 GPUs"):
        P.network(tiny(), 12, "h100")
    # cpu has no link defaults: a launch over ranks in a node needs intra_node
    with pytest.raises(UserError, match=r"topology.links.intra_node.bandwidth_gbps is needed .*no default for cpu"):
        P.network(tiny(), 4, "cpu", device_file=device)
    # several clusters need inter_cluster (no datasheet gives it)
    with pytest.raises(UserError, match=r"topology.links.inter_cluster.bandwidth_gbps is needed"):
        P.network(tiny("topology.clusters=2"), 16, "h100")
    # the topology schema is topology.py's: an unknown class or field is its one-line error
    bad = tmp_path / "bad.toml"
    bad.write_text("[topology]\nlinks = { nvlink = { bandwidth_gbps = 400.0 } }\n")
    with pytest.raises(ConfigError, match="unknown link class 'nvlink'"):
        tiny(f"topology.file={bad}")
    bad.write_text("[topology]\nlinks = { intra_node = { bandwidth_gbps = 400.0, latency_us = 3 } }\n")
    with pytest.raises(ConfigError, match="unknown field 'latency_us'"):
        tiny(f"topology.file={bad}")
    # the device file
    with pytest.raises(UserError, match="--gpu cpu needs --device-file"):
        P.load_device(None, "cpu")
    with pytest.raises(UserError, match="no such file"):
        P.load_device(tmp_path / "none.toml", "h100")
    for text, msg in (("peak_tflops = -1\nmemory_gb = 5", r"device.peak_tflops = -1 must be a positive number"),
                      ("memory_gb = 5", r"device.peak_tflops is needed"),
                      ("peak_tflops = 1\nmemory_gb = 5\nbandwidth_gbps = 3", r"device.bandwidth_gbps is not a device "
                                                                            "field"),
                      ("peak_tflops = 1\nmemory_gb = 5\noverlap = 1", r"device.overlap = 1 must be true or false"),
                      ("peak_tflops = 1\nmemory_gb = 5\ncores = 1.5", r"device.cores = 1.5 must be a whole number"),
                      ("peak_tflops = 1\nmemory_gb = 5\nsync_ms = -1", r"device.sync_ms = -1 must be a non-negative")):
        bad.write_text("[device]\n" + text + "\n")
        with pytest.raises(UserError, match=msg):
            P.load_device(bad, "cpu")
    bad.write_text("[device]\npeak_tflops = 1\n[links.gloo]\nbandwidth_gbps = 1\n")
    with pytest.raises(UserError, match=r"one \[device\] table"):
        P.load_device(bad, "cpu")
    # over a preset, the file's fields win and the rest stay the datasheet's
    bad.write_text("[device]\nmemory_gb = 40\n")
    dev = P.load_device(bad, "a100")
    assert dev.memory_bytes == 40 * GB and dev.name == "A100" and dev.peak_flops == P.load_device(None, "a100").peak_flops


# ----------------------------------------------------------------------------- CLI


def test_cli_table_and_errors(tmp_path):
    topo, device = cpu_files(tmp_path)
    out = run_cli("plan", "configs/tiny.toml", "--gpus", "4", "--gpu", "cpu", "--topology", str(topo),
                  "--device-file", str(device), "--top", "3").stdout
    assert "mem/rank GB" in out and "tokens/s" in out and "MFU" in out
    assert "intra_node 3.2 Gbit/s 0.1 ms" in out
    sets = [l.strip() for l in out.splitlines() if l.strip().startswith("--set parallel.tp=")]
    assert len(sets) == 3 and all("train.activation_checkpoint=" in s for s in sets)
    # a one-line error, exit 2, no traceback: 6 GPUs on the topology's 1 node, but --nodes 4
    bad = run_cli("plan", "configs/tiny.toml", "--gpus", "6", "--gpu", "cpu", "--nodes", "4", "--topology",
                  str(topo), "--device-file", str(device), check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().count("\n") == 0 and "--nodes" in bad.stderr
