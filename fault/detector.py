"""The C4 detector: compare the ranks' published collective state, name hung or slow ranks and links.

After C4 (Dong et al., "Boosting Large-scale Parallel Training Efficiency with C4:
A Communication-Driven Approach", Alibaba, 2024): collective communication in
parallel training is periodic and homogeneous across ranks, so a rank or link
that breaks the pattern points at faulty hardware. C4 tells apart a
communication hang (every member entered a collective that never completes), a
non-communication hang (members wait in a collective that one rank never
entered), a slow rank and a slow link; it localises the culprit within seconds,
then the job is stopped and restarted from a checkpoint.

Inputs are the states `fault.publisher` writes (one JSON per rank, refreshed
every ~0.2 s). Rules, every threshold relative to the job's own timing:
- waiting: a rank is blocked in an op (entered, inside `wait()`) for longer than
  T = max(hang_min_s, hang_factor x the group's recent p90 op duration,
  hang_steps x the median step time; startup_s until every rank has finished the
  run's first step). Each blocked rank waits for the members
  that did not enter that op (collective: same group sequence number; p2p: the
  matching op on the peer). The ranks waited on that wait for nobody are the
  culprits of a non_comm_hang (of a hang if each is stuck inside a call of its
  own, such as a pipeline recv whose sender's send already completed); with no one
  missing it is a hang, named by the members that entered but never reached
  `wait()` (stuck inside the call) or, failing that, the whole group. A member whose heartbeat is stale (a stopped
  or dead process) is named as a non_comm_hang in either case.
- slow_rank: over the last `slow_window` steps, per group, the rank that waits
  least (arrives last) is the same one in >= slow_consistency of the steps, the
  others wait for it by >= slow_ratio of the step time, and it does not itself
  wait much anywhere (so ranks that are late only because they waited on the
  slow one elsewhere are not named: over all its groups it must wait less than
  its peers by at least half that gap).
- slow_link: among sibling groups (same mesh dim and collectives per step), a
  two-rank group whose ops take link_factor x longer after both arrived (the
  per-step minimum wait over its members) than its siblings', by >= link_ratio
  of the step time. Point-to-point pairs (pipeline stages): the shortest op of
  each step between the pair, on both ends, is link_factor x its sibling pairs'
  (a healthy link always has an op whose data is already there; a slow rank does
  not change that, a slow link does), adding >= link_ratio of the step time.

Where it runs (a detector must not live on one rank that could itself hang):
in the launcher process for `dist-train local` and drills (it hosts the store
already and survives every rank; it can also see a process exit and SIGKILL a
stopped one); under plain torchrun in every rank's side thread, where only the
lowest rank with a fresh heartbeat writes, so any one rank may hang or stop.
"""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, NamedTuple

from .wire import C4_EXIT_CODE, PendingOp, RankState, key


@dataclass
class C4Settings:
    """Detector thresholds (the `[c4]` config section passes these through)."""
    interval_s: float = 0.2
    stale_s: float = 1.5
    hang_min_s: float = 1.5
    hang_factor: float = 10.0
    hang_steps: float = 3.0
    startup_s: float = 30.0
    slow_window: int = 5
    slow_consistency: float = 0.8
    slow_ratio: float = 0.3
    link_factor: float = 2.0
    link_ratio: float = 0.1
    warmup_steps: int = 2
    act: bool = True
    detector: str = "auto"

    @classmethod
    def from_dict(cls, d: dict | None) -> "C4Settings":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (d or {}).items() if k in names})

    def as_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- rules


class Wait(NamedTuple):
    """A rank sitting in wait() for one op, and the members it waits for."""
    rank: int
    gid: str
    group: str  # the group's name
    op: str
    seq: int
    waited_s: float
    missing: list  # members that have not entered the op
    members: list


def _in_wait(p: PendingOp | None) -> bool:
    return p is not None and p.entered and p.waiting


