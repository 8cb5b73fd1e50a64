"""Pipeline schedules at pp=2 x dp_shard=2 (4 ranks), 8 micro-batches per step: tokens/s,
bubble fraction, peak memory and the sharded-data-parallel bytes per step (all-gather +
reduce-scatter), each as a ratio to gpipe with plain accumulation, all from one launch.

Goal (Lamy-Poirier 2021): layered moves <= 1/8 of the all-gather + reduce-scatter bytes of
plain accumulation, and has the smallest bubble.

Run:  python bench/pipeline.py [--steps 6] [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _launch import run_sweep, steady_median  # noqa: E402

SCHEDULES = ("gpipe", "1f1b", "interleaved", "layered")
COMMON = {"model.n_layers": 8, "model.dim": 64, "data.seq_len": 128, "parallel.pp": 2, "parallel.dp_shard": 2,
          "train.micro_batch": 2, "train.global_batch": 2 * 2 * 8}


def sdp_bytes(r: dict) -> float:
    return r["comm"]["all_gather"]["bytes"] + r["comm"]["reduce_scatter"]["bytes"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--out")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        metrics = run_sweep(Path(tmp), 4, {s: {"parallel.pp_schedule": s} for s in SCHEDULES},
                            {**COMMON, "train.steps": args.steps})
    rows = []
    for s in SCHEDULES:
        rec = metrics[s]
        rows.append({"schedule": s, "tokens_per_s": steady_median(rec, "tokens_per_s"),
                     "bubble": steady_median(rec, "bubble_fraction"),
                     "peak_mem": max(r["peak_memory_bytes"] for r in rec),
                     "sdp_bytes": steady_median(rec, sdp_bytes),
                     "gathers": steady_median(rec, lambda r: r["comm"]["all_gather"]["count"]),
                     "scatters": steady_median(rec, lambda r: r["comm"]["reduce_scatter"]["count"])})
    base = rows[0]
    print("pp=2 x dp_shard=2 on 4 CPU ranks (gloo), tiny model with 8 layers, 8 micro-batches of 2 x 128 tokens "
          f"per rank and step; medians over steps 2..{args.steps}; ratios against gpipe (plain accumulation)\n")
    print("| schedule | tokens/s | ratio | bubble | ratio | peak mem/rank (MiB) | ratio | AG+RS MB/step | ratio "
          "| all-gathers | reduce-scatters |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['schedule']} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f} "
              f"| {r['bubble']:.3f} | {r['bubble'] / base['bubble']:.2f} | {r['peak_mem'] / 2**20:.0f} "
              f"| {r['peak_mem'] / base['peak_mem']:.2f} | {r['sdp_bytes'] / 1e6:.2f} "
              f"| {r['sdp_bytes'] / base['sdp_bytes']:.3f} | {r['gathers']:.0f} | {r['scatters']:.0f} |")
    layered = rows[SCHEDULES.index("layered")]
    ratio = layered["sdp_bytes"] / base["sdp_bytes"]
    smallest = min(rows, key=lambda r: r["bubble"])["schedule"]
    ag = (steady_median(metrics["layered"], lambda r: r["comm"]["all_gather"]["bytes"])
          / steady_median(metrics["gpipe"], lambda r: r["comm"]["all_gather"]["bytes"]))
    print(f"\nlayered / gpipe sharded-data-parallel bytes: {ratio:.3f} (goal <= 0.125: {'met' if ratio <= 0.125 else 'NOT met'}); "
          f"all-gather bytes alone: {ag:.3f}; smallest bubble: {smallest} (goal: layered)")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
