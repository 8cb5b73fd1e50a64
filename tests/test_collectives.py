"""Collective observation on real gloo processes (2 ranks, one launch, several checks).

The worker runs each scenario once and writes what it saw to JSON; the tests
below assert on those results, so one failing check does not hang the peers.
"""

import json
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

WORLD = 2
DIM, VOCAB, SEQ = 32, 33, 8  # VOCAB odd: dim-0 padding to the world size shows in bytes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _padded_numel(shape, ws):
    """FSDP2 shards dim 0, padding it to a multiple of the world size."""
    rows = -(-shape[0] // ws) * ws
    return rows * (torch.Size(shape).numel() // shape[0])


# --------------------------------------------------------------------------- worker


def _fsdp_step(rank, rec, C, out):
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(DIM, DIM)

        def forward(self, x):
            return x + torch.relu(self.lin(x))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(VOCAB, DIM)
            self.blocks = nn.ModuleList([Block(), Block()])
            self.head = nn.Linear(DIM, VOCAB)

        def forward(self, tok):
            h = self.emb(tok)
            for b in self.blocks:
                h = b(h)
            return self.head(h)

    torch.manual_seed(0)
    model = Model()
    block_shapes = [[p.shape for p in b.parameters()] for b in model.blocks]
    root_shapes = [p.shape for n, p in model.named_parameters() if not n.startswith("blocks.")]
    for b in model.blocks:
        fully_shard(b)
    fully_shard(model)

    def group_bytes(shapes):  # all-gather output == reduce-scatter input, fp32
        return sum(_padded_numel(s, WORLD) for s in shapes) * 4

    gen = torch.Generator().manual_seed(rank)
    tok = torch.randint(0, VOCAB, (2, SEQ), generator=gen)
    rec.step_summary(reset=True)
    n0 = len(rec.records())
    model(tok).float().pow(2).mean().backward()
    out["fsdp_summary"] = rec.step_summary(reset=True)
    out["fsdp_records"] = [r.as_dict() for r in rec.records()[n0:]]
    out["fsdp_block_bytes"] = [group_bytes(s) for s in block_shapes]
    out["fsdp_root_bytes"] = group_bytes(root_shapes)
    out["pending_after_step"] = len(rec.pending())

    # Flight recorder (gloo records collectives, not p2p) on the same group.
    import pickle

    fr = pickle.loads(torch._C._distributed_c10d._dump_fr_trace(includeStackTraces=False))
    gname = dist.distributed_c10d._get_default_group().group_name
    out["fr_ops"] = [e["profiling_name"] for e in fr.get("entries", [])
                     if e["process_group"][0] == gname]


def _tp(rank, rec, C, out):
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)

    mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("tp",))
    C.name_mesh_groups(mesh)  # the tp dim spans the world: it reuses the default group
    out["tp_group_observed"] = C.recorder_of(mesh.get_group("tp")) is rec
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
    parallelize_module(mlp, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    n0 = len(rec.records())
    y = mlp(torch.randn(4, 16, generator=torch.Generator().manual_seed(1)))
    y.sum().item()
    from torch.distributed.tensor import DTensor, Replicate, Shard

    local = torch.full((3, 4), float(rank))
    DTensor.from_local(local, mesh, [Shard(0)]).redistribute(mesh, [Replicate()]).to_local()
    out["tp_records"] = [r.as_dict() for r in rec.records()[n0:]]

    # A dim that does not span the world gets its own group, named from its
    # mesh description without help.
    mesh2 = init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("dp", "cp"))
    import torch.distributed as dist

    dist.all_reduce(torch.ones(2), group=mesh2.get_group("cp"))
    out["sub_mesh_group"] = rec.records()[-1].group

    objs = [None, None]
    dist.all_gather_object(objs, {"rank": rank})
    box = [{"from": rank}]
    dist.broadcast_object_list(box, src=1)
    out["objects_ok"] = objs == [{"rank": 0}, {"rank": 1}] and box == [{"from": 1}]
    from datetime import timedelta

    c10d = dist.distributed_c10d
    c10d._set_pg_timeout(timedelta(seconds=60), mesh.get_group("tp"))
    out["device_capability"] = c10d._device_capability(mesh.get_group("tp"))


