"""The C4 watcher: poll every rank's state from the store, run the rules, write findings, act.

Where it runs (a detector must not live on one rank that could itself hang): in the
launcher process for `dist-train local` and drills (it hosts the store already and
survives every rank; it can also see a process exit and SIGKILL a stopped one); under
plain torchrun in every rank's side thread, where only the lowest rank with a fresh
heartbeat writes, so any one rank may hang or stop. It also sends the drills' SIGSTOPs
(a stopped process cannot stop itself).
"""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from .rules import find_hangs, find_slow
from .settings import C4Settings
from .wire import C4_EXIT_CODE, RankState, key


class Watcher:
    """Reads every rank's state from the store, runs the rules, writes findings, acts.

    `writer_rank`: None in the launcher (always writes); a rank number when it
    runs in a rank's side thread (writes only if it is the lowest fresh rank).
    `kill_local`: SIGKILL a hung culprit's process if it runs on this host.
    """

    def __init__(self, store, world: int, writer_rank: int | None = None, kill_local: bool = True,
                 log: Callable[[str], None] | None = None, sigstops: list | None = None):
        self.store, self.world, self.writer_rank = store, world, writer_rank
        self.kill_local = kill_local
        self.log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        self.host = socket.gethostname()
        self.attempt = -1
        self.sigstops = list(sigstops or [])  # (run_dir or None, Injection): sent from here
        self._rngs: dict = {}  # sigstop spec -> Random picking its at=random moments
        self._reset()
        self.pids: dict = {}  # pid -> (attempt, rank, run) of every rank seen
        self._lock = threading.Lock()
        self.findings: list[dict] = []

    def _reset(self) -> None:
        self.hb: dict = {}  # rank -> ((hb, pid), monotonic time it was first seen)
        self.reported: set = set()
        self.acted = False
        self.states: dict = {}

    # --- reading ----------------------------------------------------------
    def _read(self) -> dict:
        try:
            if not self.store.check([key("attempt")]):
                return {}
            attempt = int(self.store.get(key("attempt")))
        except Exception:
            return {}
        if attempt != self.attempt:
            self.attempt = attempt
            self._reset()
        keys = [key(f"a{attempt}", f"r{r}") for r in range(self.world)]
        if self.store.check(keys):
            raw = self.store.multi_get(keys)
        else:
            raw = [self.store.get(k) if self.store.check([k]) else None for k in keys]
        return {r: RankState.from_json(json.loads(v)) for r, v in enumerate(raw) if v}

    def poll(self) -> list[dict]:
        """One round: read, detect, write and act; returns new findings."""
        now, wall = time.monotonic(), time.time()
        states = self._read()
        if not states:
            return []
        stale = {}
        for r, s in states.items():
            last_hb, moved_at = self.hb.get(r, (None, now))
            if last_hb != (s.hb, s.pid):
                self.hb[r] = ((s.hb, s.pid), now)
                moved_at = now
            stale[r] = now - moved_at
            self.pids[s.pid] = (self.attempt, r, s.run)
            _advance(s, stale[r])
        self.states = states
        self._sigstop(states)
        new = []
        for s in states.values():
            for ev in s.health:
                ev = dict(ev)
                new += self._emit({"kind": ev.pop("kind"), "ranks": [s.rank], "group": None, "evidence": ev,
                                   "since_onset_s": 0.0, "run": s.run}, states, wall,
                                  dedupe=("health", s.rank, ev.get("id")))
        if self.acted or len(states) < self.world or any(s.phase == "done" for s in states.values()):
            return new
        st = C4Settings.from_dict(states[min(states)].cfg)
        if all(age > st.stale_s for age in stale.values()):
            return new  # the whole attempt is gone (the launcher is restarting it): nothing to compare
        runs = {s.run for s in states.values()}
        if len(runs) != 1:
            return new
        if not self._i_write(states, stale, st):
            return new
        # A rank busy on purpose (writing a checkpoint) keeps its peers waiting legitimately:
        # not a culprit while its heartbeat is fresh (one that stopped is not busy, whatever
        # it last said). Slow-rank windows skip such phases too.
        busy = {r for r, s in states.items() if s.phase != "train" and stale[r] <= st.stale_s}
        hang = find_hangs(states, stale, st)
        if hang is not None and busy & set(hang["ranks"]):
            hang = None
        elif hang is not None:
            found = self._emit(hang, states, wall, dedupe=(hang["kind"], tuple(hang["ranks"])))
            new += found
            if st.act and found:
                self._act(hang, states)
            return new
        if dump := os.environ.get("DIST_TRAIN_C4_DUMP"):  # debugging aid: every state read
            with open(dump, "a") as fh:
                fh.write(json.dumps({"t": wall, "stale": stale, "states": {r: s.to_json() for r, s in states.items()}})
                         + "\n")
        if busy:
            return new
        for f in find_slow(states, st):
            onset = f.pop("onset_wall", None)
            f["since_onset_s"] = round(wall - onset, 2) if onset else None
            f.pop("window", None)
            new += self._emit(f, states, wall, dedupe=(f["kind"], tuple(f["ranks"]), runs.copy().pop()))
        return new

    def _i_write(self, states, stale, st) -> bool:
        if self.writer_rank is None:
            return True
        fresh = [r for r in states if stale[r] <= st.stale_s]
        return bool(fresh) and min(fresh) == self.writer_rank

    def _emit(self, f: dict, states: dict, wall: float, dedupe) -> list[dict]:
        if dedupe is not None:
            if dedupe in self.reported:
                return []
            self.reported.add(dedupe)
            if self.writer_rank is not None:  # several ranks may detect: the store decides
                if self.store.add(key(f"a{self.attempt}", "f", "-".join(map(str, dedupe))), 1) != 1:
                    return []
        first = states.get(f["ranks"][0]) if f["ranks"] else None
        run = f.pop("run", None)
        if not run:
            src = first or next(iter(states.values()), None)
            run = src.run if src else None
        step = f.pop("step", None)
        if step is None:
            step = max((s.step for s in states.values()), default=0)
        out = {"kind": f["kind"], "ranks": f["ranks"], "host": first.host if first else None,
               "group": f.get("group"), "step": step, "attempt": self.attempt,
               "since_onset_s": round(f["since_onset_s"], 2) if f.get("since_onset_s") is not None else None,
               "time": wall, "why": f.get("why"), "evidence": f.get("evidence")}
        if first is not None:
            out["pids"] = [states[r].pid for r in f["ranks"] if r in states]
        if out["kind"] == "slow_link" and run:
            out["link_class"] = link_class(run, out["ranks"])
        with self._lock:
            self.findings.append(out)
        if run:
            d = Path(run) / "c4"
            d.mkdir(parents=True, exist_ok=True)
            with open(d / "findings.jsonl", "a") as fh:
                fh.write(json.dumps(out) + "\n")
            try:
                self.store.add(key("count", run), 1)
            except Exception:
                pass
        what = {"hang": "hang", "non_comm_hang": "non-communication hang", "slow_rank": "slow rank",
                "slow_link": "slow link", "crash": "crash"}.get(out["kind"], out["kind"])
        cls = f", {out['link_class']} link" if out.get("link_class") else ""
        self.log(f"C4: {what}: rank(s) {out['ranks']} on {out['host']} (group {out['group']}{cls}, step {step}, "
                 f"{out['since_onset_s']} s after onset): {out['why']}")
        return [out]

    def _act(self, f: dict, states: dict) -> None:
        """Stop the job: every live rank exits (code 75) so the launcher restarts it from the
        latest checkpoint; a culprit on this host is SIGKILLed (a stopped process cannot exit)."""
        self.acted = True
        msg = (f"C4 detected a {f['kind']} in group {f.get('group')}: culprit rank(s) {f['ranks']}; "
               "stopping the job so it restarts from the latest checkpoint")
        self.log(f"C4: {msg}")
        try:
            self.store.set(key(f"a{self.attempt}", "stop"), msg)
        except Exception:
            pass
        if self.kill_local:
            for r in f["ranks"]:
                s = states.get(r)
                if s and s.host == self.host and s.pid != os.getpid():
                    try:
                        os.kill(s.pid, signal.SIGKILL)
                    except OSError:
                        pass

    def _sigstop(self, states: dict) -> None:
        """Drill faults that need an outside hand: SIGSTOP a rank once it reports a step; with
        at=random a random fraction U(0, 1) of its recent median step time later, from a timer
        so polling goes on (the moment then falls anywhere inside a step)."""
        for item in list(self.sigstops):
            run, inj = item
            s = states.get(inj.rank)
            if s is None or s.phase != "train" or (run and s.run != str(run)):
                continue
            if s.step >= inj.step and s.host == self.host:
                self.sigstops.remove(item)
                if inj.at != "random":
                    self._send_sigstop(inj, s)
                    continue
                rng = self._rngs.setdefault(inj.text, random.Random(inj.seed * 100003 + inj.rank))
                u = rng.random()
                delay = u * s.step_s
                note = {"after_s": round(delay, 4), "of_step_s": round(s.step_s, 4), "reported_step": s.step}
                timer = threading.Timer(delay, self._send_sigstop, (inj, s, note))
                timer.daemon = True
                timer.start()

    def _send_sigstop(self, inj, s: RankState, note: dict | None = None) -> None:
        """Stop the rank's process, unless it is no longer the one scheduled (a restart, a
        later run of a sweep); log the moment to the run's injections.jsonl."""
        now = self.states.get(inj.rank)
        if note is not None and (now is None or now.pid != s.pid or now.run != s.run):
            self.log(f"fault injection: SIGSTOP of rank {inj.rank} dropped (its process or run changed)")
            return
        try:
            os.kill(s.pid, signal.SIGSTOP)
        except OSError as e:
            self.log(f"fault injection: SIGSTOP of rank {inj.rank} (pid {s.pid}) failed: {e}")
            return
        step = (now or s).step
        extra = f" ({note['after_s']:.3f} s after it reported step {note['reported_step']})" if note else ""
        self.log(f"fault injection: SIGSTOP sent to rank {inj.rank} (pid {s.pid}) at step {step}{extra}")
        d = Path(s.run) / "c4"
        d.mkdir(parents=True, exist_ok=True)
        with open(d / "injections.jsonl", "a") as fh:
            fh.write(json.dumps({"time": time.time(), "rank": inj.rank, "step": step, "spec": inj.text,
                                 "event": "fired", **(note or {})}) + "\n")

    def note_exit(self, pid: int, exitcode) -> None:
        """The launcher saw a worker process fail (not one this detector stopped)."""
        info = self.pids.get(pid)
        if info is None or self.acted or exitcode == C4_EXIT_CODE:
            return
        attempt, r, run = info
        s = self.states.get(r)
        self._emit({"kind": "crash", "ranks": [r], "group": None, "since_onset_s": None, "run": run,
                    "step": s.step if s else None, "evidence": {"exitcode": exitcode, "pid": pid},
                    "why": f"the process exited with code {exitcode}"},
                   self.states, time.time(), dedupe=("crash", r, attempt))
        self.acted = True  # the agent restarts this attempt: its dying ranks are not findings

    def run(self, stop: threading.Event, interval: float = 0.2) -> None:
        while not stop.is_set():
            try:
                self.poll()
            except Exception as e:  # the detector must never take the launcher down
                self.log(f"C4: detector error (continuing): {type(e).__name__}: {e}")
            stop.wait(interval)


def link_class(run_dir, ranks) -> str | None:
    """The link class (intra_node, intra_cluster, inter_cluster) joining `ranks`, from the
    run's placement.json (written when the run has a [topology]); None without one."""
    try:
        info = {r["rank"]: r for r in json.loads((Path(run_dir) / "placement.json").read_text())["ranks"]}
        clusters = {info[r]["cluster"] for r in ranks}
        nodes = {info[r]["node"] for r in ranks}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return "inter_cluster" if len(clusters) > 1 else "intra_cluster" if len(nodes) > 1 else "intra_node"


def _advance(s: RankState, extra: float) -> None:
    """Ages in a state were measured when it was published: add the time since."""
    for g in s.groups.values():
        if g.pending:
            g.pending.seconds += extra
        for link in g.peers.values():
            if link.pending:
                link.pending.seconds += extra
