"""The C4 rules: pure functions from the ranks' published states to hang, slow-rank and slow-link findings.

After C4 (Dong et al., "Boosting Large-scale Parallel Training Efficiency with C4:
A Communication-Driven Approach", Alibaba, 2024): collective communication in
parallel training is periodic and homogeneous across ranks, so a rank or link
that breaks the pattern points at faulty hardware. C4 tells apart a
communication hang (every member entered a collective that never completes), a
non-communication hang (members wait in a collective that one rank never
entered), a slow rank and a slow link; it localises the culprit within seconds,
then the job is stopped and restarted from a checkpoint.

Inputs are `fault.wire.RankState`s (one per rank, refreshed every ~0.2 s); no I/O
here, so every rule is tested on hand-made states. Every threshold is relative to
the job's own timing:
- waiting: a rank is blocked in an op (entered, inside `wait()`) for longer than
  T = max(hang_min_s, hang_factor x the group's recent p90 op duration,
  hang_steps x the median step time; startup_s until every rank has finished the
  run's first step). Each blocked rank waits for the members
  that did not enter that op (collective: same group sequence number; p2p: the
  matching op on the peer). The ranks waited on that wait for nobody are the
  culprits of a non_comm_hang (of a hang if each is stuck inside a call of its
  own, such as a pipeline recv whose sender's send already completed); with no one
  missing it is a hang, named by the members that entered but never reached
  `wait()` (stuck inside the call) or, failing that, the whole group. A member whose
  heartbeat is stale (a stopped or dead process) is named as a non_comm_hang in either case,
  and a rank's stale state is never evidence against others: the pending ops of a rank not
  heard from for `lag_s` are not waits, and while such a rank is not yet stale the hang
  rules wait (a frozen rank's last state can look like a wait for someone else).
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
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import NamedTuple

from .settings import C4Settings
from .wire import PendingOp, RankState


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


# ----------------------------------------------------------------------------- who waits for whom


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


def lag_s(st: C4Settings) -> float:
    """A heartbeat older than this missed about two publications: the rank's state may be its
    last one (a stopped process), so what it says the rank is doing is no longer evidence."""
    return max(2.5 * st.interval_s, 0.5)


def _waits(states: dict, st: C4Settings, unheard: set) -> tuple[list, list]:
    """Every op a rank sits in wait() for, and those of them past their group's threshold.
    An `unheard` rank's own pending ops are not waits (peers still read what it entered)."""
    waits, blocked = [], []
    for r, s in states.items():
        if r in unheard:
            continue
        for gid, g in s.groups.items():
            T = _group_threshold(states, gid, st)
            p = g.pending
            if _in_wait(p):
                missing = [m for m in g.ranks if m != r and m in states and not _entered(states[m], gid, p.seq)]
                waits.append(Wait(r, gid, g.name, p.op, p.seq, p.seconds, missing, g.ranks))
                if p.seconds > T:
                    blocked.append(waits[-1])
            for peer, link in g.peers.items():
                p = link.pending
                if _in_wait(p):
                    missing = [] if peer not in states or _entered_p2p(states[peer], gid, r, p.seq) else [peer]
                    waits.append(Wait(r, gid, g.name, p.op, p.seq, p.seconds, missing, [r, peer]))
                    if p.seconds > T:
                        blocked.append(waits[-1])
    return waits, blocked


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


# ----------------------------------------------------------------------------- hang rules


@dataclass
class _Hang:
    """What the hang rules share: the waits under way and the evidence they build on."""
    states: dict
    stale: dict
    st: C4Settings
    waits: list
    blocked: list
    waited_on: set
    chain: list  # the blocked waits, then the waits of ranks they wait on
    evidence: dict
    onset: float  # the longest blocked wait

    def finding(self, kind: str, ranks: list, why: str, group: str | None = None, since: float | None = None,
                **evidence) -> dict:
        self.evidence.update(evidence)
        return {"kind": kind, "ranks": ranks, "evidence": self.evidence, "group": group or self.blocked[0].group,
                "since_onset_s": self.onset if since is None else since, "why": why}