def _a2a(rank, rec, C, out):
    import torch.distributed as dist

    in_splits = [[1, 2], [3, 1]][rank]  # rows this rank sends to rank 0, 1
    out_splits = [[1, 3], [2, 1]][rank]
    x = torch.full((sum(in_splits), 4), float(rank))
    y = torch.empty(sum(out_splits), 4)
    rec.step_summary(reset=True)
    dist.all_to_all_single(y, x, out_splits, in_splits)
    out["a2a_summary"] = rec.step_summary(reset=True)["all_to_all"]
    out["a2a_expected_bytes"] = x.nbytes
    out["a2a_ok"] = y[:, 0].tolist() == [0.0] * out_splits[0] + [1.0] * out_splits[1]


def _pipeline(rank, rec, C, out):
    from torch import nn
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    torch.manual_seed(rank)
    stage = PipelineStage(nn.Linear(8, 8), rank, WORLD, torch.device("cpu"),
                          input_args=torch.empty(2, 8, requires_grad=rank > 0),
                          output_args=torch.empty(2, 8, requires_grad=True))
    sched = ScheduleGPipe(stage, n_microbatches=2,
                          loss_fn=lambda y, t: (y - t).pow(2).mean())
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    rec.step_summary(reset=True)
    n0 = len(rec.records())
    if rank == 0:
        sched.step(x)
    else:
        sched.step(target=torch.zeros(4, 8))
    out["pp_summary"] = rec.step_summary(reset=True)
    out["pp_records"] = [r.as_dict() for r in rec.records()[n0:]]


def _delay_and_pause(rank, rec, C, out):
    import torch.distributed as dist

    delay_s = 0.2

    def slow_rank(r):
        if r.op == "allreduce":
            time.sleep(delay_s)

    dist.barrier()  # start aligned, so the peer's wait is the hook's delay
    if rank == 1:
        rec.hooks.append(slow_rank)
    t = torch.ones(8)
    t0 = time.monotonic()
    dist.all_reduce(t)
    out["delay_wall_s"] = time.monotonic() - t0
    r = rec.records()[-1]
    out["delay_record_s"] = (r.t_exit - r.t_enter) / 1e9
    if rank == 1:
        rec.hooks.remove(slow_rank)

    rec.step_summary(reset=True)
    with rec.paused():
        dist.all_reduce(torch.ones(3))
    out["paused_summary"] = rec.step_summary(reset=True)["all_reduce"]
    out["paused_record_counted"] = rec.records()[-1].counted


def _c4_fields(rank, rec, C, out, outdir):
    """What the C4 detector reads: per-group wait sums match the records, a held op
    (slow link) lasts its hold, and the publisher thread keeps publishing while the
    training thread is blocked in a gloo collective."""
    import threading

    import torch.distributed as dist
    from dist_train.fault.settings import C4Settings
    from dist_train.fault.publisher import Monitor
    from dist_train.fault.wire import RankState, key

    dist.barrier()
    done = [r for r in rec.records() if r.t_exit and r.t_enter]
    out["wait_ns_groups"] = sum(st.wait_ns for st in rec.groups())
    blocked = lambda r: r.t_exit - max(r.t_enter, r.t_wait)  # noqa: E731
    out["wait_ns_records"] = sum(blocked(r) for r in done if r.kind != "send_recv")
    out["p2p_wait_ns_groups"] = sum(sum(st.p2p_wait_ns.values()) for st in rec.groups())
    out["p2p_wait_ns_records"] = sum(blocked(r) for r in done if r.kind == "send_recv")

    def hold(r):
        r.hold_s = 0.15

    rec.hooks.append(hold)
    dist.all_reduce(torch.ones(2))
    rec.hooks.remove(hold)
    r = rec.records()[-1]
    out["held_s"] = (r.t_exit - r.t_enter) / 1e9

    store = dist.HashStore()
    mon = Monitor(rec, store, rank=rank, world=WORLD, attempt=0, run_dir=os.path.join(outdir, "run"),
                  settings=C4Settings(interval_s=0.05), log=lambda m: None)
    seen = []
    stop = threading.Event()

    def reader():  # what the detector would read, every 20 ms
        k = key("a0", f"r{rank}")
        while not stop.wait(0.02):
            if store.check([k]):
                s = RankState.from_json(json.loads(store.get(k)))
                world = next(g for g in s.groups.values() if len(g.ranks) == WORLD)
                seen.append((s.hb, world.pending))

    t = threading.Thread(target=reader)
    t.start()
    dist.barrier()
    if rank == 1:
        time.sleep(1.0)  # rank 0 sits blocked in the all-reduce meanwhile
    t0 = time.monotonic()
    dist.all_reduce(torch.ones(2))
    out["blocked_s"] = time.monotonic() - t0
    time.sleep(0.1)
    stop.set()
    t.join()
    mon.close()
    waiting = [p for _, p in seen if p and p.entered and p.waiting]
    out["published_hbs"] = len({hb for hb, _ in seen})
    out["max_published_wait_s"] = max((p.seconds for p in waiting), default=0.0)


