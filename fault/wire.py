"""The C4 state on the wire: what each rank's publisher writes to the store and the watcher reads.

One small record per thing a rank reports, shared by the writer (`publisher.py`) and the
readers (the watcher and its rules), so both sides name every field. The JSON stays compact
(every rank publishes every `interval_s`, the watcher reads all of them each poll): records
are short lists and only `to_json`/`from_json` here know their positions.
"""
from __future__ import annotations

from dataclasses import dataclass, field

C4_EXIT_CODE = 75  # ranks told to stop by the watcher exit with this code
PREFIX = "c4"
# Set by a launcher that hosts the watcher, for its workers (read by dist_train/c4.py):
DETECTOR_ENV = "DIST_TRAIN_C4_DETECTOR"  # "launcher": the ranks run no detector themselves
STORE_ENV = "DIST_TRAIN_C4_STORE"  # host:port of the store the ranks publish to


def key(*parts) -> str:
    """A store key of C4 (states, stop flags, counters): `c4/part/part...`."""
    return "/".join((PREFIX,) + tuple(str(p) for p in parts))


def _opt(rec):
    return rec.to_json() if rec is not None else None


@dataclass
class PendingOp:
    """A group's oldest op (or the oldest with one p2p peer) that has not completed."""
    seq: int
    op: str
    entered: bool  # the real call was issued (False: held before it)
    waiting: bool  # the caller sits in wait()
    seconds: float  # for how long: in wait(), inside the call, or held before it

    def to_json(self) -> list:
        return [self.seq, self.op, int(self.entered), int(self.waiting), self.seconds]

    @classmethod
    def from_json(cls, j) -> "PendingOp | None":
        if not j:
            return None
        seq, op, entered, waiting, seconds = j
        return cls(seq, op, bool(entered), bool(waiting), seconds)


@dataclass
class StepWait:
    """Seconds a rank sat blocked in one group's collectives during one step."""
    step: int
    wait_s: float
    ops: int = 0  # collectives issued on the group that step

    def to_json(self) -> list:
        return [self.step, self.wait_s, self.ops]

    @classmethod
    def from_json(cls, j) -> "StepWait":
        step, wait_s, ops = j
        return cls(step, wait_s, ops)


@dataclass
class StepTime:
    """One finished step of a rank."""
    step: int
    step_s: float
    wall_end: float  # time.time() at its end
    wait_s: float  # blocked in all groups together, p2p included

    def to_json(self) -> list:
        return [self.step, self.step_s, self.wall_end, self.wait_s]

    @classmethod
    def from_json(cls, j) -> "StepTime":
        step, step_s, wall_end, wait_s = j
        return cls(step, step_s, wall_end, wait_s)


@dataclass
class PeerStep:
    """One step's point-to-point traffic with one peer (slow-link evidence)."""
    step: int
    shortest_s: float  # the step's shortest op with the peer
    wait_s: float  # all p2p waits with the peer that step
    ops: int

    def to_json(self) -> list:
        return [self.step, self.shortest_s, self.wait_s, self.ops]

    @classmethod
    def from_json(cls, j) -> "PeerStep":
        step, shortest_s, wait_s, ops = j
        return cls(step, shortest_s, wait_s, ops)


@dataclass
class PeerLink:
    """Point-to-point progress with one peer: p2p ops are numbered per peer on both ends."""
    done: int  # last completed p2p op with the peer
    pending: PendingOp | None = None

    def to_json(self) -> list:
        return [self.done, _opt(self.pending)]

    @classmethod
    def from_json(cls, j) -> "PeerLink":
        done, pending = j
        return cls(done, PendingOp.from_json(pending))


@dataclass
class GroupSnapshot:
    """One process group as a rank sees it (the recorder's `GroupState`, published)."""
    name: str  # mesh dim name or ranks; may repeat across groups
    ranks: list[int]
    seq: int  # last collective issued
    done: int  # last collective completed
    op: str | None = None  # the last completed collective
    pending: PendingOp | None = None
    d50: float = 0.0  # recent collective durations, seconds
    d90: float = 0.0
    waits: list[StepWait] = field(default_factory=list)
    peers: dict[int, PeerLink] = field(default_factory=dict)  # p2p peers
    peer_steps: dict[int, list[PeerStep]] = field(default_factory=dict)

    def to_json(self) -> dict:
        d = {"n": self.name, "ranks": list(self.ranks), "seq": self.seq, "done": self.done, "op": self.op,
             "p": _opt(self.pending), "d50": self.d50, "d90": self.d90, "w": [w.to_json() for w in self.waits]}
        if self.peer_steps:
            d["pw"] = {str(p): [e.to_json() for e in q] for p, q in self.peer_steps.items()}
        if self.peers:
            d["pp"] = {str(p): link.to_json() for p, link in self.peers.items()}
        return d

    @classmethod
    def from_json(cls, j: dict) -> "GroupSnapshot":
        return cls(j["n"], list(j["ranks"]), j["seq"], j["done"], j.get("op"), PendingOp.from_json(j.get("p")),
                   j.get("d50", 0.0), j.get("d90", 0.0), [StepWait.from_json(e) for e in j.get("w", [])],
                   {int(p): PeerLink.from_json(q) for p, q in j.get("pp", {}).items()},
                   {int(p): [PeerStep.from_json(e) for e in q] for p, q in j.get("pw", {}).items()})


@dataclass
class RankState:
    """Everything one rank publishes, refreshed every `interval_s`."""
    rank: int
    host: str
    pid: int
    run: str
    hb: int  # heartbeat: bumped by every publication
    phase: str  # train | busy:<what> | done
    step: int
    start: int  # the step this attempt started after
    step_s: float  # median of recent step times
    steps: list[StepTime] = field(default_factory=list)
    groups: dict[str, GroupSnapshot] = field(default_factory=dict)  # by torch's group name
    cfg: dict = field(default_factory=dict)  # the C4Settings the rank runs with
    health: list[dict] = field(default_factory=list)  # GPU health events (fault/health.py)
    attempt: int = 0
    time: float = 0.0  # time.time() at publication

    def to_json(self) -> dict:
        return {"r": self.rank, "host": self.host, "pid": self.pid, "a": self.attempt, "run": self.run,
                "hb": self.hb, "phase": self.phase, "step": self.step, "start": self.start, "step_s": self.step_s,
                "st": [e.to_json() for e in self.steps], "g": {gid: g.to_json() for gid, g in self.groups.items()},
                "cfg": self.cfg, "health": self.health, "t": self.time}

    @classmethod
    def from_json(cls, j: dict) -> "RankState":
        return cls(j["r"], j.get("host"), j["pid"], j.get("run"), j["hb"], j.get("phase"), j.get("step", 0),
                   j.get("start", 0), j.get("step_s", 0.0), [StepTime.from_json(e) for e in j.get("st", [])],
                   {gid: GroupSnapshot.from_json(g) for gid, g in j.get("g", {}).items()}, j.get("cfg") or {},
                   list(j.get("health", [])), j.get("a", 0), j.get("t", 0.0))
