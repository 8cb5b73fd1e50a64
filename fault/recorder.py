"""Per-process bookkeeping of collectives: step totals, recent records, pending ops.

Kept free of torch.distributed so it can be unit-tested and read by a side
thread (the C4 publisher) without touching process groups. The observing
process-group backend in `collectives.py` feeds it; this file only counts.

Byte convention (`CollectiveRecord.nbytes`), the payload this rank contributes
or receives as the caller asked for it:
  all_gather: output bytes · reduce_scatter: input bytes · all_reduce: tensor
  bytes · all_to_all: input bytes · send/recv: tensor bytes · broadcast and
  reduce: tensor bytes · gather: input bytes · scatter: output bytes · barrier: 0.
On gloo a reduce-scatter runs as an all-reduce of the full input underneath
(about twice the traffic of a real reduce-scatter); it is still counted as the
reduce_scatter the caller asked for, with the same bytes, so counts match NCCL.

Wire bytes (`wire_bytes`), summed per group for the step's `group_summary`: what this
rank sends for the op under the ring algorithms NCCL and gloo use in a group of n:
all_reduce 2(n-1)/n of the tensor, all_gather and reduce_scatter (n-1)/n of the full
buffer (broadcast and the rest likewise), all_to_all what goes to the other ranks,
send the tensor, recv nothing. Payload counts compare collectives of one kind; wire
bytes compare bandwidth between mesh dimensions whatever collectives carry it.

Threading: collectives are issued and waited from one thread at a time (the
training loop); readers on other threads only take snapshots (`records`,
`pending`, `group_states`), which copy containers in single C calls under the
GIL and never block the hot path.
"""

from __future__ import annotations

import collections
import contextlib
import time
from typing import Callable, Iterator

# Aggregate kinds. The first five always appear in `step_summary`.
MAIN_KINDS = ("all_gather", "reduce_scatter", "all_reduce", "all_to_all", "send_recv")
KINDS = MAIN_KINDS + ("broadcast", "barrier", "other")

_now = time.monotonic_ns


def wire_bytes(kind: str, op: str, nbytes: int, n: int) -> int:
    """Bytes a rank sends for one op in a group of n under ring algorithms (module docstring).
    An uneven all_to_all's exact figure is passed by its caller instead."""
    if kind == "send_recv":
        return nbytes if op == "send" else 0
    if n < 2 or kind == "barrier":
        return 0
    if kind == "all_reduce":
        return 2 * (n - 1) * nbytes // n
    return (n - 1) * nbytes // n


class CollectiveRecord:
    """One collective (or one send/recv) as this rank issued it.

    `seq` counts collectives on the group (same on every member if they issue
    the same collectives); for send/recv it counts p2p ops between this rank
    and that peer on the group, which matches on both ends. `peers` holds
    global ranks: the group's ranks, or (src, dst) for p2p. Times are
    `time.monotonic_ns()`; `t_exit` is 0 while pending and is stamped when the
    caller's `wait()` returns (exact for blocking calls, an upper bound for
    work waited on later). `t_wait` is when the caller first called `wait()`:
    `t_exit - t_wait` is the time the caller sat blocked (a pipeline's bubble).
    `background` marks work its caller waits for only later, on purpose (the
    trainer's deferred metrics gather): until `wait()` it blocks no one.
    """

    __slots__ = ("group", "op", "kind", "seq", "nbytes", "peers",
                 "t_enter", "t_wait", "t_exit", "counted", "error", "hold_s", "link_s", "background")

    def __init__(self, group, op, kind, seq, nbytes, peers, counted, background=False):
        self.group = group
        self.op = op
        self.kind = kind
        self.seq = seq
        self.nbytes = nbytes
        self.peers = peers
        self.t_enter = 0
        self.t_wait = 0
        self.t_exit = 0
        self.counted = counted
        self.error = None
        self.hold_s = 0.0  # set by a fault hook: extra seconds inside the op (a slow link)
        self.link_s = 0.0  # set by the topology's link model: the op takes this long over its slowest link
        self.background = background

    def as_dict(self) -> dict:
        """Plain dict (JSON-ready) for publishing or logging."""
        return {s: getattr(self, s) for s in self.__slots__} | {"peers": list(self.peers)}

    def __repr__(self) -> str:
        dur = (self.t_exit - self.t_enter) / 1e3 if self.t_exit else None
        return (f"CollectiveRecord({self.group}#{self.seq} {self.op} {self.nbytes}B "
                f"peers={list(self.peers)} dur_us={dur})")


# A fault hook sees each record (op, group, seq, peers are set) just before
# the real call is issued. The record is already pending with t_enter == 0, so
# a held op reads as "issued, not entered". Sleeping models a rank that
# arrives late; blocking models a hang at the Nth op; raising fails the op;
# stamping `t_enter` and then blocking models a rank stuck inside the op;
# setting `hold_s` keeps the op open that much longer after it completes
# (a slow transfer, as a slow link would cause).
FaultHook = Callable[[CollectiveRecord], None]