def _worker(rank, port, outdir):
    os.environ["TORCH_FR_BUFFER_SIZE"] = "2000"
    torch.set_num_threads(1)
    from datetime import timedelta

    import torch.distributed as dist
    from dist_train.fault import collectives as C

    backend = C.register_observed_backend()
    assert C.register_observed_backend() == backend  # idempotent
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=60))
    rec = C.get_recorder()
    out = {"backend": backend, "rank": rec.rank}
    _fsdp_step(rank, rec, C, out)
    _tp(rank, rec, C, out)
    _a2a(rank, rec, C, out)
    _pipeline(rank, rec, C, out)
    _delay_and_pause(rank, rec, C, out)
    dist.barrier()
    C.monitored_barrier(wait_all_ranks=True)
    _c4_fields(rank, rec, C, out, outdir)
    out["group_states"] = {k: {"name": v["name"], "seq": v["seq"], "pending": len(v["pending"])}
                           for k, v in rec.group_states().items()}
    dist.destroy_process_group()
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)


# --------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    outdir = str(tmp_path_factory.mktemp("collectives"))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.monotonic()
    mp.spawn(_worker, args=(_free_port(), outdir), nprocs=WORLD)
    print(f"\ncollectives job: {time.monotonic() - t0:.1f} s")
    res = []
    for r in range(WORLD):
        with open(os.path.join(outdir, f"rank{r}.json")) as f:
            res.append(json.load(f))
    return res


def test_backend_and_rank(results):
    for r, res in enumerate(results):
        assert res["backend"].startswith("cpu:observed")
        assert res["rank"] == r


def test_fsdp_step_counts_and_bytes(results):
    # fully_shard per block + root, defaults, 1 micro-batch, forward + backward:
    # each block is gathered in forward, resharded, gathered again in backward
    # (2 AG) and reduce-scatters its grads once (1 RS); the root is not
    # resharded after forward (backward needs it at once): 1 AG, 1 RS.
    for res in results:
        blocks, root = res["fsdp_block_bytes"], res["fsdp_root_bytes"]
        # VOCAB=33 rows pad to 34 on 2 ranks: root = (34*32 + 34*32 + 34) * 4
        assert root == (34 * 32 * 2 + 34) * 4
        assert blocks == [(32 * 32 + 32) * 4] * 2
        s = res["fsdp_summary"]
        assert s["all_gather"] == {"count": 2 * 2 + 1, "bytes": 2 * sum(blocks) + root}
        assert s["reduce_scatter"] == {"count": 2 + 1, "bytes": sum(blocks) + root}
        for k in ("all_reduce", "all_to_all", "send_recv"):
            assert s[k] == {"count": 0, "bytes": 0}
        assert set(s) == {"all_gather", "reduce_scatter", "all_reduce", "all_to_all", "send_recv"}
        assert res["pending_after_step"] == 0


