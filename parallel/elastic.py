"""DiLoCo over replicas that leave and join: `ElasticReplicaComm`, the outer loop's
ReplicaComm over a changing membership (fault/membership.py, torchft underneath).

Each replica is its own job with its own inner mesh; ranks holding the same shard in
every replica meet in torchft's reconfigurable gloo group, rebuilt for each quorum. A
round (one outer step of parallel/diloco.py):
  1. quorum: the replicas present now (a replica that died is dropped after the
     lighthouse's heartbeat timeout; one waiting to join is in);
  2. status: every replica's (outer steps applied, trainer step, lineage) gathered; the
     source is the lowest-index replica with the most outer steps (then the latest step);
     every replica behind it or apart from it receives the source's outer state (global
     parameters, momentum, counters) from that one source, shard by shard over
     point-to-point sends, and starts from its global parameters. Behind: a joiner, one
     restarted from an older checkpoint, a straggler that the others' quorum left out of a
     round (the trainer then goes on from the source's step). Apart: same counts, but
     another lineage, a CRC of the quorum ids its state went through: two replicas that
     averaged in different quorums (torchft's lighthouse forms a quorum without a live
     replica that is over its join timeout late, e.g. when a joiner was already waiting)
     hold different global parameters under the same counts. A healed replica's
     pseudo-gradient weighs 0 until it has trained a whole round from the healed state;
  3. the norms and the average of parallel/diloco.py.
Any collective that fails because a member left (connection reset, timeout) fails the
round on that rank; the replica's ranks agree (all-reduce over the replica's own group)
and run the whole round again on the next quorum, with the same pseudo-gradients: no
inner step is lost, and a joiner whose source died during the transfer heals from
another live replica. The exchange's bytes are counted by the collective recorder under
the `diloco` group (torchft's group is not an observed one).
"""
from __future__ import annotations

import json
import zlib

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import AllgatherOptions, AllToAllOptions

from .diloco import TwoPhaseAverage, replica_norms

try:
    from dist_train.fault.recorder import wire_bytes
except ImportError:  # pragma: no cover
    wire_bytes = None


def heal_plan(applied: list[float], steps: list[float], lineage: list[float]) -> tuple[int, list[int]]:
    """(source, the replicas that take its outer state) from every replica's status: the
    source is the lowest index with the most outer steps applied, then the latest step;
    behind or apart from it is any replica with fewer, an earlier step or another lineage."""
    top = max(applied)
    latest = max(s for a, s in zip(applied, steps) if a == top)
    source = min(r for r in range(len(applied)) if applied[r] == top and steps[r] == latest)
    behind = [r for r in range(len(applied)) if r != source and (
        applied[r] < top or steps[r] < latest or lineage[r] != lineage[source])]
    return source, behind