def _in_call(p: PendingOp | None) -> bool:
    """Entered the op but not (yet) in wait(): inside the call itself."""
    return p is not None and p.entered and not p.waiting


def _group_threshold(states: dict, gid: str, st: C4Settings) -> float:
    d90 = max((s.groups[gid].d90 for s in states.values() if gid in s.groups), default=0.0)
    step = statistics.median([s.step_s for s in states.values()] or [0.0])
    T = max(st.hang_min_s, st.hang_factor * d90, st.hang_steps * step)
    if any(not s.steps for s in states.values()):  # a run's first step: no timing yet,
        T = max(T, st.startup_s)  # and lazy initialisation makes ranks arrive far apart
    return T


def _reached(done: int, pending: PendingOp | None, seq: int) -> bool:
    """Op `seq` completed, or is the pending op and entered."""
    return done >= seq or bool(pending and pending.seq == seq and pending.entered)


def _entered(s: RankState, gid: str, seq: int) -> bool:
    g = s.groups.get(gid)
    return g is not None and _reached(g.done, g.pending, seq)


def _entered_p2p(s: RankState, gid: str, peer: int, seq: int) -> bool:
    g = s.groups.get(gid)
    link = g.peers.get(peer) if g is not None else None
    return link is not None and _reached(link.done, link.pending, seq)


def find_hangs(states: dict, stale: dict, st: C4Settings) -> dict | None:
    """One hang finding (dict without time fields) or None. `states`: rank -> RankState
    with ages already advanced to now; `stale`: rank -> seconds since its heartbeat moved."""
    waits = []  # every op a rank sits in wait() for
    blocked = []  # ... those waiting longer than their group's threshold: a hang is under way
    for r, s in states.items():
        for gid, g in s.groups.items():
            T = _group_threshold(states, gid, st)
            p = g.pending
            if _in_wait(p):
                members = g.ranks
                missing = [m for m in members if m != r and m in states and not _entered(states[m], gid, p.seq)]
                waits.append(Wait(r, gid, g.name, p.op, p.seq, p.seconds, missing, members))
                if p.seconds > T:
                    blocked.append(waits[-1])
            for peer, link in g.peers.items():
                p = link.pending
                if _in_wait(p):
                    missing = [] if peer not in states or _entered_p2p(states[peer], gid, r, p.seq) else [peer]
                    waits.append(Wait(r, gid, g.name, p.op, p.seq, p.seconds, missing, [r, peer]))
                    if p.seconds > T:
                        blocked.append(waits[-1])
    if not blocked:
        return None
    waiters = {b.rank for b in blocked}
    waited_on = _waited_on(blocked, waits)
    dead = sorted(r for r, age in stale.items() if age > st.stale_s and (r in waited_on or any(
        r in b.members for b in blocked)))
    sinks = sorted(waited_on - {w.rank for w in waits})
    chain = blocked + [w for w in waits if w.rank in waited_on and w not in blocked]
    evidence = {"waiting": {str(b.rank): {"group": b.group, "op": b.op, "seq": b.seq, "waited_s": round(b.waited_s, 2),
                                          "not_entered": b.missing} for b in chain}}
    onset = max(b.waited_s for b in blocked)
    if dead:
        evidence["heartbeat_stale_s"] = {str(r): round(stale[r], 2) for r in dead}
        return {"kind": "non_comm_hang", "ranks": dead, "evidence": evidence, "group": blocked[0].group,
                "since_onset_s": max(onset, max(stale[r] for r in dead)),
                "why": "process not responding (heartbeat stale) while its peers wait for it"}
    if sinks:
        evidence["culprit_state"] = {str(r): _describe(states[r]) for r in sinks}
        # a culprit stuck inside a communication call of its own (a p2p recv whose sender
        # moved on, say) hangs in communication, though its peers wait elsewhere
        waited = {r: min(b.waited_s for b in chain if r in b.missing) for r in sinks}
        inside = [r for r in sinks if _inside_call_s(states[r]) >= 0.5 * waited[r]]
        if inside == sinks:
            evidence["stuck_inside_call"] = inside
            return {"kind": "hang", "ranks": sinks, "evidence": evidence, "group": blocked[0].group,
                    "since_onset_s": onset,
                    "why": "stuck inside a communication call that never returns, while peers wait for it"}
        return {"kind": "non_comm_hang", "ranks": sinks, "evidence": evidence, "group": blocked[0].group,
                "since_onset_s": onset, "why": "peers wait in a collective this rank never entered"}
    full = [b for b in blocked if not b.missing]
    if full:
        b = max(full, key=lambda b: b.waited_s)
        inside = sorted(m for m in b.members if m in states and _stuck_inside(states[m], b.gid, b.seq, b.rank))
        evidence["entered"] = b.members
        evidence["stuck_inside_call"] = inside
        return {"kind": "hang", "ranks": inside or sorted(b.members), "evidence": evidence, "group": b.group,
                "since_onset_s": onset,
                "why": "every member entered the collective and it does not complete"}
    return {"kind": "hang", "ranks": sorted(waiters), "evidence": evidence, "group": blocked[0].group,
            "since_onset_s": onset, "why": "ranks wait for each other in different collectives (a cycle)"}