def test_fsdp_records_ordered_and_timed(results):
    for res in results:
        recs = res["fsdp_records"]
        assert len(recs) == 8
        seqs = [r["seq"] for r in recs]
        assert seqs == list(range(seqs[0], seqs[0] + len(recs)))
        for r in recs:
            assert r["group"] == "world" and r["peers"] == [0, 1]
            assert 0 < r["t_enter"] <= r["t_exit"] and r["error"] is None
    # Both ranks issued the same ops in the same order.
    key = [(r["op"], r["seq"], r["nbytes"]) for r in results[0]["fsdp_records"]]
    assert key == [(r["op"], r["seq"], r["nbytes"]) for r in results[1]["fsdp_records"]]


def test_counts_match_flight_recorder(results):
    # gloo runs reduce_scatter as all_reduce underneath: FR names it that way.
    for res in results:
        fr = res["fr_ops"]
        ours = res["fsdp_records"]
        assert len(fr) == len(ours)
        assert fr.count("gloo:all_gather") == sum(r["kind"] == "all_gather" for r in ours)
        assert fr.count("gloo:all_reduce") == sum(r["kind"] == "reduce_scatter" for r in ours)


def test_tp_and_dtensor_named_by_mesh_dim(results):
    for res in results:
        assert res["tp_group_observed"]
        recs = res["tp_records"]
        assert all(r["group"] == "tp" for r in recs)
        ar = [r for r in recs if r["kind"] == "all_reduce"]
        assert len(ar) == 1 and ar[0]["nbytes"] == 4 * 16 * 4  # RowwiseParallel output
        ag = [r for r in recs if r["kind"] == "all_gather"]  # Shard(0) -> Replicate
        assert len(ag) == 1 and ag[0]["nbytes"] == WORLD * 3 * 4 * 4
        assert res["sub_mesh_group"] == "cp"
        assert res["objects_ok"]
        assert res["device_capability"] == ["cpu"]


def test_uneven_all_to_all_bytes(results):
    assert [r["a2a_expected_bytes"] for r in results] == [3 * 4 * 4, 4 * 4 * 4]
    for res in results:
        assert res["a2a_ok"]
        assert res["a2a_summary"] == {"count": 1, "bytes": res["a2a_expected_bytes"]}


def test_pipeline_send_recv(results):
    # GPipe, 2 stages, 2 micro-batches, first step: per rank 2 activations and
    # 2 gradients cross the stage boundary ([2, 8] fp32 = 64 B each), plus the
    # stage warm-up vote (one int32 forward, one back).
    for rank, res in enumerate(results):
        assert res["pp_summary"]["send_recv"] == {"count": 6, "bytes": 4 * 64 + 2 * 4}
        p2p = [r for r in res["pp_records"] if r["kind"] == "send_recv"]
        data = [r for r in p2p if r["nbytes"] == 64]
        assert sorted(r["op"] for r in data) == ["recv", "recv", "send", "send"]
        for r in p2p:
            assert r["peers"] == ([rank, 1 - rank] if r["op"] == "send" else [1 - rank, rank])
        assert [r["seq"] for r in p2p] == [1, 2, 3, 4, 5, 6]  # per-peer p2p counter


def test_delay_hook_delays_every_rank(results):
    slow, fast = results[1], results[0]
    assert slow["delay_wall_s"] >= 0.2
    assert fast["delay_wall_s"] >= 0.15
    # The late rank enters after its hook, so its record is short; the peer waited.
    assert fast["delay_record_s"] >= 0.15
    assert slow["delay_record_s"] < fast["delay_record_s"]


def test_paused_ops_are_recorded_not_counted(results):
    for res in results:
        assert res["paused_summary"] == {"count": 0, "bytes": 0}
        assert res["paused_record_counted"] is False