class PGOps:
    """The exchange's collectives on a bare torchft process group, each recorded (count,
    bytes, wire bytes) under the recorder's `diloco` group."""

    def __init__(self, membership, recorder=None, delay_s: float = 0.0):
        self.m, self.recorder, self.delay_s = membership, recorder, delay_s  # delay: a drill's slow link
        self._st = recorder.add_group((0,), "diloco") if recorder is not None else None
        if self._st is not None:
            self._st.gid = "torchft-diloco"

    @property
    def size(self) -> int:
        return self.m.current.size

    @property
    def rank(self) -> int:
        return self.m.current.index

    def _run(self, op: str, kind: str, nbytes: int, fn, wire: int | None = None, peer: int | None = None):
        if self.delay_s:
            import time

            time.sleep(self.delay_s)
        rec = None
        if self._st is not None:
            peers = None if peer is None else ((self.rank, peer) if op == "send" else (peer, self.rank))
            rec = self.recorder.begin(self._st, op, kind, nbytes, peers=peers, p2p_peer=peer,
                                      wire=wire if wire is not None else wire_bytes(kind, op, nbytes, self.size))
        try:
            work = fn()
        except BaseException as e:
            if rec is not None:
                self._st.fail(rec, e)
            raise
        return _Recorded(work, self._st, rec)

    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor):
        opts = AllToAllOptions()
        return self._run("alltoall_base", "all_to_all", inp.nbytes,
                         lambda: self.m.pg.alltoall_base(out, inp, [], [], opts),
                         wire=inp.nbytes - inp.nbytes // self.size)

    def all_gather(self, out: torch.Tensor, inp: torch.Tensor):
        opts = AllgatherOptions()
        return self._run("allgather", "all_gather", out.nbytes,
                         lambda: self.m.pg.allgather([list(out.chunk(self.size))], [inp], opts))

    def send(self, t: torch.Tensor, dst: int):
        return self._run("send", "send_recv", t.nbytes, lambda: self.m.pg.send([t], dst, 0), peer=dst)

    def recv(self, t: torch.Tensor, src: int):
        return self._run("recv", "send_recv", t.nbytes, lambda: self.m.pg.recv([t], src, 0), peer=src)


class _Recorded:
    """A torchft Work whose wait() closes its record."""

    def __init__(self, work, st, rec):
        self.work, self.st, self.rec = work, st, rec

    def wait(self):
        try:
            out = self.work.wait()
        except BaseException as e:
            if self.rec is not None:
                self.st.fail(self.rec, e)
            raise
        if self.rec is not None:
            self.st.end(self.rec)
        return out


class ShapeRefused(Exception):
    """This replica's shape differs from the running replicas' (the message names the field)."""


class _OtherShape(RuntimeError):
    """A replica of another shape is in this round (it refuses itself and leaves): run the
    round again without it."""


class ElasticReplicaComm:
    """ReplicaComm over a changing membership (module docstring). `inner_group` is this
    rank's own replica (its job's process group). `shape` names the numbers every replica
    must share ({"parallel.tp": 2, "model.dim": 64, ...}): rank r of each replica must hold
    the same shard, so a joiner of another shape is refused, naming the field."""

    RETRY = (RuntimeError, ConnectionError, TimeoutError, OSError)

    def __init__(self, membership, inner_group, replica_id: str, *, recorder=None, log=print, delay_s: float = 0.0,
                 shape: dict[str, int] | None = None):
        self.m, self.inner, self.replica_id = membership, inner_group, replica_id
        self.shape = dict(shape or {})
        self.ops = PGOps(membership, recorder, delay_s)
        self.log = log
        self.joining = False  # set by OuterLoop.join: this replica's first round contributes nothing
        self.fresh = False    # healed and not yet through a whole round: weight 0

    @property
    def size(self) -> int:
        return self.m.current.size if self.m.current else 1

    @property
    def index(self) -> int:
        return self.m.current.index if self.m.current else 0

    def begin_round(self, outer, step: int) -> list[float]:
        """Quorum, status, healing (module docstring); every replica's weight factor: 0 for
        one healed (or joining) in this round, 1 for the others."""
        q = self.m.quorum()
        self.log(f"DiLoCo: replica {self.replica_id} step {step}: outer round with {q.size} replica(s)")
        fresh = self.fresh or self.joining
        status = torch.tensor([float(outer.applied_updates), float(step), float(fresh), float(outer.lineage),
                               *map(float, self.shape.values())], dtype=torch.float64)  # a CRC32 is exact in fp64
        width = status.numel()
        every = torch.empty(self.size * width, dtype=torch.float64).view(self.size, width)
        self.ops.all_gather(every.view(-1), status).wait()
        applied, steps, fresh_of, lineage = (every[:, i].tolist() for i in range(4))
        self._check_shape(every[:, 4:], fresh_of)
        source, behind = heal_plan(applied, steps, lineage)
        if self.index == source:
            for r in behind:
                self.log(f"DiLoCo: replica {self.replica_id} step {step}: sending its outer state to the replica at "
                         f"index {r} of the quorum (it is behind)")
                self._send_state(outer, step, r)
        elif self.index in behind:
            self._receive_state(outer, source)
            self.fresh = True
        return [0.0 if (r in behind or fresh_of[r]) else 1.0 for r in range(self.size)]

    def round_done(self, outer) -> None:
        """The round succeeded on every rank of this replica: one that healed (or joined) in
        it trains a whole round from there, and counts at the next round; the global state
        went through this quorum (every member's lineage takes the same next value)."""
        self.fresh = self.joining = False
        q = self.m.current
        outer.lineage = zlib.crc32(f"{q.quorum_id}/{q.size}".encode(), outer.lineage)

    def _check_shape(self, shapes: torch.Tensor, fresh_of: list[float]) -> None:
        """Compare every replica's shape with the reference one (the lowest-index replica
        that is not joining, else index 0): a joiner that differs refuses itself; the others
        run the round again once it has left."""
        ref = next((r for r in range(self.size) if not fresh_of[r]), 0)
        for r in range(self.size):
            diff = [(name, int(shapes[r, i]), int(shapes[ref, i])) for i, name in enumerate(self.shape)
                    if shapes[r, i] != shapes[ref, i]]
            if not diff:
                continue
            if r == self.index:
                name, mine, theirs = diff[0]
                raise ShapeRefused(f"replica {self.replica_id}: {name} = {mine} here, but the running replicas have "
                                   f"{theirs}; every replica needs the same model and inner layout (rank r holds the "
                                   f"same shard in each); start it with --set {name}={theirs}")
            raise _OtherShape(f"the replica at index {r} of the quorum has another shape ({diff[0][0]})")

    def _send_state(self, outer, step: int, dst: int) -> None:
        meta = json.dumps({**outer.heal_meta(step), "replica_id": self.replica_id}).encode()
        header = torch.tensor([len(meta), zlib.crc32(meta)], dtype=torch.int64)
        self.ops.send(header, dst).wait()
        self.ops.send(torch.frombuffer(bytearray(meta), dtype=torch.uint8), dst).wait()
        for t in outer.heal_tensors():
            self.ops.send(t.contiguous(), dst).wait()

    def _receive_state(self, outer, src: int) -> None:
        header = torch.empty(2, dtype=torch.int64)
        self.ops.recv(header, src).wait()
        raw = torch.empty(int(header[0]), dtype=torch.uint8)
        self.ops.recv(raw, src).wait()
        meta = bytes(raw.tolist())
        if zlib.crc32(meta) != int(header[1]):
            raise ConnectionError("the outer state received from the source replica is damaged")
        meta = json.loads(meta)
        tensors = [torch.empty_like(t) for t in outer.heal_tensors()]
        for t in tensors:
            self.ops.recv(t, src).wait()
        outer.receive_heal(tensors, meta, source=meta["replica_id"])
        self.log(f"DiLoCo: replica {self.replica_id} healed from replica {meta['replica_id']} at step {meta['step']} "
                 f"(outer step {meta['applied_updates']})")

    def agree(self, ok: bool) -> bool:
        """Whether every rank of this replica saw the round succeed."""
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
        if self.inner is not None and dist.get_world_size(self.inner) > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.inner)
        return bool(flag.item())

    def replica_norms(self, local_sq: float) -> list[float]:
        return replica_norms(self.ops, self.inner, local_sq)

    def average(self, flat, weight, total_weight, quantize, deferred=None) -> TwoPhaseAverage:
        return TwoPhaseAverage(flat, weight, total_weight, quantize, self.ops, deferred)
