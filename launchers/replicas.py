"""Elastic DiLoCo replicas on one machine: a lighthouse and R replica jobs.

`dist-train lighthouse` runs torchft's Lighthouse, the coordinator that forms each outer
step's quorum from the replicas' heartbeats. `dist-train local --nproc K --replicas R`
starts one here and R replica jobs of K ranks each, every one its own `dist-train local`
process in its own session (as separate jobs on separate machines would be), writing to
`<run.dir>/<run.name>/replica-<id>/`. `ReplicaJobs` is their handle: start, wait, and kill
one replica's whole process tree (its launcher, agent and workers) from outside, which
the drills and tests use.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from dist_train.errors import UserError


def start_lighthouse(bind: str = "127.0.0.1:0", min_replicas: int = 1, join_timeout_s: float = 60.0,
                     heartbeat_timeout_s: float = 5.0):
    """torchft's LighthouseServer bound to HOST:PORT (port 0: any free one); `.address()`
    is its URL, `.shutdown()` stops it."""
    try:
        from torchft._torchft import LighthouseServer
    except ImportError:
        raise UserError("elastic replicas need torchft: pip install 'dist-train[elastic]'") from None
    host, _, port = bind.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--bind {bind!r}: expected HOST:PORT, e.g. 127.0.0.1:29510")
    try:
        return LighthouseServer(bind=f"{host}:{port}", min_replicas=min_replicas,
                                join_timeout_ms=int(join_timeout_s * 1000),
                                heartbeat_timeout_ms=int(heartbeat_timeout_s * 1000))
    except Exception as e:
        raise UserError(f"--bind {bind}: the lighthouse could not start ({e}); pick a free port") from None


def address(lighthouse, bind: str = "127.0.0.1:0") -> str:
    """host:port to reach a lighthouse: the host it was bound to (its URL names the
    machine's hostname instead), its port."""
    port = lighthouse.address().rstrip("/").rsplit(":", 1)[-1]
    host = bind.rpartition(":")[0]
    return f"{host if host not in ('0.0.0.0', '[::]', '::') else lighthouse.address().split('://')[-1].rsplit(':', 1)[0]}:{port}"


def lighthouse_command(bind: str, min_replicas: int, join_timeout_s: float, heartbeat_timeout_s: float) -> None:
    """`dist-train lighthouse`: run until interrupted."""
    lh = start_lighthouse(bind, min_replicas, join_timeout_s, heartbeat_timeout_s)
    print(f"lighthouse at {address(lh, bind)} (min replicas {min_replicas}); replicas join with "
          f"--set elastic.lighthouse={address(lh, bind)}", flush=True)
    stop = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.append(1))
    try:
        while not stop:
            time.sleep(0.2)
    finally:
        lh.shutdown()


@dataclass
class Replica:
    id: str
    proc: subprocess.Popen
    run_dir: Path
    log: Path
    started: float = field(default_factory=time.monotonic)


