"""How much dist-train's sharded data parallelism costs over the plain tools it is built on.

    OMP_NUM_THREADS=1 DS_BUILD_OPS=0 .venv/bin/python bench/dp_overhead.py [--steps 20] [--nproc 4]
        [--dim 128] [--layers 4] [--repeats 2] [--skip-deepspeed] [--out result.json]

About 3.5 minutes with the defaults on a 2-core CPU (each job spends ~15-20 s starting up;
DeepSpeed's first run also JIT-builds a comm extension, ~35 s, into TORCH_EXTENSIONS_DIR).

Trains one model on the same data three ways, one after the other, at dp_shard = nproc:
  dist-train         `python -m dist_train local --nproc N configs/tiny.toml --set ...`; its
                     metrics.jsonl gives the step times and peak memory
  torch FSDP2 loop   bench/_dp_fsdp_loop.py under torch.distributed.run: gloo, fully_shard
                     per block and at the root, accumulation that syncs on the last micro-batch
  DeepSpeed ZeRO-3   bench/_dp_deepspeed.py under torch.distributed.run: deepspeed.initialize
                     with ZeRO stage 3 on the CPU accelerator (gloo), a client torch AdamW

Same for all three: `Transformer(ModelArgs(...))` initialised by `init_weights(model, seed)`,
the bundled corpus (byte tokenizer) through `ensure_prepared` / `TokenDataset` /
`DistributedBatchSampler`, global batch 16 in micro-batches of 2, torch AdamW (same lr,
betas, weight decay, warm-up + cosine schedule), gradient clipping at 1.0, fp32.

A step's time is its slowest rank's (as dist-train's metrics define it); the bench takes the
median over the steps after the first 3 of every run, and tokens/s = global_batch x seq_len /
median. Each system runs `--repeats` times, in alternating order (A B C, C B A, ...), so that
a drift in the machine's background load falls on all of them alike.
Peak memory per rank is the largest ru_maxrss over the ranks: on CPU that is the whole
process's resident peak, Python, torch and each framework's own imports included.

Goals: dist-train >= 0.95 x the FSDP2 loop's tokens/s, and ahead of DeepSpeed ZeRO-3.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
WARMUP_STEPS = 3  # dropped before taking the median
GOAL_VS_FSDP = 0.95
NOISY_SHARE = 0.10  # other processes' share of the CPUs above which timings are flagged
SKIP_DS = "skipped: install the bench extra (make bench)"


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def build_spec(args) -> dict:
    from dist_train.data import TokenDataset, ensure_prepared

    seq_len = 128
    vocab = TokenDataset(ensure_prepared("bundled", None, "byte"), seq_len).vocab_size
    return {
        "model": {"dim": args.dim, "n_layers": args.layers, "n_heads": 4, "n_kv_heads": 2,
                  "ffn_dim": round_up(int(8 * args.dim / 3), 64), "vocab_size": round_up(vocab, 64)},
        "seq_len": seq_len, "global_batch": 16, "micro_batch": 2, "steps": args.steps,
        "lr": 3e-3, "warmup": 5, "min_lr_ratio": 0.1, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95,
        "grad_clip": 1.0, "foreach": True, "seed": 1234, "warmup_steps": WARMUP_STEPS,
    }


def dist_train_overrides(spec: dict, nproc: int, run_dir: Path) -> list[str]:
    m = spec["model"]
    sets = {
        "run.dir": str(run_dir), "run.name": "bench", "run.seed": spec["seed"],
        "model.dim": m["dim"], "model.n_layers": m["n_layers"], "model.n_heads": m["n_heads"],
        "model.n_kv_heads": m["n_kv_heads"], "model.ffn_dim": m["ffn_dim"], "model.vocab_size": m["vocab_size"],
        "data.source": "bundled", "data.tokenizer": "byte", "data.seq_len": spec["seq_len"],
        "train.steps": spec["steps"], "train.global_batch": spec["global_batch"],
        "train.micro_batch": spec["micro_batch"], "train.lr": spec["lr"], "train.warmup": spec["warmup"],
        "train.min_lr_ratio": spec["min_lr_ratio"], "train.weight_decay": spec["weight_decay"],
        "train.beta1": spec["beta1"], "train.beta2": spec["beta2"], "train.grad_clip": spec["grad_clip"],
        "train.dtype": "fp32", "parallel.dp_replicate": 1, "parallel.dp_shard": nproc,
        "checkpoint.every": 0, "checkpoint.resume": "none", "metrics.progress": "false",
        "metrics.log_every": 1,
    }
    out = []
    for k, v in sets.items():
        out += ["--set", f"{k}={v}"]
    return out


def child_env() -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("DS_BUILD_OPS", "0")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env  # the helpers import _dp_common from their own folder (sys.path[0])


def _descendants(pid: int) -> list[int]:
    """Processes under `pid` (from /proc), e.g. the ranks a launcher started."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of `pids` (all their threads), from /proc/PID/stat."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of the line)
    return total / os.sysconf("SC_CLK_TCK")


