"""Per-rank C4 side: publish this rank's collective state to the job's store from a daemon thread.

Why a side thread and the launcher's store: a hung rank cannot report its own hang
from the training thread, and a store hosted by a rank dies with it. Gloo waits
(and DTensor's wait_tensor) release the GIL, so the thread keeps publishing while
the training thread is blocked in a collective (tested); the store is the
elastic agent's (launcher-hosted) one, which outlives every rank. The thread
never issues collectives itself (a side thread waiting on gloo hung pipelining).

`Monitor` is what the trainer holds: `step_begin`/`step_end` on the training
thread (a few dict operations per group per step), `busy(what)` around phases
where peers legitimately wait for one rank (checkpoint writes), `close()`. The
thread also watches for the detector's stop key and exits the process with
`C4_EXIT_CODE` so the launcher restarts the job from its latest checkpoint.
"""
from __future__ import annotations

import collections
import contextlib
import json
import os
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from .inject import FaultInjector, parse_specs
from .recorder import CollectiveRecorder, _now
from .settings import C4Settings
from .watcher import Watcher
from .wire import C4_EXIT_CODE, GroupSnapshot, PeerLink, PeerStep, PendingOp, RankState, StepTime, StepWait, key


def _pct(values: list, q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


class Monitor:
    """C4 on one rank: fault injection hooks, per-step waits, the publisher thread.

    `publish=False` (C4 off, faults on) still injects faults but starts no thread.
    `detect_here`: also run the detector in this rank's thread (torchrun without a
    launcher-side detector); only the lowest rank with a fresh heartbeat writes.
    """

    def __init__(self, recorder: CollectiveRecorder, store, *, rank: int, world: int, attempt: int,
                 run_dir: str, settings: C4Settings, injections=(), publish: bool = True,
                 detect_here: bool = False, health=None, log: Callable[[str], None] | None = None,
                 exit_fn: Callable[[int], None] = os._exit):
        self.recorder, self.store, self.rank, self.world = recorder, store, rank, world
        self.attempt, self.run_dir, self.settings = attempt, str(run_dir), settings
        self.log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        self._exit = exit_fn
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.phase, self.step, self.start = "train", 0, 0
        self.findings_count = 0
        W = settings.slow_window + settings.warmup_steps + 4
        self._steps: collections.deque = collections.deque(maxlen=W)  # StepTime
        self._waits: dict = {}  # GroupState -> deque of StepWait
        self._prev: dict = {}  # GroupState -> (wait_ns, seq) at the last step end
        self._p2p: dict = {}  # GroupState -> {peer: deque of PeerStep}
        self._p2p_prev: dict = {}  # GroupState -> {peer: (p2p wait ns, ops) at the last step end}
        self._W = W
        self._hb = 0
        self._held: dict = {}  # record -> first seen not entered (monotonic s)
        self._trace_prev: dict = {}
        self._health_events: list = []
        self._health = health
        self._stop = threading.Event()
        c4dir = Path(run_dir) / "c4"
        c4dir.mkdir(parents=True, exist_ok=True)
        self._inj_path = c4dir / "injections.jsonl"
        self.injector = FaultInjector(parse_specs(injections), rank, once=self._once, log=self._log_injection,
                                      exit_fn=exit_fn)
        if self.injector:
            recorder.hooks.append(self.injector.hook)
        self._thread = None
        if publish and store is not None:
            self._trace = open(c4dir / f"trace-rank{rank}.jsonl", "a")
            self.watcher = Watcher(store, world, writer_rank=rank, log=self.log) if detect_here else None
            self._bump_attempt()
            self._publish()
            self._thread = threading.Thread(target=self._loop, name="c4-publisher", daemon=True)
            self._thread.start()

    # --- training thread --------------------------------------------------
    def step_begin(self, step: int) -> None:
        self.step = step
        if not self.start:
            self.start = step - 1
        self.injector.on_step(step)

    def step_end(self, step: int, step_time: float) -> None:
        self.injector.on_step_end(step_time)
        if self._thread is None:
            return
        total = 0.0
        for st in self.recorder.groups():
            if len(st.ranks) < 2:
                continue
            prev_ns, prev_seq = self._prev.get(st, (0, 0))
            w, n = (st.wait_ns - prev_ns) / 1e9, st.seq - prev_seq
            self._prev[st] = (st.wait_ns, st.seq)
            total += w
            if st.p2p_min_ns:  # p2p waits count too: a rank late because it waited for a stage is not slow
                total += self._p2p_step(st, step)
            if not n:
                continue  # idle this step (e.g. a group of an earlier run of a sweep)
            q = self._waits.get(st)
            if q is None:
                q = self._waits[st] = collections.deque(maxlen=self._W)
            q.append(StepWait(step, round(w, 6), n))
        self._steps.append(StepTime(step, round(step_time, 6), time.time(), round(total, 6)))

    def _p2p_step(self, st, step: int) -> float:
        """Per peer: this step's shortest p2p op and total p2p wait (slow-link evidence);
        returns the step's p2p wait in seconds."""
        peers = self._p2p.setdefault(st, {})
        prev = self._p2p_prev.setdefault(st, {})
        waited = 0
        for peer, d in st.p2p_min_ns.items():
            total, ops = st.p2p_wait_ns.get(peer, 0), st.p2p_seq.get(peer, 0)
            total0, ops0 = prev.get(peer, (0, 0))
            q = peers.setdefault(peer, collections.deque(maxlen=self._W))
            q.append(PeerStep(step, round(d / 1e9, 6), round((total - total0) / 1e9, 6), ops - ops0))
            prev[peer] = (total, ops)
            waited += total - total0
        st.p2p_min_ns.clear()
        return waited / 1e9

    @contextlib.contextmanager
    def busy(self, what: str):
        """Peers may wait on this rank for a while here (e.g. a checkpoint write): not a hang."""
        old, self.phase = self.phase, f"busy:{what}"
        try:
            yield
        finally:
            self.phase = old

    def close(self) -> None:
        if self.injector.hook in self.recorder.hooks:
            self.recorder.hooks.remove(self.injector.hook)
        if self._thread is not None:
            self.phase = "done"
            self._stop.set()
            self._thread.join(timeout=5)
            try:
                self._publish()
            except Exception:
                pass
            self._trace.close()

    # --- fault injection plumbing -------------------------------------------
    def _once(self, spec: str) -> bool:
        if self.store is None:
            return True
        return self.store.add(key("once", self.run_dir, spec), 1) == 1

    def _log_injection(self, entry: dict) -> None:
        with open(self._inj_path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    # --- side thread -------------------------------------------------------
    def _bump_attempt(self) -> None:
        k = key("attempt")
        cur = self.store.get(k).decode() if self.store.check([k]) else None
        if cur is None or int(cur) < self.attempt:
            self.store.set(k, str(self.attempt))

    def state(self) -> RankState:
        """This rank's compact state (what the watcher reads)."""
        now = _now()
        nows = time.monotonic()
        groups = {}
        trace = {}
        held = {}
        max_wait = 0.0
        for st in self.recorder.groups():
            if len(st.ranks) < 2:
                continue
            last = st.last_completed
            done = last.seq if last is not None else 0
            pend = None
            p2p: dict = {}
            for rec in st.pending.copy():
                if rec.background and rec.t_enter and not rec.t_wait:
                    continue  # issued on purpose to be waited later (deferred metrics): blocks no one yet
                if rec.kind == "send_recv":
                    peer = rec.peers[0] if rec.op.startswith("recv") else rec.peers[1]
                    pl = st.p2p_last.get(peer)
                    if rec.seq > (pl.seq if pl else 0) and (peer not in p2p or rec.seq < p2p[peer].seq):
                        p2p[peer] = rec
                elif rec.seq > done and (pend is None or rec.seq < pend.seq):
                    pend = rec
            durs = list(st.durations)
            g = GroupSnapshot(
                st.name, list(st.ranks), st.seq, done, op=last.op if last is not None else None,
                pending=self._pend(pend, now, nows, held),
                d50=round(statistics.median(durs) / 1e9, 6) if durs else 0.0, d90=round(_pct(durs, 0.9) / 1e9, 6),
                waits=list(self._waits.get(st, ())))
            if st in self._p2p:
                g.peer_steps = {peer: list(q) for peer, q in list(self._p2p[st].items())}
            if st.p2p_last or p2p:
                g.peers = {peer: PeerLink(st.p2p_last[peer].seq if peer in st.p2p_last else 0,
                                          self._pend(p2p.get(peer), now, nows, held))
                           for peer in set(st.p2p_last) | set(p2p)}
            if g.pending:
                max_wait = max(max_wait, g.pending.seconds)
            groups[st.gid] = g
            n_prev, w_prev = self._trace_prev.get(st, (0, 0))
            n = done - n_prev
            if n > 0:
                k = min(n, len(durs))
                trace[st.name] = {"ops": n, "wait_ms": round((st.wait_ns - w_prev) / n / 1e6, 3),
                                  "max_ms": round(max(durs[-k:]) / 1e6, 3) if k else 0.0}
            self._trace_prev[st] = (done, st.wait_ns)
        self._held = held
        steps = list(self._steps)
        self._hb += 1
        self._trace_line = {"t": round(time.time(), 3), "step": self.step, "g": trace, "wait": round(max_wait, 3)}
        return RankState(self.rank, self.host, self.pid, self.run_dir, self._hb, self.phase, self.step, self.start,
                         statistics.median(e.step_s for e in steps[-8:]) if steps else 0.0, steps, groups,
                         cfg=self.settings.as_dict(), health=self._health_events, attempt=self.attempt,
                         time=time.time())

    def _pend(self, rec, now: int, nows: float, held: dict) -> PendingOp | None:
        """The op's seconds: blocked in wait(), inside the call (entered, not waiting), or
        held before entering (since first seen)."""
        if rec is None:
            return None
        if rec.t_enter:
            since = rec.t_wait or rec.t_enter
            return PendingOp(rec.seq, rec.op, True, bool(rec.t_wait), round((now - since) / 1e9, 4))
        held[rec] = first = self._held.get(rec, nows)
        return PendingOp(rec.seq, rec.op, False, False, round(nows - first, 4))

    def _publish(self) -> None:
        s = self.state().to_json()
        self.store.set(key(f"a{self.attempt}", f"r{self.rank}"), json.dumps(s, separators=(",", ":")))
        line = self._trace_line
        if line["g"] or line["wait"] > self.settings.interval_s:
            self._trace.write(json.dumps(line, separators=(",", ":")) + "\n")
            self._trace.flush()

    def _loop(self) -> None:
        stop_key = key(f"a{self.attempt}", "stop")
        count_key = key("count", self.run_dir)
        next_health = 0.0
        while not self._stop.wait(self.settings.interval_s):
            try:
                if self._health is not None and time.monotonic() >= next_health:
                    next_health = time.monotonic() + 5.0
                    self._health_events = (self._health_events + self._health.poll())[-8:]
                self._publish()
                if self.store.check([stop_key]):
                    msg = self.store.get(stop_key).decode()
                    self.log(f"C4: rank {self.rank} stopping: {msg}")
                    self._exit(C4_EXIT_CODE)
                    return
                self.findings_count = self.store.add(count_key, 0)
                if self.watcher is not None:
                    self.watcher.poll()
            except Exception as e:  # a broken store must not kill training
                if self._stop.is_set():
                    return
                self.log(f"C4: rank {self.rank} publisher error (retrying): {type(e).__name__}: {e}")
                self._stop.wait(1.0)