class ReplicaJobs:
    """R replica jobs of `nproc` ranks against one lighthouse (module docstring)."""

    def __init__(self, config: str | None, overrides: list[str], nproc: int, lighthouse: str, run_root: Path,
                 logs: Path | None = None):
        self.config, self.overrides, self.nproc, self.lighthouse = config, list(overrides), nproc, lighthouse
        self.run_root, self.logs = Path(run_root), Path(logs or run_root)
        self.replicas: dict[str, Replica] = {}

    def start(self, replica_id: str, extra: list[str] = ()) -> Replica:
        """Start replica `replica_id` as its own job (its own session); its output goes to
        `<logs>/replica-<id>.log`."""
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"replica-{replica_id}.log"
        cmd = [sys.executable, "-m", "dist_train", "local", "--nproc", str(self.nproc)]
        if self.config:
            cmd.append(self.config)
        for o in [*self.overrides, f"elastic.lighthouse={self.lighthouse}", f"elastic.replica_id={replica_id}", *extra]:
            cmd += ["--set", o]
        with open(log, "ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        r = Replica(replica_id, proc, self.run_root / f"replica-{replica_id}", log)
        self.replicas[replica_id] = r
        return r

    def kill(self, replica_id: str) -> int:
        """kill -9 every process of a replica: its launcher's session, which holds its agent,
        the fork server and the ranks forked from it (launchers/rank_server.py). Returns how
        many were killed."""
        r = self.replicas[replica_id]
        pids = {int(p) for p in os.popen(f"pgrep -s {r.proc.pid}").read().split()} | {r.proc.pid}
        killed = 0
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except OSError:
                pass
        r.proc.wait()
        return killed

    def wait(self, timeout: float | None = None) -> dict[str, int]:
        """Wait for every replica still running; their exit codes."""
        deadline = None if timeout is None else time.monotonic() + timeout
        codes = {}
        for rid, r in self.replicas.items():
            left = None if deadline is None else max(0.1, deadline - time.monotonic())
            try:
                codes[rid] = r.proc.wait(timeout=left)
            except subprocess.TimeoutExpired:
                codes[rid] = None
        return codes

    def stop(self) -> None:
        for rid, r in self.replicas.items():
            if r.proc.poll() is None:
                self.kill(rid)


def local_replicas(config: str | None, overrides: list[str], nproc: int, replicas: int, run_root: Path,
                   min_replicas: int = 1, join_timeout_s: float = 60.0) -> dict[str, int]:
    """`dist-train local --nproc K --replicas R`: a lighthouse and R replica jobs here; waits
    for all and returns their exit codes."""
    lh = start_lighthouse("127.0.0.1:0", min_replicas, join_timeout_s)
    jobs = ReplicaJobs(config, overrides, nproc, address(lh), run_root)
    print(f"lighthouse at {address(lh)}; {replicas} replica job(s) of {nproc} rank(s), logs in {run_root}/", flush=True)
    try:
        for i in range(replicas):
            jobs.start(chr(ord("a") + i) if replicas <= 26 else f"r{i}")
        codes = jobs.wait()
    finally:
        jobs.stop()
        lh.shutdown()
    bad = {k: v for k, v in codes.items() if v}
    if bad:
        raise UserError(f"replica(s) {', '.join(bad)} failed (exit codes {bad}); see their logs in {run_root}/")
    return codes


# ----------------------------------------------------------------------------- drills


def read_records(run_dir: Path) -> list[dict]:
    """A replica's metrics.jsonl (what it has written so far)."""
    import json

    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def rounds(replica: Replica, n: int | None = None) -> list[int]:
    """Steps at which the replica began an outer round (with n replicas, if given), from its log."""
    import re

    text = replica.log.read_text(errors="replace") if replica.log.exists() else ""
    count = str(n) if n is not None else r"\d+"
    pattern = r"step (\d+): outer round with " + count + " replica"
    return [int(m.group(1)) for m in re.finditer(pattern, text)]


def lighthouse_process(bind: str, join_timeout_s: float = 30.0, heartbeat_timeout_s: float = 2.0) -> subprocess.Popen:
    """`dist-train lighthouse` as a process of its own (a drill kills it with kill -9)."""
    proc = subprocess.Popen([sys.executable, "-m", "dist_train", "lighthouse", "--bind", bind, "--join-timeout-s",
                             str(join_timeout_s), "--heartbeat-timeout-s", str(heartbeat_timeout_s)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    line = proc.stdout.readline()
    if not line.startswith("lighthouse at"):
        proc.kill()
        raise UserError(f"the lighthouse did not start on {bind}: {line.strip() or 'no output'}")
    return proc


def replica_drill(config: str | None, overrides: list[str], nproc: int, replicas: int, spec: str, root: Path,
                  quorum_timeout_s: float, timeout_s: float = 600.0) -> dict:
    """One elastic drill: a lighthouse process, `replicas` replica jobs, the fault applied
    from outside when its step is reached; returns what was expected and what happened."""
    import random
    import socket

    from dist_train.fault.inject import parse_spec

    inj = parse_spec(spec)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        bind = f"127.0.0.1:{s.getsockname()[1]}"
    lh = lighthouse_process(bind)
    jobs = ReplicaJobs(config, [*overrides, f"elastic.quorum_timeout_s={quorum_timeout_s}"], nproc, bind, root,
                       logs=root / "logs")
    ids = [chr(ord("a") + i) for i in range(replicas)]
    for rid in ids:
        jobs.start(rid)
    t0, acted, joiner, victim, stopped = time.monotonic(), None, None, None, None

    def reached(step: int):
        live = [r for r in jobs.replicas.values() if r.proc.poll() is None]
        return next((r for r in live if any(x["step"] >= step for x in read_records(r.run_dir)[-1:])), None)

    try:
        while time.monotonic() - t0 < timeout_s and any(r.proc.poll() is None for r in jobs.replicas.values()):
            time.sleep(0.1)
            if acted is None and (inj.kind != "replica_kill" or jobs.replicas[inj.id].proc.poll() is None):
                who = jobs.replicas.get(inj.id) if inj.kind == "replica_kill" else reached(inj.step)
                if who is None or not read_records(who.run_dir) or read_records(who.run_dir)[-1]["step"] < inj.step:
                    continue
                time.sleep(random.uniform(0, 0.3))  # anywhere inside the step
                acted = time.monotonic()
                if inj.kind == "replica_kill":
                    jobs.kill(inj.id)
                elif inj.kind in ("replica_join", "replica_kill_during_heal"):
                    joiner = jobs.start(inj.id)
                elif inj.kind == "lighthouse_kill":
                    os.kill(lh.pid, signal.SIGKILL)
                    stopped = time.monotonic()
            if inj.kind == "replica_kill_during_heal" and joiner is not None and victim is None:
                src = next((r for r in jobs.replicas.values() if r is not joiner and r.proc.poll() is None
                            and "sending its outer state" in r.log.read_text(errors="replace")), None)
                if src is not None:
                    victim = src.id
                    jobs.kill(src.id)
        codes = jobs.wait(timeout=max(1.0, timeout_s - (time.monotonic() - t0)))
        ended = time.monotonic()
    finally:
        jobs.stop()
        if lh.poll() is None:
            lh.kill()
    return _judge(inj, jobs, codes, victim, joiner, stopped, ended, quorum_timeout_s)


def _judge(inj, jobs: ReplicaJobs, codes: dict, victim, joiner, stopped, ended, quorum_timeout_s) -> dict:
    """Expected against observed for one replica drill."""
    recs = {rid: read_records(r.run_dir) for rid, r in jobs.replicas.items()}
    consecutive = {rid: [x["step"] for x in rs] == list(range(rs[0]["step"], rs[0]["step"] + len(rs))) if rs else False
                   for rid, rs in recs.items()}
    gone = {inj.id} if inj.kind == "replica_kill" else ({victim} if victim else set())
    survivors = [rid for rid in jobs.replicas if rid not in gone]
    out = {"spec": inj.text, "exit_codes": codes}
    if inj.kind == "lighthouse_kill":
        lines = {rid: [ln for ln in r.log.read_text(errors="replace").splitlines()
                       if ln.startswith(f"dist-train: replica {rid}:")] for rid, r in jobs.replicas.items()}
        out["expected"] = f"every replica stops with one line within quorum_timeout + 5 = {quorum_timeout_s + 5:g} s"
        took = None if stopped is None else ended - stopped
        out["observed"] = ("the lighthouse was never killed (the replicas ended first)" if took is None else
                           f"stopped {took:.1f} s after the kill; lines per replica " +
                           ", ".join(f"{k}: {len(v)}" for k, v in lines.items()))
        out["correct"] = took is not None and took <= quorum_timeout_s + 5 and all(
            c not in (0, None) for c in codes.values()) and all(len(v) == 1 for v in lines.values())
        return out
    ok = all(codes.get(rid) == 0 and consecutive[rid] for rid in survivors)
    if inj.kind == "replica_kill":
        drops = any(x["replicas"] < len(jobs.replicas) for rid in survivors for x in recs[rid])
        out["expected"] = f"the others go on (replicas drop, every step once), {inj.id} gone"
        out["observed"] = f"survivors {survivors} exit {[codes.get(r) for r in survivors]}, steps consecutive " \
                          f"{[consecutive[r] for r in survivors]}, replicas dropped: {drops}"
        out["correct"] = ok and drops
    else:
        first = recs.get(inj.id, [{}])[0] if recs.get(inj.id) else {}
        healed = first.get("healed_from")
        out["expected"] = ("the joiner heals from a live replica" + (" other than the one killed during the transfer"
                                                                    if inj.kind == "replica_kill_during_heal" else ""))
        out["observed"] = f"{inj.id} healed from {healed} at step {first.get('step')}" + \
            (f"; {victim} killed while sending" if victim else "")
        out["correct"] = ok and healed is not None and healed not in gone
    return out