class GroupState:
    """What the C4 detector needs per group, updated in place on the hot path."""

    __slots__ = ("name", "gid", "ranks", "seq", "pending", "last_completed",
                 "p2p_seq", "p2p_last", "wait_ns", "p2p_wait_ns", "p2p_min_ns", "durations", "last_failed")

    def __init__(self, name, ranks):
        self.name = name  # None until resolved (mesh dim name or ranks)
        self.gid = None  # torch's group name: unique, the same on every member
        self.ranks = tuple(ranks)
        self.seq = 0
        self.pending: dict = {}  # insertion-ordered set of CollectiveRecord
        self.last_completed: CollectiveRecord | None = None  # collectives only
        self.p2p_seq: dict = {}  # peer global rank -> count
        self.p2p_last: dict = {}  # peer global rank -> last completed p2p record
        # For the C4 detector: time blocked in ops (see `end`), summed since
        # start (collectives; p2p per peer), and the last durations of collectives.
        # Summed per step they show who waits for whom; the ring gives the
        # group's own recent timing that hang thresholds are relative to.
        self.wait_ns = 0
        self.p2p_wait_ns: dict = {}  # peer global rank -> ns
        # peer -> shortest p2p op with it since the caller last reset it (once a step): a
        # healthy link has some op that finds its data there; a slow link has none
        self.p2p_min_ns: dict = {}
        self.durations: collections.deque = collections.deque(maxlen=64)  # ns
        self.last_failed: CollectiveRecord | None = None  # the last op that raised (a peer lost, say)

    def end(self, rec: CollectiveRecord) -> None:
        """Stamp exit once; move the record from pending to last completed."""
        if rec.t_exit:
            return
        rec.t_exit = t = _now()
        self.pending.pop(rec, None)
        # time blocked: from entering (or from the caller's wait(), for async work waited
        # later) to exit, so compute overlapped with an async op does not count as waiting
        d = t - max(rec.t_enter, rec.t_wait) if rec.t_enter else 0
        if rec.kind == "send_recv":
            peer = rec.peers[0] if rec.op.startswith("recv") else rec.peers[1]
            self.p2p_last[peer] = rec
            self.p2p_wait_ns[peer] = self.p2p_wait_ns.get(peer, 0) + d
            if d < self.p2p_min_ns.get(peer, d + 1):
                self.p2p_min_ns[peer] = d
        else:
            # work waited late (background) may finish after ops issued behind it
            if self.last_completed is None or rec.seq > self.last_completed.seq:
                self.last_completed = rec
            self.wait_ns += d
            self.durations.append(d)

    def fail(self, rec: CollectiveRecord, exc: BaseException) -> None:
        """An op raised (timeout, peer gone, injected fault): close it with the error."""
        rec.error = f"{type(exc).__name__}: {exc}"
        self.end(rec)
        self.last_failed = rec


