"""The step-time cost of a checkpoint: blocking against background saves (thread, process).

One launch of `--nproc` CPU ranks runs the same training four times: never saving, and
saving every `--every` steps blocking (`checkpoint.async = "off"`), from a thread and from
a process. A run's wall time is read from its metrics (the first to the last step's
record time), so start-up is not counted; the cost of one save is the extra wall time
over the run that never saves, divided by its saves. Prints the cost per save, its ratio
to the blocking save's, the median step time (a background save writes while the next
steps compute, so they may slow a little), and the longest wait for a save in flight.

The model is the tiny preset widened (`--dim`, `--layers`) so a save is large enough to
see; AdamW, so a checkpoint holds 3x the parameters.

Run:  OMP_NUM_THREADS=1 .venv/bin/python bench/checkpoint.py [--nproc 2] [--steps 60] [--every 10] [--dim 256] [--layers 8]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _launch import run_sweep  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    a = ap.parse_args()
    common = {"train.steps": a.steps, "model.dim": a.dim, "model.n_layers": a.layers, "model.n_heads": 4,
              "model.n_kv_heads": 2, "checkpoint.keep": 2}
    runs = {"none": {"checkpoint.every": 0}, "blocking": {"checkpoint.every": a.every},
            "thread": {"checkpoint.every": a.every, "checkpoint.async": "thread"},
            "process": {"checkpoint.every": a.every, "checkpoint.async": "process"}}
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as root:
        metrics = run_sweep(Path(root), a.nproc, runs, common)
        size = sum(f.stat().st_size for f in (Path(root) / "blocking" / "checkpoints").glob(f"step-{a.steps:06d}/*"))
    saves = a.steps // a.every
    wall = {name: recs[-1]["time"] - recs[0]["time"] for name, recs in metrics.items()}
    cost = {name: (wall[name] - wall["none"]) / saves for name in runs if name != "none"}
    print(f"{a.nproc} ranks, dim {a.dim} x {a.layers} layers, {a.steps} steps, a save every {a.every} "
          f"({saves} saves of {size / 1e6:.1f} MB)")
    print(f"{'run':10} {'wall s':>8} {'cost/save s':>12} {'vs blocking':>12} {'median step s':>14} {'max wait s':>11}")
    for name, recs in metrics.items():
        med = statistics.median(r["step_time_s"] for r in recs[1:])
        wait = max((r.get("checkpoint_wait_s", 0.0) for r in recs), default=0.0)
        c = cost.get(name)
        ratio = f"{c / cost['blocking']:.2f}" if c is not None and cost["blocking"] > 0 else "-"
        print(f"{name:10} {wall[name]:8.2f} {'-' if c is None else f'{c:.3f}':>12} {ratio:>12} {med:14.3f} {wait:11.3f}")


if __name__ == "__main__":
    main()
