"""C4 monitoring: its overhead on training throughput, and how fast drills are detected.

1. Overhead: runs with `c4.enabled` off and on alternate in one launch (same ranks, same
   machine state, interleaved so load drifts hit both); tokens/s on / off, goal >= 0.98.
2. Time to detect: `--repeats` drills of each fault kind at `--nproc` ranks (8 by default),
   all in one launch, the faulty rank rotating; median seconds from the fault's first
   effect to the finding (and steps, for slow ranks and links).

Run:  python bench/c4.py [--nproc 8] [--repeats 5] [--pairs 3] [--steps 30] [--out results.json]
Quick: python bench/c4.py --repeats 1 --pairs 2     Overhead only: --repeats 0
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _launch import REPO, run_sweep, steady_median  # noqa: E402

KINDS = ("delay", "slow_compute", "slow_link", "hang", "hang_compute", "sigstop", "crash")


def overhead(nproc: int, pairs: int, steps: int) -> tuple[float, list]:
    runs = {}
    for i in range(pairs):
        runs[f"off-{i}"] = {"c4.enabled": "false"}
        runs[f"on-{i}"] = {"c4.enabled": "true"}
    common = {"train.steps": steps, "model.dim": 64, "model.n_layers": 2, "data.seq_len": 64}
    with tempfile.TemporaryDirectory() as tmp:
        metrics = run_sweep(Path(tmp), nproc, runs, common)
    tps = {name: steady_median(rec, "tokens_per_s", skip=3) for name, rec in metrics.items()}
    ratios = [tps[f"on-{i}"] / tps[f"off-{i}"] for i in range(pairs)]
    return statistics.median(ratios), [(i, tps[f"off-{i}"], tps[f"on-{i}"]) for i in range(pairs)]


def spec_for(kind: str, rank: int, nproc: int) -> str:
    if kind == "slow_link":
        a = [0, 1][rank % 2] + 4 * ((rank // 4) % (nproc // 4))
        return f"slow_link:ranks={a}-{a + 2},ms={5 if nproc <= 4 else 20},step=4"  # 8 ranks on 2 cores: noisier
    return {"delay": f"delay:rank={rank},ms=10,step=4", "slow_compute": f"slow_compute:rank={rank},factor=2,step=4",
            "hang": f"hang:rank={rank},step=6", "hang_compute": f"hang:rank={rank},step=6,where=compute",
            "sigstop": f"sigstop:rank={rank},step=6", "crash": f"crash:rank={rank},step=6"}[kind]


def detection(nproc: int, repeats: int, root: Path) -> list:
    from dist_train.launchers.drill import make_drill, run_drills

    ranks = [0, nproc - 1, nproc // 2, 1, nproc - 2]
    drills = [make_drill(spec_for(k, ranks[i % len(ranks)], nproc), nproc, tag=f"-{i}")
              for i in range(repeats) for k in KINDS]
    run_drills(str(REPO / "configs/tiny.toml"), [], drills, nproc, root)
    rows = []
    for k in KINDS:
        ds = [d for d, kind in zip(drills, [k2 for _ in range(repeats) for k2 in KINDS]) if kind == k]
        ttd = [d.result["time_to_detect_s"] for d in ds if d.result["time_to_detect_s"] is not None]
        steps = [d.result["steps_to_detect"] for d in ds if d.result["steps_to_detect"] is not None]
        rows.append({"kind": k, "drills": len(ds), "correct": sum(d.result["correct"] for d in ds),
                     "median_s": statistics.median(ttd) if ttd else None,
                     "max_s": max(ttd) if ttd else None,
                     "median_steps": statistics.median(steps) if steps else None,
                     "named": sorted({d.result["named"] for d in ds})})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5, help="drills per fault kind (5 for the full benchmark; 0: overhead only)")
    p.add_argument("--pairs", type=int, default=3, help="off/on run pairs for the overhead")
    p.add_argument("--steps", type=int, default=30, help="steps per overhead run")
    p.add_argument("--overhead-nproc", type=int, default=4)
    p.add_argument("--out")
    args = p.parse_args()
    ratio, pairs = overhead(args.overhead_nproc, args.pairs, args.steps)
    print(f"C4 overhead, {args.overhead_nproc} CPU ranks (gloo), tiny model dim 64 x 2 layers, seq 64; "
          f"{args.pairs} off/on run pairs of {args.steps} steps interleaved in one launch; median tokens/s "
          "over steps 4..\n")
    print("| pair | tokens/s C4 off | tokens/s C4 on | on / off |")
    print("|---|---|---|---|")
    for i, off, on in pairs:
        print(f"| {i} | {off:.0f} | {on:.0f} | {on / off:.3f} |")
    print(f"\nmedian on/off ratio: {ratio:.3f} (goal >= 0.98: {'met' if ratio >= 0.98 else 'NOT met'})\n")
    if args.repeats == 0:
        return
    with tempfile.TemporaryDirectory() as tmp:
        rows = detection(args.nproc, args.repeats, Path(tmp))
    print(f"\nTime to detect, {args.nproc} CPU ranks, {args.repeats} drill(s) per kind in one launch "
          "(from the fault's first effect to the finding)\n")
    print("| fault | drills | correct | median s | max s | median steps | named |")
    print("|---|---|---|---|---|---|---|")
    fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    for r in rows:
        print(f"| {r['kind']} | {r['drills']} | {r['correct']} | {fmt(r['median_s'])} | {fmt(r['max_s'])} "
              f"| {fmt(r['median_steps'])} | {'; '.join(r['named'])} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"overhead_ratio": ratio, "pairs": pairs, "detection": rows}, indent=1))


if __name__ == "__main__":
    main()