def find_hangs(states: dict, stale: dict, st: C4Settings) -> dict | None:
    """One hang finding (dict without time fields) or None. `states`: rank -> RankState
    with ages already advanced to now; `stale`: rank -> seconds since its heartbeat moved.
    A rank gone quiet wins over anything read from its last state: while one lags (quiet for
    longer than `lag_s`, not yet `stale_s`) and someone is blocked, no finding yet; once
    stale it is named by its heartbeat."""
    lag = lag_s(st)
    unheard = {r for r, age in stale.items() if age > lag}
    waits, blocked = _waits(states, st, unheard)
    if not blocked or any(stale[r] <= st.stale_s for r in unheard):
        return None
    waited_on = _waited_on(blocked, waits)
    chain = blocked + [w for w in waits if w.rank in waited_on and w not in blocked]
    evidence = {"waiting": {str(w.rank): {"group": w.group, "op": w.op, "seq": w.seq, "waited_s": round(w.waited_s, 2),
                                          "not_entered": w.missing} for w in chain}}
    h = _Hang(states, stale, st, waits, blocked, waited_on, chain, evidence, max(b.waited_s for b in blocked))
    return _stopped_rank(h) or _rank_waiting_for_nobody(h) or _all_entered(h) or _cycle(h)


def _stopped_rank(h: _Hang) -> dict | None:
    """A rank others wait on (or share a blocked op with) whose heartbeat is stale."""
    dead = sorted(r for r, age in h.stale.items() if age > h.st.stale_s and (r in h.waited_on or any(
        r in b.members for b in h.blocked)))
    if not dead:
        return None
    return h.finding("non_comm_hang", dead, "process not responding (heartbeat stale) while its peers wait for it",
                     since=max(h.onset, max(h.stale[r] for r in dead)),
                     heartbeat_stale_s={str(r): round(h.stale[r], 2) for r in dead})


def _rank_waiting_for_nobody(h: _Hang) -> dict | None:
    """The end of the wait chain: ranks waited on that wait for no one themselves."""
    sinks = sorted(h.waited_on - {w.rank for w in h.waits})
    if not sinks:
        return None
    culprit_state = {str(r): _describe(h.states[r]) for r in sinks}
    # a culprit stuck inside a communication call of its own (a p2p recv whose sender
    # moved on, say) hangs in communication, though its peers wait elsewhere
    waited = {r: min(b.waited_s for b in h.chain if r in b.missing) for r in sinks}
    inside = [r for r in sinks if _inside_call_s(h.states[r]) >= 0.5 * waited[r]]
    if inside == sinks:
        return h.finding("hang", sinks, "stuck inside a communication call that never returns, while peers wait for it",
                         culprit_state=culprit_state, stuck_inside_call=inside)
    return h.finding("non_comm_hang", sinks, "peers wait in a collective this rank never entered",
                     culprit_state=culprit_state)


def _all_entered(h: _Hang) -> dict | None:
    """Every member entered the op and it does not complete: name those stuck inside the call."""
    full = [b for b in h.blocked if not b.missing]
    if not full:
        return None
    b = max(full, key=lambda b: b.waited_s)
    inside = sorted(m for m in b.members if m in h.states and _stuck_inside(h.states[m], b.gid, b.seq, b.rank))
    return h.finding("hang", inside or sorted(b.members),
                     "every member entered the collective and it does not complete",
                     group=b.group, entered=b.members, stuck_inside_call=inside)


def _cycle(h: _Hang) -> dict:
    return h.finding("hang", sorted({b.rank for b in h.blocked}),
                     "ranks wait for each other in different collectives (a cycle)")


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


# ----------------------------------------------------------------------------- slow rules


class _GroupWindow(NamedTuple):
    """One group's per-step waits over the last `slow_window` steps all its members report."""
    gid: str
    name: str
    nops: float  # collectives per step (siblings run the same)
    members: list
    waits: dict  # member -> {step: seconds blocked}
    window: list  # steps


def find_slow(states: dict, st: C4Settings) -> list[dict]:
    """slow_rank and slow_link findings from the per-step waits of the last window."""
    step_time = {r: {e.step: e for e in s.steps} for r, s in states.items()}
    windows = _group_windows(states, st)
    ranks_out = _slow_ranks(windows, step_time, st)
    links = _collective_links(windows, step_time, st) + _p2p_links(states, step_time, st)
    in_links = {r for f in links for r in f["ranks"]}
    return links + [f for r, f in sorted(ranks_out.items()) if r not in in_links]


def _group_windows(states: dict, st: C4Settings) -> list[_GroupWindow]:
    out = []
    for gid in sorted({gid for s in states.values() for gid in s.groups}):
        members = next(s.groups[gid].ranks for s in states.values() if gid in s.groups)
        if len(members) < 2 or any(m not in states or gid not in states[m].groups for m in members):
            continue
        w = {m: {int(e.step): e.wait_s for e in states[m].groups[gid].waits} for m in members}
        nops = statistics.median([e.ops for e in states[members[0]].groups[gid].waits] or [0])
        start = max(states[m].start for m in members) + st.warmup_steps
        common = sorted(set.intersection(*(set(v) for v in w.values())))
        window = [x for x in common if x > start][-st.slow_window:]
        if len(window) == st.slow_window:
            out.append(_GroupWindow(gid, states[members[0]].groups[gid].name, nops, members, w, window))
    return out


