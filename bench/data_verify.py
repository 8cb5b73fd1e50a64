"""Cost of checking every shard's full CRC32 in a background thread while training runs.

Writes a shard folder of random tokens (`--mb` MiB in 64 MiB shards), then trains the
tiny model on it for `--steps` steps on `--nproc` ranks twice in one launch, with
`data.verify = "background"` and `"off"`, alternately, and prints: how long the checks
took (metrics' `data_verify_s`) and at what rate, and the median step time of the steps
that overlapped the checks against the same steps without them (ratio).

Run:  OMP_NUM_THREADS=1 .venv/bin/python bench/data_verify.py [--mb 1024] [--steps 30] [--nproc 2]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _launch import REPO, run_sweep  # noqa: E402

sys.path.insert(0, str(REPO))


def write_shards(out: Path, mib: int) -> int:
    from dist_train.data import ShardWriter, load_tokenizer

    writer = ShardWriter(out, load_tokenizer("byte"), shard_tokens=32 << 20)  # 64 MiB of uint16 per shard
    rng = np.random.default_rng(0)
    for _ in range(mib // 16):
        writer.add_tokens(rng.integers(0, 256, 8 << 20, dtype=np.uint16))
    return len(writer.close().shards)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=1024)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--nproc", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        n = write_shards(shards, args.mb)
        runs = {}
        for rep in range(2):
            for mode in ("background", "off"):
                runs[f"{mode}{rep}"] = {"data.verify": mode}
        got = run_sweep(Path(tmp), args.nproc, runs, {"data.source": str(shards), "train.steps": args.steps,
                                                      "data.seq_len": 128})
    verify_s = [r.get("data_verify_s") for name, rs in got.items() if name.startswith("background")
                for r in rs[-1:]]
    print(f"{args.mb} MiB in {n} shard(s), {args.nproc} rank(s), {args.steps} steps per run, runs alternated\n")
    print(f"full checks took {', '.join(f'{s:.2f}' for s in verify_s)} s "
          f"({args.mb / statistics.median(verify_s):.0f} MiB/s over all ranks)")
    rows = []
    for rep in range(2):
        on, off = got[f"background{rep}"], got[f"off{rep}"]
        overlap = [r["step"] for r in on if r.get("data_verify_s") is None] or [on[0]["step"]]
        t_on = statistics.median(r["step_time_s"] for r in on if r["step"] in overlap)
        t_off = statistics.median(r["step_time_s"] for r in off if r["step"] in overlap)
        t_on_all = statistics.median(r["step_time_s"] for r in on[1:])
        t_off_all = statistics.median(r["step_time_s"] for r in off[1:])
        rows.append((rep, len(overlap), t_on, t_off, t_on_all, t_off_all))
    print("\n| pair | steps overlapping the checks | step s during (on / off) | ratio | step s, whole run (on / off) "
          "| ratio |")
    print("|---|---|---|---|---|---|")
    for rep, k, a, b, c, d in rows:
        print(f"| {rep} | {k} | {a:.3f} / {b:.3f} | {a / b:.3f} | {c:.3f} / {d:.3f} | {c / d:.3f} |")


if __name__ == "__main__":
    main()
