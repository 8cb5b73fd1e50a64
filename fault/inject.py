"""Fault injection at the collective layer, for C4 drills.

Why here: a `FaultHook` runs inside the observed process-group backend just
before each real call, for every collective that FSDP2, DTensor or pipelining
issues, so a fault looks to the peers exactly as a real one would (a late
rank, a rank stuck inside an op, a slow transfer) without touching model code.

Spec strings (`[fault] inject = [...]`, `dist-train drill --fault`):
  delay:rank=R,ms=M[,step=S]            R enters each collective M ms late (from step S)
  hang:rank=R,step=S[,op=N][,where=W]   R stops at its N-th collective of step S, forever;
                                        where=comm: after entering it (a communication hang),
                                        where=compute: before entering it (a non-communication hang)
  slow_link:ranks=A-B,ms=M[,step=S]     every op whose members include A and B stays open
                                        M ms longer after completing (on every member)
  slow_compute:rank=R,factor=F[,step=S] R's compute between collectives takes F times as long
  crash:rank=R,step=S[,op=N][,code=C]   R exits with code C at its N-th collective of step S
  sigstop:rank=R,step=S[,at=A][,seed=K] the launcher stops R's process with SIGSTOP once R
                                        reports step S (no help from R's own code); at=random:
                                        U(0, 1) of R's recent median step time later, so at any
                                        moment inside a step, not only at its start (seed=K
                                        picks the moments)
  jitter:pct=P[,seed=K][,step=S]        every rank enters its first collective of each step
                                        U(0, P%) of the recent step time late (noise, no fault)
  slow_exchange:ms=M                    elastic DiLoCo: every cross-replica op of this replica's
                                        outer step starts M ms late (a slow wide-area link)
  replica_kill:id=X,step=S              elastic drills (`dist-train drill --replicas R`): kill -9
                                        every process of replica X once it reports step S
  replica_join:step=S[,id=X]            ... start a new replica X once a replica reports step S
  replica_kill_during_heal:step=S       ... start a joiner at step S and kill its source
                                        replica while it sends the joiner its outer state
  lighthouse_kill:step=S                ... kill -9 the lighthouse once a replica reports step S
  slow_save:ms=M[,rank=R]               every checkpoint write of rank R (default every rank) takes
                                        M ms longer, in the thread or process that writes it (a
                                        slow filesystem; keeps a background save in flight)
  bad_update:rank=R,step=S[,scale=X]    DiLoCo: R's replica sends its pseudo-gradient of the first
                                        outer step at or after step S times X (default 1e6;
                                        scale=nan: not finite), as a faulty or hostile replica
                                        would; the outer loop applies it (not the collective hook)

One-shot faults (hang, crash, sigstop) fire once per job: a restarted job
resumes past them (the "repaired" machine), so a drill shows stop-and-restart.
"""
from __future__ import annotations

import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from .recorder import CollectiveRecord, _now


class InjectError(ValueError):
    """A fault spec is malformed; the message names the field and the fix."""