def _machine_busy_seconds() -> float:
    """CPU seconds all processes on the machine have used since boot (/proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _children_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)  # every descendant reaped so far
    return r.ru_utime + r.ru_stime


def run_logged(cmd: list[str], log: Path, timeout: float, watch: Path | None = None,
               ranks_cmdline: bytes = b"") -> tuple[int, float, list[float], list[float], float]:
    """Run `cmd` with its output in `log`. Returns (exit code, wall seconds, arrivals, cpu,
    others): with `watch`, the time each line of that file first appeared (polled every 5 ms)
    and the CPU seconds used by then by the processes under `cmd` whose command line holds
    `ranks_cmdline` (the ranks); `others`, the share of the machine's CPUs that processes
    other than this job (and this bench) used meanwhile: the background that disturbs timings."""
    busy0, ours0, self0 = _machine_busy_seconds(), _children_seconds(), time.process_time()
    t0 = time.perf_counter()
    arrivals: list[float] = []
    cpu: list[float] = []
    ranks: list[int] | None = None
    with open(log, "w") as f:
        # Its own session, so a timeout can end the launcher and the ranks it started together.
        proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        while proc.poll() is None:
            if time.perf_counter() - t0 > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                f.write(f"\n[dp_overhead] killed after {timeout:.0f} s\n")
                break
            if watch is not None and watch.exists():
                lines = watch.read_bytes().count(b"\n")
                if lines > len(arrivals):
                    now = time.perf_counter()
                    if ranks is None:
                        ranks = [p for p in _descendants(proc.pid) if ranks_cmdline in _cmdline(p)]
                    used = _cpu_seconds(ranks)
                    arrivals += [now] * (lines - len(arrivals))
                    cpu += [used] * (lines - len(cpu))
            time.sleep(0.005)
        rc = proc.returncode
    wall = time.perf_counter() - t0
    ours = _children_seconds() - ours0 + time.process_time() - self0
    others = max(0.0, _machine_busy_seconds() - busy0 - ours) / (wall * (os.cpu_count() or 1))
    return rc, wall, arrivals, cpu, others


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def tail(path: Path, n: int = 15) -> str:
    lines = path.read_text(errors="replace").splitlines()
    return "\n".join("    " + line for line in lines[-n:])


def run_dist_train(spec: dict, nproc: int, tmp: Path, timeout: float) -> dict:
    """One dist-train job; its metrics.jsonl gives each step's time (slowest rank), loss and
    peak memory (largest over ranks)."""
    run_dir = tmp / "dist-train"
    cmd = [sys.executable, "-m", "dist_train", "local", "--nproc", str(nproc), "configs/tiny.toml",
           *dist_train_overrides(spec, nproc, run_dir)]
    log = tmp / "dist-train.log"
    metrics = run_dir / "bench" / "metrics.jsonl"
    rc, wall, arrivals, cpu, others = run_logged(cmd, log, timeout, watch=metrics,
                                                 ranks_cmdline=b"dist_train\0train")
    if rc != 0 or not metrics.exists():
        return {"status": f"failed (exit {rc})", "log": tail(log)}
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    # Line k lands after step k and its per-step metrics: from line k-1 to line k is step k, all in.
    periods = {k: arrivals[k - 1] - arrivals[k - 2] for k in range(2, len(arrivals) + 1)}
    cpu_periods = {k: cpu[k - 1] - cpu[k - 2] for k in range(2, len(cpu) + 1)}
    return {"status": "ok", "step_time_s": [r["step_time_s"] for r in rows], "loss": [r["loss"] for r in rows],
            "peak_memory_bytes": max(r["peak_memory_bytes"] for r in rows), "periods": periods,
            "cpu_periods": cpu_periods, "wall_s": wall, "other_cpu_share": others}


def run_baseline(script: str, spec: dict, nproc: int, tmp: Path, timeout: float) -> dict:
    """One baseline job under torch.distributed.run; rank 0 writes the same numbers as JSON."""
    result = tmp / f"{script}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(BENCH / script), "--spec", json.dumps(spec), "--result", str(result)]
    log = tmp / f"{script}.log"
    rc, wall, _, _, others = run_logged(cmd, log, timeout)
    if rc != 0 or not result.exists():
        return {"status": f"failed (exit {rc})", "log": tail(log)}
    r = json.loads(result.read_text())
    r.update(status="ok", wall_s=wall, other_cpu_share=others,
             periods={k + 1: v for k, v in enumerate(r["step_period_s"])},
             cpu_periods={k + 1: v for k, v in enumerate(r["step_period_cpu_s"])})
    return r


def combine(system: str, runs: list[dict], spec: dict) -> dict:
    """One row from a system's runs: the median over all runs' steps after the warm-up."""
    bad = [r for r in runs if r["status"] != "ok"]
    if bad:
        return {"system": system, "status": bad[0]["status"], "log": bad[0].get("log", "")}
    measured = [t for r in runs for t in r["step_time_s"][WARMUP_STEPS:]]
    periods = [v for r in runs for k, v in r["periods"].items() if k > WARMUP_STEPS]
    cpu = [v for r in runs for k, v in r["cpu_periods"].items() if k > WARMUP_STEPS]
    median = statistics.median(measured)
    q = statistics.quantiles(measured, n=4) if len(measured) >= 2 else [median, median, median]
    tokens = spec["global_batch"] * spec["seq_len"]
    return {
        "system": system, "status": "ok", "tokens_per_s": tokens / median, "median_step_time_s": median,
        "step_time_iqr_s": [q[0], q[2]], "peak_memory_bytes": max(r["peak_memory_bytes"] for r in runs),
        "median_step_period_s": statistics.median(periods) if periods else None,
        "median_cpu_s_per_step": statistics.median(cpu) if cpu else None,
        "tokens_per_s_per_run": [tokens / statistics.median(r["step_time_s"][WARMUP_STEPS:]) for r in runs],
        "loss": runs[0]["loss"],
        "runs": [{k: v for k, v in r.items() if k not in ("periods", "cpu_periods")} for r in runs],
    }


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def table(rows: list[dict]) -> str:
    ref = rows[0] if rows[0]["status"] == "ok" else None
    head = ("system", "tokens/s", "dist-train / this", "peak mem/rank", "dist-train / this",
            "median step s [IQR]", "CPU s/step, all ranks", "dist-train / this")
    lines = []
    for r in rows:
        if r["status"] != "ok":
            lines.append((r["system"], r["status"]) + ("",) * (len(head) - 2))
            continue
        r["tokens_ratio"] = ref["tokens_per_s"] / r["tokens_per_s"] if ref else None
        r["memory_ratio"] = ref["peak_memory_bytes"] / r["peak_memory_bytes"] if ref else None
        r["cpu_ratio"] = (ref["median_cpu_s_per_step"] / r["median_cpu_s_per_step"]
                          if ref and r["median_cpu_s_per_step"] and ref["median_cpu_s_per_step"] else None)
        lo, hi = r["step_time_iqr_s"]
        lines.append((r["system"], f"{r['tokens_per_s']:.0f}",
                      f"{r['tokens_ratio']:.3f}" if r["tokens_ratio"] else "-", mib(r["peak_memory_bytes"]),
                      f"{r['memory_ratio']:.3f}" if r["memory_ratio"] else "-",
                      f"{r['median_step_time_s']:.3f} [{lo:.3f}-{hi:.3f}]",
                      f"{r['median_cpu_s_per_step']:.3f}" if r["median_cpu_s_per_step"] else "-",
                      f"{r['cpu_ratio']:.3f}" if r["cpu_ratio"] else "-"))
    widths = [max(len(str(x[i])) for x in [head] + lines) for i in range(len(head))]

    def fmt(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(x) for x in lines])


def goals(rows: dict) -> list[tuple[str, bool | None, str]]:
    dt, fsdp, ds = rows["dist-train"], rows["torch FSDP2 loop"], rows["DeepSpeed ZeRO-3"]
    out = []
    if dt["status"] == "ok" and fsdp["status"] == "ok":
        ratio = dt["tokens_per_s"] / fsdp["tokens_per_s"]
        out.append((f"tokens/s >= {GOAL_VS_FSDP} x torch FSDP2 loop", ratio >= GOAL_VS_FSDP, f"{ratio:.3f}"))
    else:
        out.append((f"tokens/s >= {GOAL_VS_FSDP} x torch FSDP2 loop", None, "not measured"))
    if dt["status"] == "ok" and ds["status"] == "ok":
        ratio = dt["tokens_per_s"] / ds["tokens_per_s"]
        out.append(("tokens/s ahead of DeepSpeed ZeRO-3", ratio > 1.0, f"{ratio:.3f}"))
    else:
        out.append(("tokens/s ahead of DeepSpeed ZeRO-3", None, ds["status"] if ds["status"] != "ok" else "not measured"))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per system (the first 3 are dropped)")
    p.add_argument("--nproc", type=int, default=4, help="ranks (dp_shard) for every system")
    p.add_argument("--dim", type=int, default=128, help="model width")
    p.add_argument("--layers", type=int, default=4, help="transformer blocks")
    p.add_argument("--skip-deepspeed", action="store_true", help="do not run DeepSpeed ZeRO-3")
    p.add_argument("--out", type=Path, help="also write the table and raw numbers as JSON here")
    p.add_argument("--repeats", type=int, default=2,
                   help="runs per system, alternating the order; step times are pooled (default 2)")
    p.add_argument("--timeout", type=float, default=600, help="seconds allowed to each system's run")
    p.add_argument("--keep", action="store_true", help="keep the temporary run directory and logs")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.steps < WARMUP_STEPS + 2:
        p.error(f"--steps must be at least {WARMUP_STEPS + 2} (the first {WARMUP_STEPS} are warm-up)")
    if 16 % (2 * args.nproc):
        p.error(f"--nproc {args.nproc}: global batch 16 in micro-batches of 2 needs nproc dividing 8")

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    spec = build_spec(args)
    from dist_train.model import ModelArgs, count_params

    m = spec["model"]
    n_params = count_params(ModelArgs(dim=m["dim"], n_layers=m["n_layers"], n_heads=m["n_heads"],
                                      n_kv_heads=m["n_kv_heads"], vocab_size=m["vocab_size"],
                                      ffn_dim=m["ffn_dim"], max_seq_len=spec["seq_len"]))["total"]
    now = datetime.datetime.now().astimezone()
    machine = (f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), "
               f"{platform.system()} {platform.release()}, torch {torch.__version__}, gloo, "
               f"{args.nproc} ranks, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}")
    print(f"dp_overhead  {now:%Y-%m-%d %H:%M %Z}  {machine}")
    print(f"model: dim {m['dim']}, {m['n_layers']} layers, {m['n_heads']} heads, {m['n_kv_heads']} kv heads, "
          f"ffn {m['ffn_dim']}, vocab {m['vocab_size']}, seq_len {spec['seq_len']} ({n_params / 1e6:.2f}M params, "
          f"fp32); global batch {spec['global_batch']}, micro batch {spec['micro_batch']} "
          f"({spec['global_batch'] // (spec['micro_batch'] * args.nproc)} micro-batches per rank per step); "
          f"{args.steps} steps x {args.repeats} run(s) per system, median over steps {WARMUP_STEPS + 1}..{args.steps}")

    have_ds = importlib.util.find_spec("deepspeed") is not None
    tmp = Path(tempfile.mkdtemp(prefix="dp_overhead-"))
    systems = {"dist-train": lambda d: run_dist_train(spec, args.nproc, d, args.timeout),
               "torch FSDP2 loop": lambda d: run_baseline("_dp_fsdp_loop.py", spec, args.nproc, d, args.timeout)}
    rows: dict[str, dict] = {}
    if args.skip_deepspeed:
        rows["DeepSpeed ZeRO-3"] = {"system": "DeepSpeed ZeRO-3", "status": "skipped (--skip-deepspeed)"}
    elif not have_ds:
        rows["DeepSpeed ZeRO-3"] = {"system": "DeepSpeed ZeRO-3", "status": SKIP_DS}
    else:
        systems["DeepSpeed ZeRO-3"] = lambda d: run_baseline("_dp_deepspeed.py", spec, args.nproc, d, args.timeout)
    runs: dict[str, list[dict]] = {name: [] for name in systems}
    try:
        for rep in range(args.repeats):
            # Alternate the order (A B C, C B A, ...) so a drift in background load is shared.
            order = list(systems) if rep % 2 == 0 else list(reversed(systems))
            for name in order:
                load = os.getloadavg()[0]
                print(f"[{rep + 1}/{args.repeats}] {name} ...", flush=True)
                d = tmp / f"{rep}-{name.split()[0]}"
                d.mkdir()
                r = systems[name](d)
                r["load_average_before"] = load
                runs[name].append(r)
                if r["status"] == "ok":
                    print(f"  {r['wall_s']:.0f} s wall, other processes used {r['other_cpu_share']:.0%} of the "
                          f"CPUs meanwhile; step times (s): "
                          + " ".join(f"{t:.2f}" for t in r["step_time_s"]), flush=True)
                else:
                    print(f"  {r['status']}; last lines of its log:\n{r['log']}", flush=True)
        for name in systems:
            rows[name] = combine(name, runs[name], spec)
        ordered = [rows[k] for k in ("dist-train", "torch FSDP2 loop", "DeepSpeed ZeRO-3")]
        print()
        print(table(ordered))
        print()
        print("tokens/s = global_batch x seq_len / median step time (a step lasts as long as its slowest rank).")
        print("peak mem/rank = the largest ru_maxrss over the ranks: on CPU this is the whole process's resident")
        print("peak (Python, torch, gloo buffers and each framework's imports included), not the tensor memory alone.")
        print("CPU s/step = user + system CPU seconds of all ranks from one step's start to the next's (median):")
        print("the work itself; other processes disturb it less than wall time, but contention still inflates it.")
        print("ratios are dist-train / this system: above 1 for tokens/s, below 1 for memory and CPU favour dist-train.")
        ok = [r for r in ordered if r["status"] == "ok"]
        if ok:
            print("median step period, step start to next step start (work between steps included): " + "; ".join(
                f"{r['system']} {r['median_step_period_s']:.3f} s" for r in ok if r["median_step_period_s"]))
            if args.repeats > 1:
                print("tokens/s per run: " + "; ".join(
                    f"{r['system']} " + ", ".join(f"{v:.0f}" for v in r["tokens_per_s_per_run"]) for r in ok))
            print("loss at step 1 / last step: " + "; ".join(
                f"{r['system']} {r['loss'][0]:.4f} / {r['loss'][-1]:.4f}" for r in ok))
            ref = rows.get("torch FSDP2 loop", {})
            if ref.get("status") == "ok":
                # Same weights, data and optimizer: the losses should agree to float rounding.
                print("largest |loss - torch FSDP2 loop's| over the steps: " + "; ".join(
                    f"{r['system']} {max(abs(a - b) for a, b in zip(r['loss'], ref['loss'])):.2e}"
                    for r in ok if r is not ref))
        busy = [(r["other_cpu_share"], name) for name, rs in runs.items() for r in rs if r["status"] == "ok"]
        if busy and max(busy)[0] > NOISY_SHARE:
            print(f"WARNING: other processes used up to {max(busy)[0]:.0%} of the CPUs during these runs "
                  f"({max(busy)[1]}); wall-clock ratios between separate runs are unreliable at that level.")
            print("  Rerun on an idle machine, or pair dist-train's step with a plain FSDP2 step in the same")
            print("  processes: python -m torch.distributed.run --standalone --nproc-per-node 4 bench/_dp_paired.py")
        print()
        verdicts = goals(rows)
        for what, met, value in verdicts:
            print(f"goal: {what}: {value} -> {'met' if met else 'NOT met' if met is False else 'not measured'}")
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({
                "date": now.isoformat(timespec="seconds"), "machine": machine, "command": sys.argv,
                "spec": spec, "parameters": n_params, "repeats": args.repeats,
                "rows": [{k: v for k, v in r.items() if k != "log"} for r in ordered],
                "goals": [{"goal": w, "met": m_, "value": v} for w, m_, v in verdicts],
            }, indent=1))
            print(f"wrote {args.out}")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0 if all(r["status"] == "ok" or r["status"].startswith("skipped") for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
