"""MoE dispatch on 8 ranks as 2 simulated nodes (gloo, LOCAL_WORLD_SIZE = 4): the flat
all-to-all against the hierarchical one (parallel/hierarchical_all_to_all.py), per
dispatch (the split counts, then the token rows): messages and bytes that cross a node
boundary, measured beside the analytic expectation, and wall time of dispatch + combine,
as ratios flat / hierarchical from one run (the two alternate, iteration by iteration).

Routing is uniform top-k over all experts (experts split evenly over the 8 ranks), so every
rank sends rows to every rank. Analytic, with P ranks on N nodes of m: flat sends P(P - m)
messages across nodes per exchange, hierarchical P(N - 1); the bytes across are the same,
(P - m) / P of the rows plus the counts.

Goal (HetuMoE, Nie et al. 2022): inter-node messages reduced by at least m = 4 (the ranks per node).

Run:  python bench/moe_all_to_all.py [--tokens 2048] [--dim 128] [--iters 20] [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORLD, NODES = 8, 2


def _worker(rank: int, init_file: str, args: dict, out_file: str) -> None:
    os.environ.update(LOCAL_WORLD_SIZE=str(WORLD // NODES), OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from dist_train.parallel.hierarchical_all_to_all import build_topology, exchange_counts, run_plan

    torch.set_num_threads(1)  # torch was imported before OMP_NUM_THREADS was set: idle OpenMP threads spin
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("ep",))
    topos = {"flat": build_topology(mesh, WORLD // NODES, False),
             "hierarchical": build_topology(mesh, WORLD // NODES, True)}
    g = torch.Generator().manual_seed(rank)
    n_experts, k = args["experts"], args["top_k"]
    ids = torch.stack([torch.randperm(n_experts, generator=g)[:k] for _ in range(args["tokens"])]).view(-1)
    counts = torch.bincount(ids, minlength=n_experts)
    rows = torch.randn(ids.numel(), args["dim"], generator=g)  # grouped by expert, as after moe_permute

    def dispatch(topo):
        recv, plan = exchange_counts(counts.view(WORLD, -1), topo)
        x = run_plan(rows, plan, topo)
        return run_plan(x, plan.reversed(), topo)  # and back (the combine)

    results = {name: {"times": [], "stats": None, "out": None} for name in topos}
    for name, topo in topos.items():  # one dispatch (counts + rows), counted; it also warms up
        topo.stats.take()
        recv, plan = exchange_counts(counts.view(WORLD, -1), topo)
        results[name]["out"] = run_plan(rows, plan, topo)
        results[name]["stats"] = topo.stats.take()
    assert torch.equal(results["flat"]["out"], results["hierarchical"]["out"]), "hierarchical != flat"
    for _ in range(args["iters"]):
        for name, topo in topos.items():
            dist.barrier()
            t0 = time.perf_counter()
            dispatch(topo)
            t = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            results[name]["times"].append(float(t))
    keys = ("messages", "bytes", "cross_node_messages", "cross_node_bytes")
    summary = {}
    for name, r in results.items():
        st = torch.tensor([float(r["stats"][k]) for k in keys], dtype=torch.float64)
        dist.all_reduce(st)
        summary[name] = {"time_s": statistics.median(r["times"]), **{k: int(v) for k, v in zip(keys, st.tolist())}}
    rows_total = torch.tensor([float(ids.numel())])
    dist.all_reduce(rows_total)
    if rank == 0:
        summary["rows_total"] = int(rows_total)
        Path(out_file).write_text(json.dumps(summary))
    dist.destroy_process_group()


def analytic(rows_total: int, dim: int, experts: int) -> dict:
    P, m = WORLD, WORLD // NODES
    N = NODES
    k = experts // P  # counts per destination rank
    row_bytes = dim * 4
    cross_rows = rows_total * (P - m) / P  # uniform routing
    counts_bytes = P * (P - m) * k * 8   # every rank's counts for the other node's ranks cross once
    return {"flat": {"cross_node_messages": 2 * P * (P - m), "cross_node_bytes": cross_rows * row_bytes + counts_bytes},
            "hierarchical": {"cross_node_messages": 2 * P * (N - 1),
                             "cross_node_bytes": cross_rows * row_bytes + counts_bytes}}


def main() -> None:
    import torch.multiprocessing as mp

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out")
    a = p.parse_args()
    args = {"tokens": a.tokens, "dim": a.dim, "experts": a.experts, "top_k": a.top_k, "iters": a.iters}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "summary.json"
        mp.start_processes(_worker, args=(str(Path(tmp) / "init"), args, str(out)), nprocs=WORLD,
                           start_method="spawn")
        s = json.loads(out.read_text())
    expect = analytic(s["rows_total"], a.dim, a.experts)
    f, h = s["flat"], s["hierarchical"]
    m = WORLD // NODES
    print(f"MoE dispatch on {WORLD} CPU ranks (gloo) as {NODES} simulated nodes of {m}; {a.tokens} tokens x "
          f"top-{a.top_k} of {a.experts} experts per rank, rows of {a.dim} fp32; per dispatch (counts + rows), "
          f"all ranks; wall time: median over {a.iters} of dispatch + combine, slowest rank\n")
    print("| all-to-all | msgs across nodes | expected | MB across nodes | expected | msgs in all | MB in all "
          "| time (ms) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in (("flat", f), ("hierarchical", h)):
        e = expect[name]
        print(f"| {name} | {r['cross_node_messages']} | {e['cross_node_messages']} "
              f"| {r['cross_node_bytes'] / 1e6:.3f} | {e['cross_node_bytes'] / 1e6:.3f} | {r['messages']} "
              f"| {r['bytes'] / 1e6:.3f} | {r['time_s'] * 1e3:.1f} |")
    msg_ratio = f["cross_node_messages"] / max(1, h["cross_node_messages"])
    expected_ratio = expect["flat"]["cross_node_messages"] / expect["hierarchical"]["cross_node_messages"]
    print(f"| ratio flat / hierarchical | {msg_ratio:.2f} | {expected_ratio:.2f} "
          f"| {f['cross_node_bytes'] / h['cross_node_bytes']:.3f} | 1.000 | {f['messages'] / h['messages']:.2f} "
          f"| {f['bytes'] / h['bytes']:.3f} | {f['time_s'] / h['time_s']:.2f} |")
    print(f"\ninter-node messages reduced {msg_ratio:.2f}x (goal >= {m}: {'met' if msg_ratio >= m else 'NOT met'}); "
          f"hierarchical output == flat output: yes (checked element for element on every rank)")
    if a.out:
        Path(a.out).write_text(json.dumps({"measured": s, "expected": expect}, indent=1))


if __name__ == "__main__":
    main()
