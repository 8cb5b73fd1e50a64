"""Elastic DiLoCo: the share of wall time replicas spend training while members leave and join.

Two replicas (`--nproc` ranks each) against one lighthouse (heartbeat timeout 2 s), H =
`--H`, the tiny model. Every `--period` seconds the oldest live replica is killed (kill -9
of its whole process tree) and a new one started, which heals from a survivor at its next
outer step; `--cycles` times, then everything is stopped. Per replica, from its
metrics.jsonl: training time = the sum of (step_time_s - outer_s) of its steps (outer_s:
the outer step's quorum, healing and exchange), wall time = from the start of its join
(its first quorum) to its last step. Utilisation = total training time / total wall time
(goal >= 0.85); also shown without the joins' first wait.

Run:  OMP_NUM_THREADS=1 .venv/bin/python bench/elastic.py [--period 60] [--cycles 3] [--H 20] [--nproc 1]
"""
from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _launch import REPO  # noqa: E402

sys.path.insert(0, str(REPO))


def main() -> None:
    from dist_train.launchers.replicas import ReplicaJobs, lighthouse_process, read_records

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--period", type=float, default=60.0)
    p.add_argument("--cycles", type=int, default=3)
    p.add_argument("--H", type=int, default=20)
    p.add_argument("--nproc", type=int, default=1)
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        bind = f"127.0.0.1:{s.getsockname()[1]}"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "el"
        lh = lighthouse_process(bind)
        sets = [f"run.dir={tmp}", "run.name=el", "train.steps=1000000", "metrics.progress=false",
                "metrics.report=false", "diloco.enabled=true", f"diloco.inner_steps={args.H}", "checkpoint.every=0",
                "elastic.quorum_timeout_s=120", "elastic.timeout_s=10"]
        jobs = ReplicaJobs(str(REPO / "configs/tiny.toml"), sets, args.nproc, bind, root, logs=Path(tmp) / "logs")
        order = ["r0", "r1"]
        for rid in order:
            jobs.start(rid)
        try:
            for cycle in range(args.cycles):
                time.sleep(args.period)
                oldest = order.pop(0)
                jobs.kill(oldest)
                new = f"r{cycle + 2}"
                jobs.start(new)
                order.append(new)
                print(f"t+{(cycle + 1) * args.period:.0f} s: killed {oldest}, started {new}", flush=True)
            time.sleep(args.period)
        finally:
            jobs.stop()
            lh.kill()
        rows, total_train, total_wall, total_join = [], 0.0, 0.0, 0.0
        for rid, r in jobs.replicas.items():
            recs = read_records(r.run_dir)
            if not recs:
                rows.append((rid, 0, None, 0.0, 0.0, 0.0))
                continue
            join = recs[0].get("join_s", 0.0)
            start = recs[0]["time"] - recs[0]["step_time_s"] - join
            wall = recs[-1]["time"] - start
            train = sum(x["step_time_s"] - x.get("outer_s", 0.0) for x in recs)
            total_train, total_wall, total_join = total_train + train, total_wall + wall, total_join + join
            rows.append((rid, len(recs), recs[0].get("healed_from"), join, train, wall))
    print(f"\n2 replicas of {args.nproc} rank(s), H = {args.H}, one leave and one join every {args.period:g} s, "
          f"{args.cycles} cycles\n")
    print("| replica | steps | healed from | first quorum wait s | training s | wall s | training / wall |")
    print("|---|---|---|---|---|---|---|")
    for rid, n, healed, join, train, wall in rows:
        share = f"{train / wall:.3f}" if wall else "-"
        print(f"| {rid} | {n} | {healed or '-'} | {join:.1f} | {train:.1f} | {wall:.1f} | {share} |")
    print(f"\nutilisation: {total_train / total_wall:.3f} (goal >= 0.85); without the joins' first wait: "
          f"{total_train / (total_wall - total_join):.3f}")


if __name__ == "__main__":
    main()