def _slow_ranks(windows: list, step_time: dict, st: C4Settings) -> dict:
    """rank -> slow_rank finding (its evidence lists every group where it was slow)."""
    out: dict = {}
    for gw in windows:
        last = [min(gw.members, key=lambda m: gw.waits[m][x]) for x in gw.window]
        for R in set(last):
            idx = [i for i, m in enumerate(last) if m == R]
            if len(idx) >= math.ceil(st.slow_consistency * st.slow_window):
                _slow_rank_in(gw, R, idx, step_time, st, out)
    return out


def _slow_rank_in(gw: _GroupWindow, R: int, idx: list, step_time: dict, st: C4Settings, out: dict) -> None:
    """R arrived last in steps `idx` of the window: is it slow there? Adds to `out`."""
    W, members, window = st.slow_window, gw.members, gw.window
    ex = [statistics.median([gw.waits[m][window[i]] for m in members if m != R]) - gw.waits[R][window[i]]
          for i in idx]
    idx = [i for i in idx if all(window[i] in step_time[m] for m in members)]
    if not idx:
        return
    times = [step_time[R][window[i]] for i in idx]
    step_s = statistics.median(e.step_s for e in times)
    own_wait = statistics.median(e.wait_s for e in times)
    # in all its groups together it waits less than its peers do, by most of the gap
    # (a rank late only because it waited for the slow one elsewhere does not)
    lead = statistics.median(statistics.median([step_time[m][window[i]].wait_s for m in members if m != R])
                             - step_time[R][window[i]].wait_s for i in idx)
    exm = statistics.median(ex)
    if exm >= st.slow_ratio * step_s and lead >= 0.5 * exm:
        f = out.setdefault(R, {"kind": "slow_rank", "ranks": [R], "group": gw.name, "evidence": {
            "groups": {}, "arrived_last": f"{len(idx)}/{W} steps", "step_s": round(step_s, 4),
            "own_wait_s": round(own_wait, 4)}, "window": window, "onset_wall": times[0].wall_end - step_s,
            "step": window[-1], "why": "its peers consistently wait for it to enter their collectives"})
        f["evidence"]["groups"][gw.name] = {"peers_wait_s": round(exm, 4), "members": members}


def _collective_links(windows: list, step_time: dict, st: C4Settings) -> list[dict]:
    """A two-rank group whose ops take longer after both arrived than its siblings' (same
    mesh dim and the same collectives per step: homogeneous work)."""
    siblings: dict = {}
    for gw in windows:
        transfer = statistics.median(min(gw.waits[m][x] for m in gw.members) for x in gw.window)
        siblings.setdefault((gw.name, gw.nops), []).append((gw, transfer))
    links = []
    for sib in siblings.values():
        if len(sib) < 2:
            continue
        for gw, tr in sib:
            if len(gw.members) != 2:
                continue
            others = statistics.median([t for g2, t in sib if g2.gid != gw.gid])
            step_s = _window_step_s(step_time, gw.members, gw.window)
            if step_s is None:
                continue
            if tr >= st.link_factor * max(others, 1e-6) and tr - others >= st.link_ratio * step_s:
                links.append(_link_finding(sorted(gw.members), gw.name, {
                    "op_time_after_both_entered_s": round(tr, 4), "sibling_groups_s": round(others, 4)},
                    step_time, gw.window, step_s,
                    "ops between this pair are consistently slow while sibling groups are normal"))
    return links


def _p2p_links(states: dict, step_time: dict, st: C4Settings) -> list[dict]:
    """slow_link findings for point-to-point pairs (pipeline stages): per step, each rank
    publishes its shortest op with each peer. On a healthy link some op finds its data
    already there (about 0 s) even next to a slow rank; on a slow link every op pays the
    link, on both ends. A pair is slow when the shorter of its two ends' per-step minima
    stays link_factor x above its sibling pairs' (same group name) and the extra time
    over the pair's ops is >= link_ratio of the step time."""
    pairs = _p2p_pairs(states, st)
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


def _p2p_pairs(states: dict, st: C4Settings) -> dict:
    """(group name, a, b) -> (median per-step shortest op of the pair, ops per step, window)."""
    W = st.slow_window
    pairs = {}
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
    return pairs


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