def test_group_states_agree_and_nothing_pending(results):
    states = [res["group_states"] for res in results]
    for st in states:
        assert all(v["pending"] == 0 for v in st.values())
    # The world group (relabelled "tp" by name_mesh_groups) has the same
    # sequence number on both ranks; each rank's size-1 "cp" group is its own.
    world = [next(v for v in st.values() if v["name"] == "tp") for st in states]
    assert world[0] == world[1] and world[0]["seq"] > 10
    assert sorted(v["name"] for v in states[0].values()) == ["cp", "tp"]


def test_c4_wait_sums_hold_and_publisher_while_blocked(results):
    for res in results:
        assert res["wait_ns_groups"] == res["wait_ns_records"] > 0
        assert res["p2p_wait_ns_groups"] == res["p2p_wait_ns_records"] > 0
        assert res["held_s"] >= 0.15
    blocked = results[0]
    assert blocked["blocked_s"] >= 0.8
    # the side thread published ~every 50 ms while the training thread sat in the all-reduce,
    # and its state showed the op entered, waited on, for most of that second
    assert blocked["published_hbs"] >= 8
    assert blocked["max_published_wait_s"] >= 0.6


class _CountingGroup:
    """Stands in for the real group: counts the calls and waits the wrapper makes."""

    group_name = "bench"

    def __init__(self):
        self.calls = self.waits = 0

    def allreduce(self, tensors, *a):
        self.calls += 1
        group = self

        class Work:
            def wait(self, timeout=None):
                group.waits += 1
                return True

        return Work()


def test_wrapper_forwards_once_and_never_waits_for_the_caller():
    """The wrapper's cost is bookkeeping: one inner call per op, no wait of its own before the
    caller's, no store (it has none), one record. Its time per op is measured by
    bench/collectives.py (docs/benchmarks.md), not asserted here."""
    from dist_train.fault.collectives import ObservedProcessGroup
    from dist_train.fault.recorder import CollectiveRecorder

    inner, rec = _CountingGroup(), CollectiveRecorder()
    g = ObservedProcessGroup(None, 0, 1, inner, (0,), rec)
    g.label = "bench"
    works = [g.allreduce([torch.ones(3)]) for _ in range(5)]
    assert (inner.calls, inner.waits) == (5, 0), "forwarded once each, not waited on by the wrapper"
    for w in works:
        w.wait()
    assert inner.waits == 5
    recs = rec.records()
    assert len(recs) == 5 and all(r.kind == "all_reduce" and r.t_exit for r in recs)
    assert rec.step_summary()["all_reduce"] == {"count": 5, "bytes": 5 * 3 * 4}


def test_recorder_alone():
    """Summary shape and reset, a failing hook, pending eviction: no processes."""
    from dist_train.fault.recorder import CollectiveRecorder

    rec = CollectiveRecorder(capacity=4, max_pending=2)
    st = rec.add_group((0, 1), "dp")
    rec.end(st, rec.begin(st, "allreduce", "all_reduce", 8))
    rec.begin(st, "broadcast", "broadcast", 4)  # never waited
    s = rec.step_summary(reset=False)
    assert list(s) == ["all_gather", "reduce_scatter", "all_reduce", "all_to_all", "send_recv",
                       "broadcast"]
    assert s["all_reduce"] == {"count": 1, "bytes": 8} and s["broadcast"] == {"count": 1, "bytes": 4}
    rec.step_summary()
    assert rec.step_summary()["all_reduce"] == {"count": 0, "bytes": 0}

    def boom(r):
        raise TimeoutError("injected")

    rec.hooks.append(boom)
    with pytest.raises(TimeoutError):
        rec.begin(st, "allreduce", "all_reduce", 8)
    rec.hooks.clear()
    failed = rec.records()[-1]
    assert failed.error == "TimeoutError: injected" and failed.t_enter == 0 and failed.t_exit
    assert failed not in rec.pending()
    for _ in range(3):
        rec.begin(st, "allreduce", "all_reduce", 8)
    assert len(rec.pending()) == 2 and rec.dropped_pending >= 1
    assert len(rec.records()) == 4
    assert [r.seq for r in rec.records()] == [3, 4, 5, 6]