class CollectiveRecorder:
    """Cheap per-process counting of every observed collective.

    Keeps per-kind step totals (reset by `step_summary`), a bounded ring of
    recent records, and per-group last-completed / pending records. `hooks`
    is the list of `FaultHook`s run before each real call.
    """

    def __init__(self, capacity: int = 4096, max_pending: int = 1024):
        self.hooks: list[FaultHook] = []
        self.rank = -1  # global rank, set when the first group is built
        self._ring: collections.deque = collections.deque(maxlen=capacity)
        self._totals = {k: [0, 0] for k in KINDS}
        self._by_group: dict[str, list[int]] = {}  # group name -> [count, bytes, wire bytes]
        # ranks (a group's, or (src, dst) of a p2p op) -> link class, when a topology is known
        self.link_of: Callable[[tuple], str] | None = None
        self._by_link: dict[str, dict[str, list[int]]] = {}  # link class -> kind -> [count, bytes]
        self._paused = 0
        self._background = 0
        self._max_pending = max_pending
        self._groups: list[GroupState] = []
        self.dropped_pending = 0  # never-waited works evicted from `pending`

    # --- wiring -----------------------------------------------------------
    def add_group(self, ranks, name=None) -> GroupState:
        st = GroupState(name, ranks)
        self._groups.append(st)
        return st

    # --- hot path ---------------------------------------------------------
    def begin(self, st: GroupState, op: str, kind: str, nbytes: int,
              peers=None, p2p_peer: int | None = None, wire: int | None = None) -> CollectiveRecord:
        """Count and record an op about to be issued, run hooks, stamp enter. `wire`: the
        bytes this rank sends, where `wire_bytes` cannot tell (uneven all_to_all)."""
        if p2p_peer is None:
            st.seq = seq = st.seq + 1
            peers = st.ranks
        else:
            st.p2p_seq[p2p_peer] = seq = st.p2p_seq.get(p2p_peer, 0) + 1
        counted = not self._paused
        rec = CollectiveRecord(st.name, op, kind, seq, nbytes, peers, counted, self._background > 0)
        if counted:
            tot = self._totals[kind]
            tot[0] += 1
            tot[1] += nbytes
            g = self._by_group.get(st.name)
            if g is None:
                g = self._by_group[st.name] = [0, 0, 0]
            g[0] += 1
            g[1] += nbytes
            g[2] += wire if wire is not None else wire_bytes(kind, op, nbytes, len(st.ranks))
            if self.link_of is not None:
                by = self._by_link.get(cls := self.link_of(peers))
                if by is None:
                    by = self._by_link[cls] = {}
                k = by.get(kind)
                if k is None:
                    k = by[kind] = [0, 0]
                k[0] += 1
                k[1] += nbytes
        pending = st.pending
        if len(pending) >= self._max_pending:
            del pending[next(iter(pending))]
            self.dropped_pending += 1
        pending[rec] = None
        self._ring.append(rec)
        if self.hooks:
            try:
                for hook in self.hooks:
                    hook(rec)
            except BaseException as e:
                st.fail(rec, e)
                raise
        rec.t_enter = _now()
        return rec

    def end(self, st: GroupState, rec: CollectiveRecord) -> None:
        st.end(rec)

    def fail(self, st: GroupState, rec: CollectiveRecord, exc: BaseException) -> None:
        st.fail(rec, exc)

    # --- readers ----------------------------------------------------------
    def step_summary(self, reset: bool = True) -> dict:
        """Per-kind {count, bytes} since the last reset; the five main kinds
        always, broadcast/barrier/other only when nonzero."""
        out = {}
        for k, (n, b) in self._totals.items():
            if n or k in MAIN_KINDS:
                out[k] = {"count": n, "bytes": b}
        if reset:
            for tot in self._totals.values():
                tot[0] = tot[1] = 0
        return out

    def reset_step_counts(self) -> None:
        """Forget the counts so far (start-up collectives are no step's)."""
        self.step_summary(reset=True)
        self.group_summary(reset=True)
        self.link_summary(reset=True)

    def group_summary(self, reset: bool = True) -> dict:
        """Per group name (a mesh dim, "world", ...) {count, bytes, wire_bytes} since the
        last reset, for groups that ran a counted op."""
        out = {name: {"count": n, "bytes": b, "wire_bytes": w} for name, (n, b, w) in self._by_group.items()}
        if reset:
            self._by_group = {}
        return out

    def link_summary(self, reset: bool = True) -> dict:
        """Per link class, per kind {count, bytes} since the last reset (with `link_of` set):
        each op counted once, under the slowest class its group (or p2p pair) crosses."""
        out = {c: {k: {"count": n, "bytes": b} for k, (n, b) in by.items()} for c, by in self._by_link.items()}
        if reset:
            self._by_link = {}
        return out

    def last_failure(self) -> tuple[GroupState, CollectiveRecord] | None:
        """The group and record of the op that raised last (in any group), if any."""
        failed = [(st, st.last_failed) for st in list(self._groups) if st.last_failed is not None]
        return max(failed, key=lambda f: f[1].t_exit) if failed else None

    def records(self) -> list[CollectiveRecord]:
        """Recent records, oldest first (pending ones included, t_exit == 0)."""
        return list(self._ring)

    def pending(self) -> list[CollectiveRecord]:
        """Issued but not yet waited-on records across all groups."""
        out = []
        for st in list(self._groups):
            out.extend(st.pending.copy())
        return out

    def groups(self) -> list[GroupState]:
        """The live per-group states (groups that ran an op), for the C4 publisher;
        read their fields, do not change them."""
        return [st for st in list(self._groups) if st.name is not None]

    def group_states(self) -> dict:
        """Snapshot keyed by torch's group name (same on every member; labels
        may repeat): record name, ranks, seq, last completed and pending."""
        return {
            st.gid: {
                "name": st.name,
                "ranks": list(st.ranks),
                "seq": st.seq,
                "last_completed": st.last_completed,
                "pending": list(st.pending.copy()),
                "p2p_last": st.p2p_last.copy(),
            }
            for st in list(self._groups)
            if st.name is not None  # groups that never ran an op
        }

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Ops issued inside are still recorded (seq, ring, pending, hooks) but
        left out of the step totals, e.g. the trainer's metric reductions."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Ops issued inside are counted like any other, but are `background` too: issued to
        be waited later (an overlapped exchange), so C4 reads them as stuck only once the
        caller waits."""
        self._background += 1
        try:
            yield
        finally:
            self._background -= 1

    @contextlib.contextmanager
    def background(self) -> Iterator[None]:
        """Like `paused`, for async work the caller waits for only later: its
        records are `background`, so C4 does not read them as stuck until
        the caller waits."""
        self._background += 1
        try:
            with self.paused():
                yield
        finally:
            self._background -= 1
