"""`dist-train ray`: the job on Ray Train workers trains like `local`, survives a worker
killed with kill -9, and names launch mistakes in one line. Each test starts and stops
its own Ray."""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import free_port, read_metrics, run_cli, runs_file, sweep
from tests.equivalence import assert_values_match

pytest.importorskip("ray.train")

MOE = {"model.ffn_dim": 64, "model.moe_experts": 8, "model.moe_top_k": 2, "model.moe_every": 1,
       "model.moe_aux_weight": 0.01, "model.moe_z_weight": 0.001}
RUNS = {"dense": {}, "moe": {**MOE, "parallel.ep": 4}}
COMMON = {"train.steps": 12, "checkpoint.every": 4}
TOKENS = 16 * 128


def _rank_process(marker: str, rank: int) -> int | None:
    """The pid of the `dist_train train` child running `rank` whose command line holds `marker`."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            if b"dist_train" in cmd and marker.encode() in b" ".join(cmd):
                env = dict(v.split(b"=", 1) for v in (proc / "environ").read_bytes().split(b"\0") if b"=" in v)
                if env.get(b"RANK") == str(rank).encode() and env.get(b"TORCHELASTIC_RUN_ID", b"").startswith(b"ray-"):
                    return int(proc.name)
        except OSError:
            continue
    return None


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _kill_worker_at(run_dir: Path, step: int, marker: str, killed: list, stop: threading.Event) -> None:
    """When run_dir's metrics reach `step`, kill -9 the Ray worker actor that runs rank 1."""
    while not stop.is_set():
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and any(r["step"] >= step for r in read_metrics(metrics.parent)):
            child = _rank_process(marker, 1)
            if child is not None:
                time.sleep(random.uniform(0.0, 0.5))  # at a moment inside the next step, chosen here
                actor = _parent(child)
                os.kill(actor, signal.SIGKILL)
                killed.append((actor, child))
                return
        time.sleep(0.05)


@pytest.mark.slow
def test_ray_trains_like_local_and_survives_a_killed_worker(tmp_path):
    """`ray --workers 4` gives the losses of `local --nproc 4` (dense and ep = 4 MoE) with the
    observed backend counting collectives; the Ray worker of rank 1 killed with kill -9 at
    step 8 of the MoE run: Ray restarts the group, which resumes from the latest checkpoint,
    and every step is recorded once."""
    (tmp_path / "ray").mkdir()
    spec = runs_file(tmp_path / "ray", RUNS, COMMON)
    killed, stop = [], threading.Event()
    killer = threading.Thread(target=_kill_worker_at, args=(tmp_path / "ray" / "moe", 8, str(spec), killed, stop))
    killer.start()
    try:
        out = run_cli("ray", "configs/tiny.toml", "--workers", "4", "--max-failures", "1", "--runs", str(spec),
                      timeout=900)
    finally:
        stop.set()
        killer.join()
    assert killed, "the worker was not killed"
    assert "resumed from" in out.stdout + out.stderr
    (tmp_path / "local").mkdir()
    sweep(tmp_path / "local", 4, RUNS, COMMON)
    for name in RUNS:
        a, b = read_metrics(tmp_path / "ray" / name), read_metrics(tmp_path / "local" / name)
        assert [r["step"] for r in a] == list(range(1, 13)), f"{name}: every step once"
        assert all(sum(c["count"] for c in r["comm"].values()) > 0 for r in a), f"{name}: collectives counted"
        assert_values_match([r["loss"] for r in a], [r["loss"] for r in b], TOKENS, f"{name}: ray vs local")
        # the same ranks doing the same sums: well within the 1e-5 as well
        assert all(abs(x["loss"] - y["loss"]) <= 1e-5 * abs(y["loss"]) for x, y in zip(a, b)), name
    assert (tmp_path / "ray" / "dense" / "ray" / "session").is_dir(), "Ray's session files under the run directory"



@pytest.mark.slow
def test_ray_launch_mistakes_are_one_line(tmp_path):
    """Nothing at --address; more workers than the cluster's CPUs (a 2-CPU `ray start --head`
    started here); a malformed address: one line each, exit 2."""
    sets = ["--set", f"run.dir={tmp_path}"]
    proc = run_cli("ray", "configs/tiny.toml", "--workers", "2", "--address", f"127.0.0.1:{free_port()}", *sets,
                   check=False)
    assert proc.returncode == 2 and "nothing answers there" in proc.stderr, proc.stderr[-3000:]
    proc = run_cli("ray", "configs/tiny.toml", "--workers", "2", "--address", "nohost", *sets, check=False)
    assert proc.returncode == 2 and "expected auto or HOST:PORT" in proc.stderr, proc.stderr[-3000:]
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # Ray's sockets need a short path
    port = free_port()
    env = {**os.environ, "HOME": str(tmp_path), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    ray_bin = str(Path(sys.executable).with_name("ray"))
    head = subprocess.run([ray_bin, "start", "--head", "--num-cpus", "2", "--port", str(port), "--temp-dir", str(temp),
                           "--include-dashboard", "false", "--node-ip-address", "127.0.0.1"],
                          env=env, capture_output=True, text=True, timeout=120)
    try:
        assert head.returncode == 0, head.stderr[-3000:]
        proc = run_cli("ray", "configs/tiny.toml", "--workers", "4", "--address", f"127.0.0.1:{port}", *sets,
                       check=False, env={"HOME": str(tmp_path), "RAY_AUTH_MODE": "disabled"}, timeout=120)
        err = proc.stderr.strip()
        assert proc.returncode == 2, err[-3000:]
        assert "--workers 4 x --cpus-per-worker 1 needs 4 CPUs, but the Ray cluster has 2 CPUs on 1 node(s)" in err
        assert len([ln for ln in err.splitlines() if ln.startswith("dist-train")]) == 1 and "Traceback" not in err
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)