# kind -> {field: (type, required, default)}
_FIELDS: dict[str, dict[str, tuple]] = {
    "delay": {"rank": (int, True, None), "ms": (float, True, None), "step": (int, False, 1)},
    "hang": {"rank": (int, True, None), "step": (int, True, None), "op": (int, False, 1),
             "where": (str, False, "comm")},
    "slow_link": {"ranks": ("pair", True, None), "ms": (float, True, None), "step": (int, False, 1)},
    "slow_compute": {"rank": (int, True, None), "factor": (float, True, None), "step": (int, False, 1)},
    "crash": {"rank": (int, True, None), "step": (int, True, None), "op": (int, False, 1),
              "code": (int, False, 13)},
    "sigstop": {"rank": (int, True, None), "step": (int, True, None), "at": (str, False, "step"),
                "seed": (int, False, 0)},
    "jitter": {"pct": (float, False, 20.0), "seed": (int, False, 0), "step": (int, False, 1)},
    "bad_update": {"rank": (int, True, None), "step": (int, True, None), "scale": (float, False, 1e6)},
    "slow_exchange": {"ms": (float, True, None)},
    "slow_save": {"ms": (float, True, None), "rank": (int, False, -1)},
    "replica_kill": {"id": (str, True, None), "step": (int, True, None)},
    "replica_join": {"step": (int, True, None), "id": (str, False, "j")},
    "replica_kill_during_heal": {"step": (int, True, None), "id": (str, False, "j")},
    "lighthouse_kill": {"step": (int, True, None)},
}
KINDS = tuple(_FIELDS)
ONE_SHOT = ("hang", "crash", "sigstop")
_EXAMPLE = {"delay": "delay:rank=1,ms=50", "hang": "hang:rank=2,step=5", "slow_link": "slow_link:ranks=1-2,ms=80",
            "slow_compute": "slow_compute:rank=3,factor=2", "crash": "crash:rank=1,step=4",
            "sigstop": "sigstop:rank=2,step=5", "jitter": "jitter:pct=20",
            "bad_update": "bad_update:rank=2,step=10,scale=1e6", "slow_exchange": "slow_exchange:ms=200",
            "slow_save": "slow_save:ms=2000",
            "replica_kill": "replica_kill:id=b,step=30", "replica_join": "replica_join:step=40",
            "replica_kill_during_heal": "replica_kill_during_heal:step=20", "lighthouse_kill": "lighthouse_kill:step=30"}
REPLICA_FAULTS = ("replica_kill", "replica_join", "replica_kill_during_heal", "lighthouse_kill")


