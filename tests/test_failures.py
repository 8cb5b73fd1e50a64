"""Failure paths as a user meets them: a rank killed from outside at a random moment, and
a rank that meets bad data. Each survivor says one line (no traceback on the terminal; it
goes to the run directory), the job resumes from its checkpoint, and a data error exits
cleanly (exit 2, one line, no abort)."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, read_metrics, run_cli, tiny_overrides


def worker_pids(marker: str) -> list[int]:
    """pids of the `dist_train train` workers whose command line holds `marker`."""
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            cmd = open(f"/proc/{d}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if b"dist_train" in cmd and b"train" in cmd and any(marker.encode() in c for c in cmd):
            pids.append(int(d))
    return pids


@pytest.mark.slow
def test_killed_rank_one_line_per_survivor_then_the_run_resumes(tmp_path):
    steps = 30
    proc = subprocess.Popen([sys.executable, "-m", "dist_train", "local", "--nproc", "4", "--max-restarts", "1",
                             "configs/tiny.toml", *tiny_overrides(tmp_path, "k", steps, **{"checkpoint.every": 5})],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        metrics = tmp_path / "k" / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 7):
            time.sleep(0.2)
        time.sleep(random.uniform(0, 0.6))  # anywhere inside a step, not at its boundary
        pids = worker_pids(str(tmp_path))
        assert len(pids) == 4, pids
        os.kill(random.choice(pids), signal.SIGKILL)
        out, _ = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out, out[-6000:]
    lost = [line for line in out.splitlines() if "lost a peer" in line]
    assert 1 <= len(lost) <= 3, out[-3000:]  # survivors the agent had not stopped yet
    by_rank = [line.split("rank ", 1)[1].split()[0] for line in lost]
    assert len(by_rank) == len(set(by_rank)), lost  # at most one line per survivor
    for line in lost:
        assert "the launcher restarts the job from its latest checkpoint" in line and "traceback: " in line, line
        log = line.rsplit("traceback: ", 1)[1].rstrip(")")
        assert "Traceback" in open(log).read()
    assert "resumed from" in out
    assert [r["step"] for r in read_metrics(tmp_path / "k")] == list(range(1, steps + 1))


def test_bad_data_on_every_rank_exits_cleanly(tmp_path):
    """A truncated shard as data.source: every rank raises the same DataError while the
    process group is up; the job ends with exit 2 and one clear line, no rank aborts."""
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": "words " * 200 + str(i)}) + "\n" for i in range(40)))
    run_cli("prepare", str(docs), "--out", str(tmp_path / "S"))
    shard = tmp_path / "S" / "shard-00000.arrow"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    for attempt in range(2):
        proc = run_cli("local", "--nproc", "2", "configs/tiny.toml",
                       *tiny_overrides(tmp_path, f"bad{attempt}", 2, **{"data.source": str(tmp_path / "S"),
                                                                        "data.seq_len": 32}), check=False)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 2, out[-3000:]
        assert "terminate called" not in out and "exitcode: -6" not in out and "Traceback" not in out, out[-3000:]
        assert "shard-00000.arrow" in proc.stderr and "dist-train prepare" in proc.stderr