def _waited_on(blocked: list, waits: list) -> set:
    """The ranks the blocked ones wait for, followed through ranks that are waiting
    themselves (for however short a time: each link of the chain started waiting a little
    later than the one before it)."""
    missing_of: dict = {}
    for w in waits:
        missing_of.setdefault(w.rank, []).extend(w.missing)
    seen: set = set()
    todo = [m for b in blocked for m in b.missing]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += missing_of.get(m, [])
    return seen


def _stuck_inside(s: RankState, gid: str, seq: int, peer_of_p2p: int) -> bool:
    """Entered the op but never reached wait(): stuck inside the call itself."""
    g = s.groups.get(gid)
    if g is None:
        return False
    if _in_call(g.pending) and g.pending.seq == seq:
        return True
    link = g.peers.get(peer_of_p2p)
    return link is not None and _in_call(link.pending)


def _pending_ops(s: RankState):
    """(group name, pending op) for each collective and p2p op a rank has pending."""
    for g in s.groups.values():
        if g.pending:
            yield g.name, g.pending
        for link in g.peers.values():
            if link.pending:
                yield g.name, link.pending


def _inside_call_s(s: RankState) -> float:
    """Longest time the rank has been inside a communication call (entered, no wait() yet)."""
    return max((p.seconds for _, p in _pending_ops(s) if _in_call(p)), default=0.0)


def _describe(s: RankState) -> dict:
    out = {"step": s.step, "phase": s.phase}
    for name, p in _pending_ops(s):
        what = f"{name}#{p.seq} {p.op} for {p.seconds:.2f}s"
        out["waiting_in" if p.waiting else "inside" if p.entered else "held_before"] = what
    if not out.keys() & {"held_before", "inside", "waiting_in"}:
        out["doing"] = "outside any collective (compute or host code)"
    return out