@dataclass(frozen=True)
class Injection:
    kind: str
    text: str
    args: dict = field(default_factory=dict)

    def __getattr__(self, name):  # spec fields read as attributes: inj.rank, inj.ms
        try:
            return self.__dict__["args"][name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def targets(self) -> tuple[int, ...]:
        """Ranks the fault is about (the pair for a link, none for jitter)."""
        if self.kind == "slow_link":
            return tuple(self.args["ranks"])
        return (self.args["rank"],) if self.args.get("rank", -1) >= 0 else ()  # slow_save: -1, every rank


def _value(spec: str, key: str, kind, raw: str):
    fix = f"in fault spec {spec!r}: {key}={raw!r}"
    try:
        if kind == "pair":
            a, b = (int(x) for x in raw.split("-"))
            if a == b:
                raise InjectError(f"{fix}: the two ranks of a link must differ, e.g. ranks=1-2")
            return (min(a, b), max(a, b))
        return kind(raw)
    except InjectError:
        raise
    except ValueError:
        want = {int: "an integer", float: "a number", str: "a word", "pair": "two ranks like 1-2"}[kind]
        raise InjectError(f"{fix} must be {want}") from None


def parse_spec(spec: str, world_size: int | None = None) -> Injection:
    """Parse one `KIND:key=value,...` spec; errors name the field and the fix."""
    if not isinstance(spec, str):
        raise InjectError(f"fault spec {spec!r} must be a string like {_EXAMPLE['delay']!r}")
    text = spec.strip()
    kind, _, rest = text.partition(":")
    kind = kind.strip()
    if kind not in _FIELDS:
        raise InjectError(f"fault spec {spec!r}: unknown kind {kind!r}; use one of {', '.join(KINDS)} "
                          f"(e.g. {_EXAMPLE['delay']!r})")
    fields = _FIELDS[kind]
    args: dict = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, raw = part.partition("=")
        key = key.strip()
        if not eq:
            raise InjectError(f"fault spec {spec!r}: {part!r} is not key=value (e.g. {_EXAMPLE[kind]!r})")
        if key not in fields:
            raise InjectError(f"fault spec {spec!r}: {kind} has no field {key!r}; its fields are "
                              f"{', '.join(fields)} (e.g. {_EXAMPLE[kind]!r})")
        args[key] = _value(spec, key, fields[key][0], raw.strip())
    given = set(args)
    for key, (_, required, default) in fields.items():
        if key not in args:
            if required:
                raise InjectError(f"fault spec {spec!r}: {kind} needs {key}=... (e.g. {_EXAMPLE[kind]!r})")
            args[key] = default
    for key in ("ms", "factor", "pct"):
        if key in args and args[key] <= 0:
            raise InjectError(f"fault spec {spec!r}: {key} must be > 0")
    if kind == "slow_compute" and args["factor"] <= 1:
        raise InjectError(f"fault spec {spec!r}: factor must be > 1 (2 = twice as slow)")
    if kind == "jitter" and args["pct"] > 100:
        raise InjectError(f"fault spec {spec!r}: pct must be <= 100")
    if kind == "sigstop":
        _check_sigstop(spec, args, given)
    if kind == "hang" and args["where"] not in ("comm", "compute"):
        raise InjectError(f"fault spec {spec!r}: where must be 'comm' (stuck inside the collective) "
                          "or 'compute' (stuck before entering it)")
    for key in ("step", "op"):
        if key in args and args[key] < 1:
            raise InjectError(f"fault spec {spec!r}: {key} must be >= 1")
    inj = Injection(kind, text, args)
    if world_size is not None:
        for r in inj.targets:
            if not 0 <= r < world_size:
                raise InjectError(f"fault spec {spec!r}: rank {r} does not exist in a job of {world_size} "
                                  f"ranks; use 0..{world_size - 1}")
    return inj


def _check_sigstop(spec: str, args: dict, given: set) -> None:
    """`at` and `seed` of a sigstop (`given`: the fields the spec names)."""
    if args["at"] not in ("step", "random"):
        raise InjectError(f"fault spec {spec!r}: at must be 'step' (when the rank reports the step) or 'random' "
                          "(a random moment inside that step), e.g. 'sigstop:rank=2,step=5,at=random'")
    if "seed" in given and args["at"] != "random":
        raise InjectError(f"fault spec {spec!r}: seed only picks the moment of at=random; add at=random or drop seed")


def parse_specs(specs, world_size: int | None = None) -> list[Injection]:
    return [parse_spec(s, world_size) for s in specs]


class FaultInjector:
    """Applies this rank's injections as a recorder hook.

    `once(key)` returns True for the first caller in the whole job (a store
    counter), so one-shot faults do not fire again after a restart; `log(entry)`
    records when a fault first takes effect (the drill measures time to detect
    from it). `on_step` must be called at the start of every step.
    """

    def __init__(self, injections: list[Injection], rank: int, once: Callable[[str], bool] | None = None,
                 log: Callable[[dict], None] | None = None, exit_fn: Callable[[int], None] = os._exit):
        self.rank = rank
        self.step = 0
        self._op = 0  # collectives issued in this step
        self._once = once or (lambda key: True)
        self._log = log or (lambda entry: None)
        self._exit = exit_fn
        self._fired: set = set()
        self._last_issue = None  # monotonic s when the previous collective was issued
        self._step_times: list[float] = []
        self._jitter_s = 0.0
        self.injections = [i for i in injections if i.kind not in ("sigstop", "bad_update", "slow_exchange", "slow_save",
                                                                   *REPLICA_FAULTS) and self._mine(i)]
        self._rng = random.Random()
        for i in self.injections:
            if i.kind == "jitter":
                self._rng.seed(i.seed * 100003 + rank)

    def _mine(self, inj: Injection) -> bool:
        return inj.kind in ("jitter", "slow_link", "slow_exchange") or inj.rank == self.rank

    def __bool__(self) -> bool:
        return bool(self.injections)

    def on_step(self, step: int) -> None:
        self.step, self._op = step, 0
        self._jitter_s = 0.0
        for i in self.injections:
            if i.kind == "jitter" and step >= i.step and self._step_times:
                base = statistics.median(self._step_times[-8:])
                self._jitter_s = self._rng.uniform(0, i.pct / 100) * base

    def on_step_end(self, step_time: float) -> None:
        self._step_times.append(step_time - self._jitter_s)
        del self._step_times[:-16]

    def _note(self, inj: Injection, what: str) -> None:
        if inj.text not in self._fired:
            self._fired.add(inj.text)
            self._log({"time": time.time(), "rank": self.rank, "step": self.step, "spec": inj.text, "event": what})

    def hook(self, rec: CollectiveRecord) -> None:
        self._op += 1
        now = time.monotonic()
        gap = now - self._last_issue if self._last_issue is not None else 0.0
        sleep = 0.0
        for i in self.injections:
            k = i.kind
            if k in ONE_SHOT:
                if self.step == i.step and self._op == i.op and self._once(f"{i.text}"):
                    self._note(i, "fired")
                    if k == "crash":
                        print(f"fault injection: rank {self.rank} crashes at step {self.step} ({i.text})",
                              file=sys.stderr, flush=True)
                        self._exit(i.code)
                        return  # only reached when exit_fn does not exit (tests)
                    print(f"fault injection: rank {self.rank} hangs at step {self.step} "
                          f"{'inside' if i.where == 'comm' else 'before'} {rec.group}#{rec.seq} {rec.op} "
                          f"({i.text})", file=sys.stderr, flush=True)
                    if i.where == "comm":
                        rec.t_enter = _now()  # entered; the op never completes
                    while True:
                        time.sleep(3600)
            elif self.step < i.step:
                continue
            elif k == "delay":
                self._note(i, "start")
                sleep += i.ms / 1e3
            elif k == "slow_compute":
                self._note(i, "start")
                sleep += min(2.0, gap * (i.factor - 1))
            elif k == "slow_link":
                a, b = i.ranks
                if a in rec.peers and b in rec.peers:
                    self._note(i, "start")
                    rec.hold_s += i.ms / 1e3
            elif k == "jitter" and self._op == 1 and self._jitter_s:
                sleep += self._jitter_s
        if sleep:
            time.sleep(sleep)
        self._last_issue = time.monotonic()


class LinkModel:
    """The slow_link fault for a whole link class: a recorder hook giving every op whose
    group (or p2p pair) crosses a slowed class the time that link would take, under the ring
    algorithms (recorder.py): one latency per ring step (all_reduce 2(n - 1), all_gather,
    reduce_scatter, all_to_all and the rest n - 1, send/recv 1) plus the bytes this rank
    puts on the wire (a recv: the bytes it receives) over the bandwidth. A collective is as
    slow as its slowest link. The observed work holds the op until then (collectives.py:
    `link_s` after it completes when its caller waited for it, else from when it was
    entered, so an op overlapped with compute hides as it would on the real link).
    `link_of(ranks)` names the class; `links`: class -> (latency s, bytes/s or None)."""

    def __init__(self, link_of: Callable[[tuple], str], links: dict):
        self.link_of, self.links = link_of, dict(links)

    def seconds(self, rec: CollectiveRecord) -> float:
        spec = self.links.get(self.link_of(rec.peers))
        if spec is None or rec.kind == "barrier" and len(rec.peers) < 2:
            return 0.0
        from .recorder import wire_bytes

        latency, bps = spec
        n = len(rec.peers)
        if rec.kind == "send_recv":
            steps, wire = 1, rec.nbytes
        else:
            steps = 2 * (n - 1) if rec.kind == "all_reduce" else n - 1
            wire = wire_bytes(rec.kind, rec.op, rec.nbytes, n)
        return steps * latency + (wire / bps if bps else 0.0)

    def hook(self, rec: CollectiveRecord) -> None:
        rec.link_s = self.seconds(rec)
