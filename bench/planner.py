"""The layout planner (dist_train/planner.py) against real runs on this CPU machine.

1. Device figures, measured once here and written to two files the planner reads: the
   topology (OUT/cpu-topology.toml, dist_train/topology.py's [topology] schema, the file
   `dist-train local --topology` takes: 1 node, links.intra_node in Gbit/s and ms) and the
   device (OUT/cpu-device.toml: [device] peak_tflops, memory_gb, baseline_gb, efficiency, overlap,
   cores):
   - peak FLOP/s per rank: NPROC processes at once (one thread each, as the ranks run), each
     timing fp32 matmuls of 1024 x 1024 x 1024 (2 n^3 FLOPs each); the median process's rate;
   - the gloo loopback link: NPROC ranks all-reduce 1 float (latency = time / (2 (n - 1))
     ring steps) and 4 Mi floats (bandwidth = 2 (n - 1)/n x bytes / (time - small time));
   - the cores the ranks share: this process's CPU affinity;
   - the synchronisation floor: NPROC ranks run rounds of matmuls (~2.7 ms each here, about
     what tp computes between two collectives), with and without a 1-float all-reduce after
     each; the extra time per round (measured on every run, like the baseline);
   - the framework baseline: the peak_allocated_bytes (the heap in use, dist_train/heap_peak.py;
     max over ranks) of a NPROC-rank run of a model with next to no parameters (dim 8, 1 block,
     one sample of 16 tokens per rank), less the planner's own count for that run.
2. Each layout as its own `dist-train local` launch (both peaks are a process's lifetime
   maximum, so layouts cannot share a launch), a few steps; measured peak_allocated_bytes and,
   for comparison, peak_memory_bytes (max RSS) of the last record (max over ranks and steps),
   and median tokens_per_s over the steps after the first.
3. The planner's prediction for each, with those files; prints the table (markdown) and
   whether the fastest layout measured is the one predicted fastest.

Run:  OMP_NUM_THREADS=1 .venv/bin/python bench/planner.py [--out /tmp/planner-bench] [--steps 4]
      --pool OUT...: the median tokens/s per layout over the steps of several earlier runs (with
      --device-from DIR: beside the planner's prediction from DIR's files)
      --device-from OUT: reuse the peak (OUT/cpu-device.toml) and link (OUT/cpu-topology.toml) an
      earlier run measured; --reverse: layouts in reverse order
The launches themselves get no --topology (`dist-train local` would slow the ranks down to its links).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
NPROC = 4

# the small model of the measurement (configs/tiny.toml with these)
MODEL = {"model.dim": 256, "model.n_layers": 8, "model.n_heads": 8, "model.n_kv_heads": 4,
         "data.seq_len": 256, "train.global_batch": 32}
COMMON = {"metrics.progress": "false", "metrics.report": "false", "checkpoint.every": 0, "data.verify": "off",
          "train.warmup": 1}

LAYOUTS = {  # name: (tp, pp, schedule, dp_replicate, dp_shard, micro_batch, activation checkpoint)
    "fsdp4": (1, 1, "1f1b", 1, 4, 4, "none"),
    "fsdp4-full": (1, 1, "1f1b", 1, 4, 4, "full"),
    "tp2-fsdp2": (2, 1, "1f1b", 1, 2, 4, "none"),
    "tp2-fsdp2-sel": (2, 1, "1f1b", 1, 2, 4, "selective"),
    "pp2-gpipe": (1, 2, "gpipe", 1, 2, 4, "none"),
    "pp2-1f1b": (1, 2, "1f1b", 1, 2, 4, "none"),
    "pp2-1f1b-full": (1, 2, "1f1b", 1, 2, 4, "full"),
    "pp2-interleaved": (1, 2, "interleaved", 1, 2, 4, "none"),
    "pp2-layered": (1, 2, "layered", 1, 2, 4, "none"),
}


# ----------------------------------------------------------------------------- device figures


def _matmul_worker(q, n: int, seconds: float) -> None:
    import torch

    torch.set_num_threads(1)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        done += 1
    q.put(2 * n ** 3 * done / (time.perf_counter() - t0))


def measure_peak(n: int = 1024, seconds: float = 6.0) -> float:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_matmul_worker, args=(q, n, seconds)) for _ in range(NPROC)]
    for p in procs:
        p.start()
    rates = [q.get() for _ in procs]
    for p in procs:
        p.join()
    return statistics.median(rates)


def _link_worker(rank: int, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=NPROC)
    res = {}
    for name, numel, reps in (("small", 1, 200), ("big", 4 * 2 ** 20, 8)):
        x = torch.ones(numel)
        for _ in range(3):
            dist.all_reduce(x)
        times = []
        for _ in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(x)
            times.append(time.perf_counter() - t0)
        res[name] = statistics.median(times)
    if rank == 0:
        Path(out).write_text(json.dumps(res))
    dist.destroy_process_group()


def _spawn_ranks(worker) -> dict:
    """Run `worker(rank, port, out)` on NPROC gloo ranks; what rank 0 wrote to `out` (JSON)."""
    import torch.multiprocessing as tmp

    sys.path.insert(0, str(REPO / "tests"))
    from conftest import free_port

    with tempfile.TemporaryDirectory() as d:
        out = str(Path(d) / "result.json")
        tmp.spawn(worker, args=(free_port(), out), nprocs=NPROC)
        return json.loads(Path(out).read_text())


def measure_link() -> tuple[float, float]:
    res = _spawn_ranks(_link_worker)
    n = NPROC
    latency = res["small"] / (2 * (n - 1))
    bandwidth = 2 * (n - 1) / n * 4 * 4 * 2 ** 20 / (res["big"] - res["small"])
    return bandwidth, latency


SYNC_ROUNDS, SYNC_MATMULS = 60, 8  # rounds of 8 fp32 256^3 matmuls (~2.7 ms a rank here), as between tp's calls


def _sync_worker(rank: int, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=NPROC)
    a, x = torch.randn(256, 256), torch.zeros(1)

    def rounds(sync: bool, n: int = SYNC_ROUNDS) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(n):
            for _ in range(SYNC_MATMULS):
                a @ a
            if sync:
                dist.all_reduce(x)
        dist.barrier()
        return time.perf_counter() - t0

    rounds(True, 5)
    free, synced = [], []
    for _ in range(3):
        free.append(rounds(False))
        synced.append(rounds(True))
    if rank == 0:
        Path(out).write_text(json.dumps({"free": free, "synced": synced}))
    dist.destroy_process_group()


def measure_sync() -> float:
    """Seconds one synchronising call costs when every rank computes between calls: the
    median time of rounds of matmuls with a 1-float all-reduce after each, less the same
    rounds without, per round (on ranks sharing cores: the wait for the last one scheduled)."""
    res = _spawn_ranks(_sync_worker)
    return max(0.0, (statistics.median(res["synced"]) - statistics.median(res["free"])) / SYNC_ROUNDS)


# ----------------------------------------------------------------------------- runs


def sets(d: dict) -> list[str]:
    out = []
    for k, v in d.items():
        out += ["--set", f"{k}={v}"]
    return out


ENV = {"OMP_NUM_THREADS": "1"}


def launch(root: Path, name: str, extra: dict, steps: int) -> list[dict]:
    over = {**COMMON, **MODEL, **extra, "run.dir": str(root), "run.name": name, "train.steps": steps}
    cmd = [sys.executable, "-m", "dist_train", "local", "--nproc", str(NPROC), "configs/tiny.toml", *sets(over)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, **ENV})
    if proc.returncode:
        raise SystemExit(f"{name}: launch failed\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]


def planner_cfg(over: dict, topo_file: Path):
    """The config the planner is given for a run of configs/tiny.toml with `over`."""
    from dist_train.config import load_config

    sets_ = [f"{k}={v}" for k, v in {**COMMON, **over}.items()] + [f"topology.file={topo_file}"]
    return load_config(REPO / "configs/tiny.toml", sets_)


def planner_layout(spec):
    from dist_train.planner import Layout

    tp, pp, sched, dpr, dps, mb, ac = spec
    return Layout(tp, pp, sched, dpr, dps, 1, mb, ac)


def layout_sets(spec) -> dict:
    tp, pp, sched, dpr, dps, mb, ac = spec
    return {"parallel.tp": tp, "parallel.pp": pp, "parallel.pp_schedule": sched, "parallel.dp_replicate": dpr,
            "parallel.dp_shard": dps, "train.micro_batch": mb, "train.activation_checkpoint": ac}


BASELINE_MODEL = {"model.dim": 8, "model.n_layers": 1, "model.n_heads": 2, "model.n_kv_heads": 1,
                  "data.seq_len": 16, "train.global_batch": NPROC, "train.micro_batch": 1}


def pooled(dirs: list[str], predict=None) -> None:
    """Every step after the first of each layout over several runs' --out folders: the median
    tokens/s per layout and the ranking by it (the machine's load drifts between runs);
    `predict(name)`: the planner's tokens/s for a layout, printed beside it with its rank."""
    rates = {}
    for d in dirs:
        for name in LAYOUTS:
            f = Path(d) / name / "metrics.jsonl"
            if f.exists():
                recs = [json.loads(line) for line in f.read_text().splitlines()]
                rates.setdefault(name, []).extend(r["tokens_per_s"] for r in recs[1:])
    if not rates:
        raise SystemExit(f"--pool: no layout runs under {' '.join(dirs)}")
    medians = {n: statistics.median(r) for n, r in rates.items()}
    order = sorted(rates, key=lambda n: -medians[n])
    pred = {n: predict(n) for n in rates} if predict else {}
    by_pred = sorted(pred, key=lambda n: -pred[n])
    print("| layout | steps pooled | median tokens/s | rank |" + (" predicted tokens/s | rank |" if pred else "")
          + "\n|---|---|---|---|" + ("---|---|" if pred else ""))
    for name in rates:
        extra = f" {pred[name]:.0f} | {1 + by_pred.index(name)} |" if pred else ""
        print(f"| {name} | {len(rates[name])} | {medians[name]:.0f} | {1 + order.index(name)} |{extra}")
    print(f"\nfastest measured over {len(dirs)} runs: {order[0]}"
          + (f"; fastest predicted {by_pred[0]}: {'agree' if by_pred[0] == order[0] else 'DISAGREE'}" if pred else ""))


def _predictor(src: Path):
    """The planner's tokens/s for a layout name, with the device and topology files in `src`."""
    from dist_train.planner import estimate, network

    topo_file = src / "cpu-topology.toml"
    topo = network(planner_cfg(MODEL, topo_file), NPROC, "cpu", device_file=src / "cpu-device.toml")

    def predict(name: str) -> float:
        spec = LAYOUTS[name]
        cfg = planner_cfg({**MODEL, **layout_sets(spec)}, topo_file)
        return estimate(cfg, planner_layout(spec), topo).tokens_per_s

    return predict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool", nargs="+", metavar="OUT", help="print the median tokens/s of every layout over the "
                                                              "steps of these earlier runs' --out folders, and stop")
    ap.add_argument("--out", default=None, help="folder for the runs, the topology file and the device file")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--only", nargs="*", help="layout names to run (default: all)")
    ap.add_argument("--reverse", action="store_true", help="run the layouts in reverse order (the load of a shared "
                                                               "machine drifts: a second run in the other order shows it)")
    ap.add_argument("--device-from", metavar="DIR",
                    help="reuse the peak (DIR/cpu-device.toml) and link (DIR/cpu-topology.toml) figures of an "
                         "earlier run's --out folder (the baseline is always measured again)")
    args = ap.parse_args()
    if args.pool:
        return pooled(args.pool, _predictor(Path(args.device_from)) if args.device_from else None)
    root = Path(args.out or tempfile.mkdtemp(prefix="planner-bench-"))
    root.mkdir(parents=True, exist_ok=True)

    from dist_train.planner import GB, Layout, estimate, load_device, memory_per_rank, network

    if args.device_from:
        src = Path(args.device_from)
        old_dev = src / "cpu-device.toml"
        old = network(planner_cfg(MODEL, src / "cpu-topology.toml"), NPROC, "cpu", device_file=old_dev)
        peak, bw, lat = old.device.peak_flops, old.link("intra_node").bandwidth, old.link("intra_node").latency
    else:
        peak = measure_peak()
        bw, lat = measure_link()
    cores = len(os.sched_getaffinity(0))
    sync = measure_sync()
    print(f"peak per rank ({NPROC} processes at once, fp32 1024^3 matmul): {peak / 1e9:.2f} GFLOP/s", flush=True)
    print(f"gloo loopback ({NPROC} ranks, all_reduce): {bw * 8 / 1e9:.3f} Gbit/s ({bw / 1e9:.3f} GB/s), "
          f"{lat * 1e3:.4f} ms per hop; {cores} cores for the {NPROC} ranks; a synchronising call between rounds "
          f"of matmuls costs {sync * 1e3:.3f} ms", flush=True)
    # baseline: a near-empty model's run, less the planner's count of it (with no baseline)
    base_over = {**BASELINE_MODEL, "parallel.dp_shard": NPROC}
    recs = launch(root, "baseline", base_over, 3)
    measured_base = recs[-1]["peak_allocated_bytes"]
    if measured_base < 0:
        raise SystemExit("peak_allocated_bytes is -1: this libc has no mallinfo2 (glibc >= 2.33 is needed)")
    topo_path, dev_path = root / "cpu-topology.toml", root / "cpu-device.toml"
    # the gloo loopback as dist_train/topology.py's intra_node class: Gbit/s and ms
    topo_path.write_text(
        "# measured by bench/planner.py on this machine: NPROC ranks on one node, joined by gloo's loopback\n"
        f"[topology]\nnodes = 1\nlinks = {{ intra_node = {{ bandwidth_gbps = {bw * 8 / 1e9:.4f}, "
        f"latency_ms = {lat * 1e3:.5f} }} }}\n")

    def write_device(baseline: float) -> None:
        dev_path.write_text(
            "# measured by bench/planner.py on this machine (per rank)\n"
            f"[device]\nname = \"cpu\"\npeak_tflops = {peak / 1e12:.6f}\nmemory_gb = {20 / NPROC:.1f}\n"
            f"baseline_gb = {baseline / GB:.4f}\nefficiency = 1.0\noverlap = false\ncores = {cores}\n"
            f"sync_ms = {sync * 1e3:.4f}\n")

    write_device(0.0)
    own = memory_per_rank(planner_cfg(base_over, topo_path), Layout(dp_shard=NPROC, micro_batch=1),
                          load_device(dev_path, "cpu"))
    baseline = measured_base - own.peak
    write_device(baseline)
    print(f"baseline: measured {measured_base / 2**20:.0f} MiB, planner's count of that run "
          f"{own.peak / 2**20:.2f} MiB -> baseline {baseline / 2**20:.0f} MiB; topology {topo_path}, device "
          f"{dev_path}", flush=True)
    topo = network(planner_cfg(MODEL, topo_path), NPROC, "cpu", device_file=dev_path)

    rows = []
    order = list(LAYOUTS.items())[::-1] if args.reverse else LAYOUTS.items()
    for name, spec in order:
        if args.only and name not in args.only:
            continue
        over = layout_sets(spec)
        t0 = time.perf_counter()
        recs = launch(root, name, over, args.steps)
        mem, rss = recs[-1]["peak_allocated_bytes"], recs[-1]["peak_memory_bytes"]
        tps = statistics.median(r["tokens_per_s"] for r in recs[1:])
        est = estimate(planner_cfg({**MODEL, **over}, topo_path), planner_layout(spec), topo)
        rows.append((name, est, mem, tps, rss))
        print(f"{name}: measured {mem / 2**20:.0f} MiB (RSS {rss / 2**20:.0f}), {tps:.0f} tokens/s; predicted "
              f"{est.memory.peak / 2**20:.0f} "
              f"MiB, {est.tokens_per_s:.0f} tokens/s ({time.perf_counter() - t0:.0f} s)", flush=True)

    print("\n| layout | predicted MiB | measured MiB (heap) | error | max RSS MiB | predicted tokens/s | "
          "measured tokens/s | predicted rank | measured rank |")
    print("|---|---|---|---|---|---|---|---|---|")
    by_pred = sorted(rows, key=lambda r: -r[1].tokens_per_s)
    by_meas = sorted(rows, key=lambda r: -r[3])
    for name, est, mem, tps, rss in rows:
        err = (est.memory.peak - mem) / mem
        print(f"| {name} | {est.memory.peak / 2**20:.0f} | {mem / 2**20:.0f} | {100 * err:+.1f}% | {rss / 2**20:.0f} | "
              f"{est.tokens_per_s:.0f} | {tps:.0f} | {1 + [r[0] for r in by_pred].index(name)} | "
              f"{1 + [r[0] for r in by_meas].index(name)} |")
    print(f"\nmax |memory error| {100 * max(abs(e.memory.peak - m) / m for _, e, m, _, _ in rows):.1f}%; "
          f"fastest predicted {by_pred[0][0]}, fastest measured {by_meas[0][0]}: "
          f"{'agree' if by_pred[0][0] == by_meas[0][0] else 'DISAGREE'}")
    print("\nmemory parts of the predicted rank (MiB):")
    for name, est, *_ in rows:
        print(f"  {name} (pp rank {est.memory.pp_rank}): " +
              ", ".join(f"{k} {v / 2**20:.0f}" for k, v in est.memory.parts.items()))


if __name__ == "__main__":
    main()
