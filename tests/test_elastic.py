"""Elastic DiLoCo replicas, tested from outside the processes: each replica is its own job
(`ReplicaJobs`, its own session), a lighthouse forms the quorum, and replicas are killed
with kill -9 of their whole process tree at a moment chosen from outside (inside an outer
step's exchange, or while a joiner heals from them).
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest

from dist_train.launchers.replicas import ReplicaJobs, address, start_lighthouse

H = 5
COMMON = ["metrics.progress=false", "metrics.report=false", "diloco.enabled=true", f"diloco.inner_steps={H}",
          "checkpoint.every=5", "elastic.quorum_timeout_s=60", "elastic.timeout_s=10", "data.seq_len=64",
          "train.global_batch=8"]


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for(what, predicate, timeout: float = 240.0, poll: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def log_has(replica, text: str) -> bool:
    return replica.log.exists() and text in replica.log.read_text(errors="replace")


def _round_with(replica, n: int, after: int = 0) -> int | None:
    """The step of the first outer round after `after` the replica began with n replicas."""
    import re

    text = replica.log.read_text(errors="replace") if replica.log.exists() else ""
    steps = [int(m.group(1)) for m in re.finditer(rf"step (\d+): outer round with {n} replica", text)]
    return next((s for s in steps if s > max(after, 0)), None)


@pytest.fixture
def lighthouse():
    lh = start_lighthouse("127.0.0.1:0", min_replicas=1, join_timeout_s=1.0, heartbeat_timeout_s=2.0)
    yield address(lh)
    lh.shutdown()


def jobs_for(tmp_path, lighthouse, nproc, steps, extra=()) -> ReplicaJobs:
    sets = [f"run.dir={tmp_path}", "run.name=el", f"train.steps={steps}", *COMMON, *extra]
    return ReplicaJobs("configs/tiny.toml", sets, nproc, lighthouse, tmp_path / "el", logs=tmp_path / "logs")


@pytest.mark.slow
def test_a_replica_leaves_inside_an_outer_step_and_another_joins(tmp_path, lighthouse):
    """Two replicas of dp_shard = 2; kill -9 of every process of b while a is inside an
    outer step's exchange (each cross-replica op is slowed so the exchange takes a while):
    a goes on alone with the same pseudo-gradients (the round is run again on the smaller
    quorum), every step recorded once; then c joins, heals from a, starts at a's step at a's
    loss, and after the next outer step a and c hold the same global state bit for bit."""
    steps = 80
    jobs = jobs_for(tmp_path, lighthouse, 2, steps, ['fault.inject=["slow_exchange:ms=100"]'])
    try:
        a, b = jobs.start("a"), jobs.start("b")
        two = wait_for("an outer step of a with b", lambda: _round_with(a, 2))
        time.sleep(random.uniform(0.0, 0.3))  # inside the exchange's first ops, at a moment chosen here
        assert jobs.kill("b") >= 3  # its launcher, agent and two workers
        c = jobs.start("c")  # it joins at a's next outer step after its start-up
        wait_for("a alone", lambda: _round_with(a, 1, after=two - 1))
        codes = jobs.wait(timeout=300)
        assert codes["a"] == 0 and codes["c"] == 0, (codes, a.log.read_text()[-3000:], c.log.read_text()[-3000:])
    finally:
        jobs.stop()
    ra, rc = records(a.run_dir), records(c.run_dir)
    first_a = ra[0]["step"]  # 1, or where a healed from b had b started first
    assert [r["step"] for r in ra] == list(range(first_a, steps + 1))  # no gap, no repeat: no inner step lost
    by_step = {r["step"]: r for r in ra}
    assert by_step[two]["replicas"] == 1 and by_step[two]["retries"], by_step[two]  # b died inside: run again alone
    replicas = [r["replicas"] for r in ra]
    assert replicas[two - first_a - H] == 2 and replicas[-1] == 2, replicas
    first = rc[0]
    assert first.get("healed_from") == "a" and first["step"] > two and first["step"] % H == 1, first
    assert first["loss"] < ra[0]["loss"] - 1.0  # the survivor's level, not the initial loss
    synced = [r for r in rc if r["applied_fragments"]]
    assert synced and all(r["outer_digest"] == by_step[r["step"]]["outer_digest"] for r in synced)
