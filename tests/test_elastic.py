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


def steps_once(rs: list[dict], last: int) -> list[int]:
    """Every step once, in order, up to `last`; after a straggler healed from a replica a
    round ahead (its record names the source's step), it goes on from that step."""
    expect = rs[0]["step"]
    for r in rs:
        assert r["step"] == expect, [(x["step"], x.get("healed_step")) for x in rs]
        expect = max(r["step"], r.get("healed_step") or 0) + 1
    assert expect == last + 1, (expect, last)
    return [r["step"] for r in rs]


def _round_with(replica, n: int, after: int = 0) -> int | None:
    """The step of the first outer round after `after` the replica began with n replicas."""
    import re

    text = replica.log.read_text(errors="replace") if replica.log.exists() else ""
    steps = [int(m.group(1)) for m in re.finditer(rf"step (\d+): outer round with {n} replica", text)]
    return next((s for s in steps if s > max(after, 0)), None)


@pytest.fixture
def lighthouse():
    # live replicas wait for each other (a round here is well under 30 s); a dead one is dropped after 2 s
    lh = start_lighthouse("127.0.0.1:0", min_replicas=1, join_timeout_s=30.0, heartbeat_timeout_s=2.0)
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
    steps_once(ra, steps)  # no inner step lost (a straggler's skip names its source's step)
    by_step = {r["step"]: r for r in ra}
    assert by_step[two]["replicas"] == 1 and by_step[two]["retries"], by_step[two]  # b died inside: run again alone
    replicas = [r["replicas"] for r in ra]
    # round `two` began with a and b (a's log says so); whether the round before it had both
    # depends on which of them reached the lighthouse first, so only the end is checked here
    assert replicas[-1] == 2, replicas  # a and c at the end
    first = rc[0]
    assert first.get("healed_from") == "a" and first["step"] > two and first["step"] % H == 1, first
    initial = next(r[0]["loss"] for r in (ra, records(b.run_dir)) if r and r[0]["step"] == 1)  # a, or b if a healed
    assert first["loss"] < initial - 1.0  # the survivor's level, not the initial loss
    synced = [r for r in rc if r["applied_fragments"]]
    same = lambda r: by_step.get(r.get("healed_step") or r["step"], {}).get("outer_digest")  # noqa: E731
    assert synced and all(r["outer_digest"] == same(r) for r in synced)


@pytest.mark.slow
def test_the_source_dies_while_a_joiner_heals_tp2(tmp_path, lighthouse):
    """Replicas of tp = 2: c joins while a and b train; a, the source, is killed while it
    sends c its outer state (each op slowed): c heals from b instead, and no survivor
    hangs (b and c finish)."""
    steps = 45
    jobs = jobs_for(tmp_path, lighthouse, 2, steps, ["parallel.tp=2", "parallel.dp_shard=1",
                                                     'fault.inject=["slow_exchange:ms=60"]'])
    try:
        a, b = jobs.start("a"), jobs.start("b")
        wait_for("a and b in a round", lambda: _round_with(a, 2))
        before = len(a.log.read_text(errors="replace"))
        c = jobs.start("c")
        wait_for("a sending c its state", lambda: "sending its outer state" in a.log.read_text(errors="replace")[before:])
        time.sleep(random.uniform(0.0, 0.3))
        jobs.kill("a")
        codes = jobs.wait(timeout=300)
        assert codes["b"] == 0 and codes["c"] == 0, (codes, c.log.read_text()[-3000:])
    finally:
        jobs.stop()
    rb, rc = records(b.run_dir), records(c.run_dir)
    assert rc[0].get("healed_from") == "b", rc[0]
    steps_once(rb, steps)
    steps_once(rc, steps)
    by_step = {r["step"]: r for r in rb}
    # while a lived, three replicas may meet two at a time; once a is gone b and c sync together.
    # A round one of them missed (over the lighthouse's join timeout late) is healed at the next:
    # a straggler takes the state of the source's step, apart lineages the source's state
    a_end = max([r["step"] for r in records(a.run_dir)], default=0)
    synced = [r for r in rc if r["applied_fragments"] and r["step"] > a_end + H and r["replicas"] == 2]
    same = lambda r: by_step.get(r.get("healed_step") or r["step"], {}).get("outer_digest")  # noqa: E731
    assert synced and all(r["outer_digest"] == same(r) for r in synced), synced