def find_slow(states: dict, st: C4Settings) -> list[dict]:
    """slow_rank and slow_link findings from the per-step waits of the last window."""
    W = st.slow_window
    gids = sorted({gid for s in states.values() for gid in s.groups})
    step_time = {r: {e.step: e for e in s.steps} for r, s in states.items()}
    ranks_out, links, transfer = {}, [], {}
    for gid in gids:
        members = next(s.groups[gid].ranks for s in states.values() if gid in s.groups)
        if len(members) < 2 or any(m not in states or gid not in states[m].groups for m in members):
            continue
        w = {m: {int(e.step): e.wait_s for e in states[m].groups[gid].waits} for m in members}
        nops = statistics.median([e.ops for e in states[members[0]].groups[gid].waits] or [0])
        start = max(states[m].start for m in members) + st.warmup_steps
        common = sorted(set.intersection(*(set(v) for v in w.values())))
        window = [x for x in common if x > start][-W:]
        if len(window) < W:
            continue
        name = states[members[0]].groups[gid].name
        last = [min(members, key=lambda m: w[m][x]) for x in window]
        mins = [w[last[i]][x] for i, x in enumerate(window)]
        transfer[gid] = ((name, nops), members, statistics.median(mins), window)
        for R in set(last):
            idx = [i for i, m in enumerate(last) if m == R]
            if len(idx) < math.ceil(st.slow_consistency * W):
                continue
            ex = [statistics.median([w[m][window[i]] for m in members if m != R]) - w[R][window[i]] for i in idx]
            idx = [i for i in idx if all(window[i] in step_time[m] for m in members)]
            if not idx:
                continue
            times = [step_time[R][window[i]] for i in idx]
            step_s = statistics.median(e.step_s for e in times)
            own_wait = statistics.median(e.wait_s for e in times)
            # in all its groups together it waits less than its peers do, by most of the gap
            # (a rank late only because it waited for the slow one elsewhere does not)
            lead = statistics.median(statistics.median([step_time[m][window[i]].wait_s for m in members if m != R])
                                     - step_time[R][window[i]].wait_s for i in idx)
            exm = statistics.median(ex)
            if exm >= st.slow_ratio * step_s and lead >= 0.5 * exm:
                f = ranks_out.setdefault(R, {"kind": "slow_rank", "ranks": [R], "group": name, "evidence": {
                    "groups": {}, "arrived_last": f"{len(idx)}/{W} steps", "step_s": round(step_s, 4),
                    "own_wait_s": round(own_wait, 4)}, "window": window, "onset_wall": times[0].wall_end - step_s,
                    "step": window[-1], "why": "its peers consistently wait for it to enter their collectives"})
                f["evidence"]["groups"][name] = {"peers_wait_s": round(exm, 4), "members": members}
    # siblings: same mesh dim and the same collectives per step (homogeneous work)
    by_name: dict = {}
    for gid, (sib_key, members, tr, window) in transfer.items():
        by_name.setdefault(sib_key, []).append((gid, members, tr, window))
    for (name, _), sib in by_name.items():
        if len(sib) < 2:
            continue
        for gid, members, tr, window in sib:
            if len(members) != 2:
                continue
            others = statistics.median([t for g2, _, t, _ in sib if g2 != gid])
            step_s = _window_step_s(step_time, members, window)
            if step_s is None:
                continue
            if tr >= st.link_factor * max(others, 1e-6) and tr - others >= st.link_ratio * step_s:
                links.append(_link_finding(sorted(members), name, {
                    "op_time_after_both_entered_s": round(tr, 4), "sibling_groups_s": round(others, 4)},
                    step_time, window, step_s,
                    "ops between this pair are consistently slow while sibling groups are normal"))
    links += _p2p_links(states, step_time, st)
    in_links = {r for f in links for r in f["ranks"]}
    return links + [f for r, f in sorted(ranks_out.items()) if r not in in_links]


