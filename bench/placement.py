"""Placement on a simulated two-cluster machine: tokens/s and bytes over the slow links
under `parallel.placement = ordered` and `auto`, against the same run with no slow links.

One launch of 8 CPU ranks on 4 simulated nodes (2 ranks each) in 2 clusters of 2 nodes whose
numbers interleave (cluster a = nodes 0 and 2, b = nodes 1 and 3, as a scheduler may hand
nodes out; numbered cluster by cluster, ordered's map would already be auto's), pp = 2 x
dp_shard = 4, the inter-cluster link slowed by the topology's link model (`--latency-ms`,
`--gbps`; dist-train local simulates it in the observed process group). Runs, each
`--steps` steps: ordered and auto with the slow link, and auto with the same topology but
`topology.simulate = off` (no slow link: the reference), the three in turn `--repeats`
times (the CPUs are shared: a run's figure is the best of its repeats' medians). No gradient
clipping by default (`--grad-clip` sets it): clipping needs the global norm before the
optimizer step, one 4-byte all-reduce per rank over pp, across clusters by design. Prints per
run the median tokens/s over the steps after the first two, the bytes per step crossing
clusters by kind (from `comm_by_link`, exact), and the ratios, all from this one launch.

Run:  OMP_NUM_THREADS=1 .venv/bin/python bench/placement.py [--steps 12] [--repeats 2] [--latency-ms 5] [--gbps 0.1]
      [--grad-clip 0]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _launch import run_sweep  # noqa: E402

KINDS = ("all_gather", "reduce_scatter", "all_reduce", "all_to_all", "send_recv")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--latency-ms", type=float, default=5.0)
    ap.add_argument("--gbps", type=float, default=0.1, help="inter-cluster bandwidth, Gbit/s")
    ap.add_argument("--grad-clip", type=float, default=0.0, help="train.grad_clip (0: off)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-placement-") as root:
        topo = Path(root) / "t.toml"
        topo.write_text("[topology]\nnodes = 4\ncluster_map = { a = [0, 2], b = [1, 3] }\n"
                        f"links = {{ inter_cluster = {{ bandwidth_gbps = {a.gbps}, latency_ms = {a.latency_ms} }} }}\n")
        common = {"train.steps": a.steps, "parallel.pp": 2, "topology.file": str(topo), "train.grad_clip": a.grad_clip}
        kinds = {"no_slow_link": {"parallel.placement": "auto", "topology.simulate": "off"},
                 "ordered": {"parallel.placement": "ordered"}, "auto": {"parallel.placement": "auto"}}
        runs = {f"{n}-{i}": sets for i in range(a.repeats) for n, sets in kinds.items()}
        got = run_sweep(Path(root), 8, runs, common, nodes=4)
    metrics = {n: got[f"{n}-0"] for n in kinds}
    tok = {n: max(statistics.median(r["tokens_per_s"] for r in got[f"{n}-{i}"][2:]) for i in range(a.repeats))
           for n in kinds}
    every = {n: [round(statistics.median(r["tokens_per_s"] for r in got[f"{n}-{i}"][2:])) for i in range(a.repeats)]
             for n in kinds}
    print(f"8 ranks = 2 clusters x 2 nodes x 2 ranks (clusters a = nodes 0, 2; b = 1, 3), pp 2 x dp_shard 4, "
          f"inter-cluster link {a.latency_ms:g} ms, {a.gbps:g} Gbit/s, grad_clip {a.grad_clip:g}, {a.steps} steps "
          f"(median of steps 3..), "
          f"best of {a.repeats}: {every}")
    print(f"{'run':13} {'tokens/s':>9} {'vs no slow':>10}  bytes/step over inter_cluster by kind (ops/step)")
    for name, recs in metrics.items():
        last = recs[-1]["comm_by_link"]["inter_cluster"]
        per = ", ".join(f"{k} {last[k]['bytes']} ({last[k]['count']})" for k in KINDS if last[k]["count"])
        total = sum(last[k]["bytes"] for k in KINDS)
        print(f"{name:13} {tok[name]:9.0f} {tok[name] / tok['no_slow_link']:10.2f}  {total} B: {per or 'none'}")
    print(f"auto / ordered tokens/s: {tok['auto'] / tok['ordered']:.2f}; auto / no slow link: "
          f"{tok['auto'] / tok['no_slow_link']:.2f}; ordered / no slow link: {tok['ordered'] / tok['no_slow_link']:.2f}")


if __name__ == "__main__":
    main()