@pytest.mark.slow
def test_pp2_replica_leaves_then_the_lighthouse_dies_and_everything_resumes(tmp_path):
    """Replicas of pp = 2: b is killed at a moment chosen here and a goes on alone; then
    the lighthouse dies: a stops within quorum_timeout + 5 s with one clear line and its
    checkpoint intact; a new lighthouse on the same port and the replicas started again
    resume and finish."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    bind = f"127.0.0.1:{port}"
    lh = _lighthouse_process(bind)
    steps, timeout_s = 400, 10
    jobs = jobs_for(tmp_path, bind, 2, steps, ["parallel.pp=2", "parallel.dp_shard=1", "model.n_layers=4",
                                                f"elastic.quorum_timeout_s={timeout_s}"])
    try:
        a, b = jobs.start("a"), jobs.start("b")
        two = wait_for("a and b in a round", lambda: _round_with(a, 2))
        time.sleep(random.uniform(0.0, 1.0))
        jobs.kill("b")
        wait_for("a alone", lambda: _round_with(a, 1, after=two))
        lh.kill()  # kill -9 of the lighthouse process
        lh.wait()
        stopped = time.monotonic()
        code = a.proc.wait(timeout=timeout_s + 30)
        took = time.monotonic() - stopped
    finally:
        jobs.stop()
    out = a.log.read_text(errors="replace")
    lines = [line for line in out.splitlines() if line.startswith("dist-train: replica a:")]
    assert code != 0 and len(lines) == 1 and "no quorum from the lighthouse" in lines[0], out[-3000:]
    assert "restart the lighthouse and the replicas to resume" in lines[0] and "Traceback" not in out
    assert took <= timeout_s + 5 + 2, took  # + 2: the heartbeat the lighthouse's loss is noticed after
    last = (a.run_dir / "checkpoints" / "latest").read_text().strip()
    done = records(a.run_dir)[-1]["step"]
    lh = _lighthouse_process(bind)
    jobs2 = jobs_for(tmp_path, bind, 2, done + 10, ["parallel.pp=2", "parallel.dp_shard=1", "model.n_layers=4",
                                                     f"elastic.quorum_timeout_s={timeout_s}"])
    try:
        a2, b2 = jobs2.start("a"), jobs2.start("b")
        codes = jobs2.wait(timeout=240)
        assert codes == {"a": 0, "b": 0}, (codes, a2.log.read_text()[-3000:])
    finally:
        jobs2.stop()
        lh.kill()
    assert f"resumed from {a.run_dir}/checkpoints/{last}" in a2.log.read_text()
    assert records(a.run_dir)[-1]["step"] == done + 10


def _lighthouse_process(bind: str):
    """`dist-train lighthouse` as its own process (killed from outside with kill -9)."""
    import subprocess
    import sys

    from tests.conftest import REPO

    proc = subprocess.Popen([sys.executable, "-m", "dist_train", "lighthouse", "--bind", bind, "--join-timeout-s", "30",
                             "--heartbeat-timeout-s", "2"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    assert line.startswith(f"lighthouse at {bind}"), line
    return proc


@pytest.mark.slow
def test_a_joiner_of_another_shape_is_refused_naming_the_field(tmp_path, lighthouse):
    """Rank r of every replica must hold the same shard: a joiner with another model width
    stops with one line naming model.dim, and the running replica goes on to the end."""
    jobs = jobs_for(tmp_path, lighthouse, 1, 120, ['fault.inject=["slow_exchange:ms=20"]'])
    try:
        a = jobs.start("a")
        wait_for("a training", lambda: _round_with(a, 1, after=1))
        c = jobs.start("c", ["model.dim=32"])
        codes = jobs.wait(timeout=240)
    finally:
        jobs.stop()
    out = c.log.read_text(errors="replace")
    lines = [line for line in out.splitlines() if line.startswith("dist-train: replica c:")]
    assert codes["a"] == 0 and codes["c"] != 0, codes
    assert len(lines) == 1 and "model.dim = 32 here, but the running replicas have 64" in lines[0], out[-2000:]
    assert "Traceback" not in out
    assert records(a.run_dir)[-1]["step"] == 120


def test_heal_plan_picks_one_source_and_heals_the_behind_and_the_apart():
    from dist_train.parallel.elastic import heal_plan

    assert heal_plan([4, 4], [20, 20], [7, 7]) == (0, [])  # in step: nobody heals
    assert heal_plan([0, 4, 4], [0, 20, 20], [0, 7, 7]) == (1, [0])  # a joiner heals from the lowest index
    assert heal_plan([4, 5], [55, 60], [7, 9]) == (1, [0])  # a straggler the last round went without
    assert heal_plan([5, 5, 5], [60, 60, 60], [9, 3, 9]) == (0, [1])  # averaged in another quorum: apart
    assert heal_plan([5, 5], [55, 60], [9, 9]) == (1, [0])  # restarted from an older checkpoint's step