def _p2p_links(states: dict, step_time: dict, st: C4Settings) -> list[dict]:
    """slow_link findings for point-to-point pairs (pipeline stages): per step, each rank
    publishes its shortest op with each peer. On a healthy link some op finds its data
    already there (about 0 s) even next to a slow rank; on a slow link every op pays the
    link, on both ends. A pair is slow when the shorter of its two ends' per-step minima
    stays link_factor x above its sibling pairs' (same group name) and the extra time
    over the pair's ops is >= link_ratio of the step time."""
    W = st.slow_window
    pairs = {}  # (name, a, b) -> (median per-step minimum, ops per step, window)
    for r, s in states.items():
        for g in s.groups.values():
            for peer, q in g.peer_steps.items():
                if peer <= r or peer not in states:
                    continue
                theirs = next((g2.peer_steps.get(r) for g2 in states[peer].groups.values()
                               if g2.name == g.name and r in g2.peer_steps), None)
                if not theirs:
                    continue
                mine, other = {e.step: e for e in q}, {e.step: e for e in theirs}
                start = max(states[r].start, states[peer].start) + st.warmup_steps
                window = [x for x in sorted(mine.keys() & other.keys()) if x > start][-W:]
                if len(window) < W:
                    continue
                tr = statistics.median(min(mine[x].shortest_s, other[x].shortest_s) for x in window)
                ops = statistics.median(max(mine[x].ops, other[x].ops) for x in window)
                pairs[(g.name, r, peer)] = (tr, ops, window)
    links = []
    for (name, a, b), (tr, ops, window) in pairs.items():
        others = [t for (n2, a2, b2), (t, _, _) in pairs.items() if n2 == name and (a2, b2) != (a, b)]
        if not others:
            continue
        base = statistics.median(others)
        step_s = _window_step_s(step_time, [a, b], window)
        if step_s is None:
            continue
        if tr >= st.link_factor * max(base, 1e-4) and (tr - base) * ops >= st.link_ratio * step_s:
            links.append(_link_finding([a, b], name, {
                "shortest_op_s": round(tr, 4), "sibling_pairs_s": round(base, 4), "ops_per_step": ops},
                step_time, window, step_s,
                "every point-to-point op between this pair is slow while sibling pairs are normal"))
    return links


def _window_step_s(step_time: dict, ranks: list, window: list) -> float | None:
    """Median step time of `ranks` over the steps of `window` (None: no step timed there)."""
    times = [step_time[m][x].step_s for m in ranks for x in window if x in step_time[m]]
    return statistics.median(times) if times else None


def _link_finding(ranks: list, group: str, evidence: dict, step_time: dict, window: list, step_s: float,
                  why: str) -> dict:
    """A slow_link finding; its onset is the start of the window's first step."""
    t0 = [step_time[ranks[0]][x].wall_end for x in window if x in step_time[ranks[0]]]
    return {"kind": "slow_link", "ranks": ranks, "group": group, "evidence": {**evidence, "step_s": round(step_s, 4)},
            "window": window, "step": window[-1], "onset_wall": (t0[0] - step_s) if t0 else None, "why": why}


# ----------------------------------------------------------------------------- watcher


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
        self._reset()
        self.pids: dict = {}  # pid -> (attempt, rank, run) of every rank seen
        self._lock = threading.Lock()
        self.findings: list[dict] = []

    def _reset(self) -> None:
        self.hb: dict = {}  # rank -> (hb, first seen monotonic)
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
            hb = (s.hb, s.pid)
            old = self.hb.get(r)
            if old is None or old[0] != hb:
                self.hb[r] = old = (hb, now)
            stale[r] = now - old[1]
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
        self.log(f"C4: {what}: rank(s) {out['ranks']} on {out['host']} (group {out['group']}, step {step}, "
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
        """Drill faults that need an outside hand: SIGSTOP a rank once it reaches a step."""
        for item in list(self.sigstops):
            run, inj = item
            s = states.get(inj.rank)
            if s is None or s.phase != "train" or (run and s.run != str(run)):
                continue
            if s.step >= inj.step and s.host == self.host:
                self.sigstops.remove(item)
                os.kill(s.pid, signal.SIGSTOP)
                self.log(f"fault injection: SIGSTOP sent to rank {inj.rank} (pid {s.pid}) at step {s.step}")
                d = Path(s.run) / "c4"
                d.mkdir(parents=True, exist_ok=True)
                with open(d / "injections.jsonl", "a") as fh:
                    fh.write(json.dumps({"time": time.time(), "rank": inj.rank, "step": s.step,
                                         "spec": inj.text, "event": "fired"}) + "\n")

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


def _advance(s: RankState, extra: float) -> None:
    """Ages in a state were measured when it was published: add the time since."""
    for g in s.groups.values():
        if g.pending:
            g.pending.seconds += extra
        for link in g.peers.values():
            if link.pending:
                link.pending.seconds += extra
