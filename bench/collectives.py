"""Per-op cost of observing collectives: the observed process group vs the raw gloo group under it.

Two gloo ranks on this machine; for each tensor size, rounds that alternate blocks of
all_reduce calls on the observed group (fault/collectives.py: records, hooks, wait
stamping) and on its inner, unobserved gloo group, so both see the same load. Prints per
size the median over rounds of the per-op time, the ratio observed / raw and the extra
microseconds per op (timing is measured here, never asserted in a test).

Run:  OMP_NUM_THREADS=1 .venv/bin/python bench/collectives.py [--rounds 30] [--ops 50]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SIZES = (1, 1024, 16384, 262144)  # floats


def _worker(rank: int, port: int, rounds: int, ops: int, out: str) -> None:
    from datetime import timedelta

    import torch.distributed as dist
    from dist_train.fault import collectives as C

    torch.set_num_threads(1)
    dist.init_process_group(C.register_observed_backend(), init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, timeout=timedelta(seconds=60))
    g = dist.distributed_c10d._get_default_group()
    result = {}
    for n in SIZES:
        t = torch.ones(n)
        per = {"observed": [], "raw": []}
        for _ in range(rounds):
            for name, fn in (("observed", lambda: g.allreduce([t]).wait()), ("raw", lambda: g.inner.allreduce([t]).wait())):
                dist.barrier()
                t0 = time.perf_counter_ns()
                for _ in range(ops):
                    fn()
                per[name].append((time.perf_counter_ns() - t0) / ops)
        result[n] = {k: statistics.median(v) for k, v in per.items()}
    dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--ops", type=int, default=50)
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(_worker, args=(port, args.rounds, args.ops, out), nprocs=2)
        result = json.loads(Path(out).read_text())
    print(f"2 gloo ranks, all_reduce, {args.rounds} rounds x {args.ops} ops per group, median per op\n")
    print("| floats | raw gloo us/op | observed us/op | observed / raw | extra us/op |")
    print("|---|---|---|---|---|")
    for n in SIZES:
        r = result[str(n)]
        print(f"| {n} | {r['raw'] / 1e3:.1f} | {r['observed'] / 1e3:.1f} | {r['observed'] / r['raw']:.3f} | "
              f"{(r['observed'] - r['raw']) / 1e3:.1f} |")


if __name__ == "__main__":
    main()
