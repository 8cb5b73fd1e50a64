"""DiLoCo: replicas that train on their own for H inner steps, then average their
pseudo-gradients (global minus local parameters) and take one outer Nesterov step
(Douillard et al. 2023, "DiLoCo: Distributed Low-Communication Training of Language
Models"; INTELLECT-1 trained 10B parameters this way across continents, 400x less
bandwidth than data parallelism at H = 100 with int8 pseudo-gradients).

Mechanisms only: `OuterLoop` is handed the parameters this rank holds, grouped in
fragments, and a `ReplicaComm`; it knows no model. Per local parameter (a shard: FSDP's,
TP's, a pipeline stage's, an expert shard) it keeps the global copy and the outer momentum
in fp32, on the device or offloaded to the CPU, so any inner layout composes: only ranks
holding the same shard (the same coordinate in every replica) exchange.

- Schedule: fragment f syncs after the inner steps s with s % H == f * H / F. F = 1 is
  plain DiLoCo; F > 1 is Streaming DiLoCo (Douillard et al. 2025, "Streaming DiLoCo with
  overlapping communication"): one layer-contiguous fragment at a time, so the largest
  sync moves 1/F of the parameters.
- Exchange (`MeshReplicaComm`): two phases, an all_to_all that hands rank j of the
  replica group its chunk of every replica's payload, a sum in fp32 in replica order, then
  an all_gather of the averaged chunks. Every replica ends with the same bits (the same
  rank sums each chunk), and the wire bytes equal a ring all-reduce's, 2(n-1)/n of the
  payload. The payload is fp32, bf16, or int8 with a per-block scale
  (kernels/quantize.py): 0.254 of fp32.
- Overlap (streaming only): a fragment's exchange is issued after its sync step and runs
  while the next inner steps compute, one phase per step; its outer update is applied two
  steps later, and the fragment's local parameters become mix x local + (1 - mix) x the
  new global ones (Streaming DiLoCo's merge; mix = 0 adopts the global ones).
- Sanity checks (what arrives): each replica's pseudo-gradient norm is shared first; a
  non-finite one, or one more than `reject_factor` x the running median of past accepted
  norms, is rejected for that outer step (weight 0; the mean is taken over the rest) and
  reported with the replica named. If every replica is rejected the fragment skips the
  outer step and goes back to its global parameters.

Why our own rather than torchft's DiLoCo: the exchange must be quantised on the CPU and
counted by the collective recorder on the mesh's own groups, and a round must survive a
member leaving (the elastic version keeps the pseudo-gradients and retries on a smaller
quorum); see the elastic ReplicaComm.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
import torch.distributed as dist

QUANTIZE = ("none", "bf16", "int8")
HISTORY = 16  # accepted pseudo-gradient norms kept per fragment for the running median


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


# ----------------------------------------------------------------------------- the exchange


class Exchange(Protocol):
    """An average in flight: `advance()` moves it on by at most one phase without blocking
    past that phase; `wait()` finishes it; `result` is the averaged flat fp32 vector."""

    done: bool
    result: torch.Tensor | None

    def advance(self) -> None: ...

    def wait(self) -> torch.Tensor: ...


class ReplicaComm(Protocol):
    """The outer loop's cross-replica traffic. `MeshReplicaComm` is the fixed set of
    replicas of one job (the `diloco` mesh dim); `ElasticReplicaComm` (parallel/elastic.py)
    implements it again over a membership that changes. A round: `begin_round` (who takes
    part; heal those behind), `replica_norms`, `average`, then `agree` (every rank of this
    replica saw the round succeed; else all retry it, on the failures in `RETRY`)."""

    RETRY: tuple  # exception types that mean "a member left: run the round again"

    @property
    def size(self) -> int: ...  # replicas taking part

    @property
    def index(self) -> int: ...  # this replica's position among them

    def begin_round(self, outer: "OuterLoop", step: int) -> list[float]: ...  # every replica's weight factor

    def agree(self, ok: bool) -> bool: ...

    def round_done(self, outer: "OuterLoop") -> None: ...  # the round succeeded on every rank

    def replica_norms(self, local_sq: float) -> list[float]: ...

    def average(self, flat: torch.Tensor, weight: float, total_weight: float, quantize: str,
                deferred: Callable | None = None) -> Exchange: ...


class GroupOps:
    """The collectives an exchange needs, on a torch.distributed group (the mesh's)."""

    def __init__(self, group):
        self.group = group

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor):
        return dist.all_to_all_single(out, inp, group=self.group, async_op=True)

    def all_gather(self, out: torch.Tensor, inp: torch.Tensor):
        return dist.all_gather_single(out, inp, group=self.group, async_op=True)


class MeshReplicaComm:
    """Replicas of one job: `replica_group` links the ranks holding the same shard in every
    replica (the mesh's `diloco` dim); `inner_group` is this rank's replica (to sum the
    norms of its shards). Members never change, so nothing is retried."""

    RETRY: tuple = ()  # failures worth a new round: none (a lost rank ends the job)
    joining = False

    def __init__(self, replica_group, inner_group):
        self.ops, self.inner_group = GroupOps(replica_group), inner_group

    @property
    def size(self) -> int:
        return self.ops.size

    @property
    def index(self) -> int:
        return self.ops.rank

    def begin_round(self, outer: "OuterLoop", step: int) -> list[float]:
        """Before an outer step's exchange; every replica's weight factor (all 1 here)."""
        return [1.0] * self.size

    def agree(self, ok: bool) -> bool:
        return ok

    def round_done(self, outer: "OuterLoop") -> None:
        pass

    def replica_norms(self, local_sq: float) -> list[float]:
        return replica_norms(self.ops, self.inner_group, local_sq)

    def average(self, flat: torch.Tensor, weight: float, total_weight: float, quantize: str,
                deferred: Callable | None = None) -> "TwoPhaseAverage":
        return TwoPhaseAverage(flat, weight, total_weight, quantize, self.ops, deferred)


def replica_norms(ops, inner_group, local_sq: float) -> list[float]:
    """Each replica's pseudo-gradient norm: this rank's squared norm summed over its
    replica, then gathered over the replicas."""
    sq = torch.tensor([local_sq], dtype=torch.float64)
    if inner_group is not None and dist.get_world_size(inner_group) > 1:
        dist.all_reduce(sq, group=inner_group)
    out = torch.empty(ops.size, dtype=torch.float64)
    ops.all_gather(out, sq).wait()
    return [float(x.sqrt()) for x in out]


class TwoPhaseAverage:
    """sum_r weight_r x flat_r / total_weight over the replicas, as all_to_all + fp32 sum +
    all_gather (module docstring) through `ops`. Phase 0: payload issued; 1: chunks
    summed, averaged chunk issued; 2: done."""

    def __init__(self, flat: torch.Tensor, weight: float, total_weight: float, quantize: str, ops,
                 deferred: Callable | None = None):
        if quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {QUANTIZE}, got {quantize!r}")
        self.n, self.quantize, self.ops, self.total = ops.size, quantize, ops, total_weight
        self.numel = flat.numel()
        self.deferred = deferred  # the recorder's context for ops waited later (C4 ignores them until then)
        self.done, self.result = False, None
        x = flat.float() * weight
        if self.n == 1:
            self.done, self.result = True, x / total_weight
            return
        from dist_train.kernels.quantize import BLOCK

        unit = self.n * (BLOCK if quantize == "int8" else 1)
        padded = torch.zeros(-(-self.numel // unit) * unit, dtype=torch.float32, device=flat.device)
        padded[:self.numel] = x
        self.chunk = padded.numel() // self.n
        self._works = self._issue_scatter(padded)
        self.phase = 0

    # payloads: (tensors to send) and how to read them back into fp32
    def _encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.quantize == "int8":
            from dist_train.kernels import quantize_int8

            return list(quantize_int8(x))
        return [x.bfloat16() if self.quantize == "bf16" else x]

    def _decode(self, parts: list[torch.Tensor]) -> torch.Tensor:
        if self.quantize == "int8":
            from dist_train.kernels import dequantize_int8

            return dequantize_int8(parts[0].contiguous(), parts[1].contiguous())
        return parts[0].float()

    def _ctx(self):
        import contextlib

        return self.deferred() if self.deferred is not None else contextlib.nullcontext()

    def _issue_scatter(self, padded: torch.Tensor):
        self._send = self._encode(padded)
        self._recv = [torch.empty_like(t) for t in self._send]
        with self._ctx():
            return [self.ops.all_to_all(r, s) for r, s in zip(self._recv, self._send)]

    def advance(self) -> None:
        if self.done:
            return
        for w in self._works:
            w.wait()
        if self.phase == 0:
            # self._recv holds, in replica order, every replica's chunk that this rank sums
            per_replica = [self._decode([t.view(self.n, -1)[r] for t in self._recv]) for r in range(self.n)]
            mine = per_replica[0].clone()
            for y in per_replica[1:]:
                mine += y
            mine /= self.total
            send = self._encode(mine)
            self._gathered = [torch.empty(self.n * t.numel(), dtype=t.dtype, device=t.device) for t in send]
            with self._ctx():
                self._works = [self.ops.all_gather(g, s) for g, s in zip(self._gathered, send)]
            self.phase = 1
        else:
            self.result = self._decode(self._gathered)[:self.numel]
            self.done, self._works, self._gathered, self._recv, self._send = True, [], None, None, None

    def wait(self) -> torch.Tensor:
        while not self.done:
            self.advance()
        return self.result


# ----------------------------------------------------------------------------- the outer loop


@dataclass
class Rejection:
    step: int
    fragment: int
    replica: int
    norm: float
    why: str


@dataclass
class _InFlight:
    fragment: int
    step: int
    apply_at: int
    exchange: Exchange | None = None
    result: list[torch.Tensor] | None = None  # per parameter, once the exchange finished


@dataclass
class OuterStats:
    """What the trainer reports per step."""
    outer_step: int = 0
    synced: list[int] = field(default_factory=list)      # fragments whose exchange started this step
    applied: list[int] = field(default_factory=list)     # fragments whose outer update was applied
    rejected: list[Rejection] = field(default_factory=list)
    replicas: int = 1
    retries: list[str] = field(default_factory=list)     # rounds run again because a member left, and why
    healed_from: str | None = None                       # the replica this one healed from, on the step it did
    healed_step: int | None = None                       # the source's step then (a straggler goes on from it)


class _Done:
    """An exchange already finished (the result is in hand)."""

    done = True

    def __init__(self, result: torch.Tensor):
        self.result = result

    def advance(self) -> None:
        pass

    def wait(self) -> torch.Tensor:
        return self.result


class OuterLoop:
    """DiLoCo's outer optimiser over this rank's parameters (module docstring).
    `fragments[f]` lists the (name, parameter) pairs of fragment f held here (maybe none)."""

    def __init__(self, fragments: list[list[tuple[str, torch.Tensor]]], comm: ReplicaComm, *, inner_steps: int,
                 outer_lr: float, momentum: float, quantize: str = "none", overlap: bool = False, mix: float = 0.0,
                 offload: bool = False, reject_factor: float = 0.0, deferred: Callable | None = None,
                 tamper: Callable[[int, torch.Tensor], torch.Tensor] | None = None):
        """`deferred`: the recorder's context for ops waited later; `tamper(step, flat)`: a
        drill's fault, applied to this rank's pseudo-gradient before it is checked and sent."""
        self.fragments, self.comm = fragments, comm
        self.tamper = tamper
        self.H, self.lr, self.mu = inner_steps, outer_lr, momentum
        self.quantize, self.overlap, self.mix, self.reject_factor = quantize, overlap, mix, reject_factor
        self.deferred = deferred
        F = len(fragments)
        self.offsets = [f * inner_steps // F for f in range(F)]
        self.where = torch.device("cpu") if offload else None
        self.params = {name: p for frag in fragments for name, p in frag}
        with torch.no_grad():
            self.global_ = {n: self._store(_local(p)) for n, p in self.params.items()}
            self.momentum = {n: torch.zeros_like(g) for n, g in self.global_.items()}
        self.history: list[list[float]] = [[] for _ in range(F)]
        self.applied_updates = 0  # fragment updates applied; outer_step = this // F
        self.lineage = 0  # elastic: which quorums the global state went through (parallel/elastic.py)
        self.in_flight: list[_InFlight] = []
        self.stats = OuterStats(replicas=comm.size)
        self.weight_factor = 1.0  # 0 for a replica that has not trained a whole round since it healed

    def _store(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(device=self.where or t.device, dtype=torch.float32, copy=True)

    @property
    def outer_step(self) -> int:
        return self.applied_updates // len(self.fragments)

    # ---- the schedule ---------------------------------------------------------------------
    def digest(self) -> int:
        """CRC32 of this rank's global parameters and momentum: ranks holding the same shard
        in every replica must agree bit for bit after each outer step."""
        import zlib

        crc = 0
        for t in (*self.global_.values(), *self.momentum.values()):
            crc = zlib.crc32(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes(), crc)
        return crc

    def after_step(self, step: int) -> OuterStats:
        """Call after every inner optimizer step (1-based): progresses exchanges in flight,
        applies those due, starts the fragments scheduled at this step."""
        self.stats = OuterStats(replicas=self.comm.size)
        for job in list(self.in_flight):
            if job.exchange is not None and not job.exchange.done:
                job.exchange.advance()
            if step >= job.apply_at:
                self._finish(job)
        for f, offset in enumerate(self.offsets):
            if step % self.H == offset:
                self._start(f, step)
        self.stats.outer_step = self.outer_step
        return self.stats

    def _start(self, f: int, step: int) -> None:
        names = [n for n, _ in self.fragments[f]]
        with torch.no_grad():
            deltas = [self.global_[n] - _local(self.params[n]).to(self.global_[n].device, torch.float32)
                      for n in names]
            flat = torch.cat([d.reshape(-1) for d in deltas]) if deltas else torch.zeros(0)
        if self.tamper is not None:
            flat = self.tamper(step, flat)
        local_sq = float(flat.double().square().sum()) if deltas else 0.0
        self.stats.synced.append(f)
        while True:  # a round: run again, on the same pseudo-gradients, while members leave during it
            ok, result = False, None
            try:
                factors = self.comm.begin_round(self, step)
                weight, total, accepted, rejected = self._weights(f, step, self.comm.replica_norms(local_sq), factors)
                if total:
                    exchange = self.comm.average(flat, weight, total, self.quantize, self.deferred)
                    result = exchange if self.overlap else exchange.wait()
                ok = True
            except self.comm.RETRY as e:
                self.stats.retries.append(f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
            if self.comm.agree(ok):
                break
        self.comm.round_done(self)
        self.stats.replicas = self.comm.size
        self.stats.rejected += rejected
        self.history[f] = (self.history[f] + accepted)[-HISTORY:]
        if not total:  # every replica rejected: back to the global parameters, no outer step
            self._adopt(names, mix=0.0)
            return
        job = _InFlight(f, step, step + (2 if self.overlap else 0))
        if self.overlap:
            job.exchange = result
            self.in_flight.append(job)
        else:
            job.exchange = _Done(result)
            self._finish(job)

    def _weights(self, f: int, step: int, norms: list[float], factors: list[float]) -> tuple[float, float, list, list]:
        """(this replica's weight, the sum of all weights, the accepted norms, the
        rejections) from every replica's pseudo-gradient norm; `factors[r]` is 0 for a
        replica that has not trained a whole round from the state it healed to."""
        hist = self.history[f]
        median = statistics.median(hist) if len(hist) >= 3 else None
        accepted, rejected = [], []
        for r, norm in enumerate(norms):
            if not factors[r]:
                continue
            if norm != norm or norm in (float("inf"), float("-inf")):
                rejected.append(Rejection(step, f, r, norm, "not finite"))
            elif self.reject_factor and median is not None and norm > self.reject_factor * median:
                rejected.append(Rejection(step, f, r, norm, f"norm {norm:.4g} > {self.reject_factor:g} x the running "
                                                            f"median {median:.4g}"))
            else:
                accepted.append(r)
        weight = factors[self.comm.index] if self.comm.index in accepted else 0.0
        return weight, float(sum(factors[r] for r in accepted)), [norms[r] for r in accepted], rejected

    def join(self, step: int) -> OuterStats:
        """Take part in the live replicas' next round before this replica's first step
        (elastic membership): it heals if behind, and contributes nothing this round."""
        self.stats = OuterStats(replicas=self.comm.size)
        self.comm.joining = True
        for f in range(len(self.fragments)):
            self._start(f, step)
        self.stats.outer_step = self.outer_step
        return self.stats

    def _finish(self, job: _InFlight) -> None:
        if job.result is None:
            self._unflatten(job)
        self.in_flight = [j for j in self.in_flight if j is not job]
        names = [n for n, _ in self.fragments[job.fragment]]
        with torch.no_grad():
            for n, avg in zip(names, job.result):
                m = self.momentum[n]
                m.mul_(self.mu).add_(avg)
                self.global_[n].sub_(avg.add(m, alpha=self.mu), alpha=self.lr)  # Nesterov: g + mu * m
        self._adopt(names, mix=self.mix if self.overlap else 0.0)
        self.applied_updates += 1
        self.stats.applied.append(job.fragment)

    def _unflatten(self, job: _InFlight) -> None:
        avg = job.exchange.wait()
        out, pos = [], 0
        for n, _ in self.fragments[job.fragment]:
            g = self.global_[n]
            out.append(avg[pos:pos + g.numel()].view_as(g).to(g.device))
            pos += g.numel()
        job.result, job.exchange = out, None

    @torch.no_grad()
    def _adopt(self, names: list[str], mix: float) -> None:
        for n in names:
            local = _local(self.params[n])
            g = self.global_[n].to(local.device, local.dtype)
            if mix:
                local.mul_(mix).add_(g, alpha=1 - mix)
            else:
                local.copy_(g)

    def flush(self) -> None:
        """Finish every exchange in flight (before a checkpoint); their updates are still
        applied at their own step, so a resumed run does what an uninterrupted one does."""
        for job in self.in_flight:
            if job.result is None:
                self._unflatten(job)

    # ---- healing a replica that is behind (the elastic ReplicaComm moves these) --------------
    def heal_tensors(self) -> list[torch.Tensor]:
        """The outer state a joiner takes from a live replica, in a fixed order: every
        global parameter shard, then every momentum shard."""
        return [*self.global_.values(), *self.momentum.values()]

    def heal_meta(self, step: int) -> dict:
        return {"applied_updates": self.applied_updates, "history": self.history, "step": step,
                "lineage": self.lineage}

    def receive_heal(self, tensors: list[torch.Tensor], meta: dict, source: str) -> None:
        """Take a live replica's outer state (tensors as `heal_tensors` orders them) and start
        from its global parameters."""
        with torch.no_grad():
            for dst, src in zip(self.heal_tensors(), tensors):
                dst.copy_(src)
        self.applied_updates, self.lineage = int(meta["applied_updates"]), int(meta["lineage"])
        self.history = [list(h) for h in meta["history"]]
        self.in_flight = []
        self._adopt(list(self.params), mix=0.0)
        self.stats.healed_from, self.stats.healed_step = source, int(meta["step"])

    # ---- evaluation on the global parameters -------------------------------------------------
    def swap(self) -> None:
        """Exchange local and global parameters in place (twice restores them)."""
        with torch.no_grad():
            for n, p in self.params.items():
                local = _local(p)
                keep = local.detach().clone()
                local.copy_(self.global_[n].to(local.device, local.dtype))
                self.global_[n].copy_(keep.to(self.global_[n].device, torch.float32))

    # ---- checkpoints --------------------------------------------------------------------------
    # Two parts: `meta` (JSON: counters, the norms' history, which exchanges are in flight),
    # the same on every rank, and `tensors` (global parameters, momentum, the averaged
    # results of exchanges in flight), shaped like the parameters (DTensors where they are)
    # so a checkpoint reshards. To load: `set_meta` first, then load into `tensors()`.
    def meta(self) -> dict:
        self.flush()
        return {"applied_updates": self.applied_updates, "lineage": self.lineage,
                "history": [list(h) for h in self.history],
                "in_flight": [{"fragment": j.fragment, "step": j.step, "apply_at": j.apply_at}
                              for j in self.in_flight]}

    def set_meta(self, meta: dict) -> None:
        self.applied_updates = int(meta["applied_updates"])
        self.lineage = int(meta.get("lineage", 0))  # checkpoints before it have none: healed if it differs
        self.history = [list(h) for h in meta["history"]]
        self.in_flight = [_InFlight(j["fragment"], j["step"], j["apply_at"],
                                    result=[torch.zeros_like(self.global_[n]) for n, _ in self.fragments[j["fragment"]]])
                          for j in meta["in_flight"]]

    def tensors(self) -> dict:
        self.flush()
        flight = {f"{i}/{n}": self._like(n, t) for i, j in enumerate(self.in_flight)
                  for (n, _), t in zip(self.fragments[j.fragment], j.result)}
        return {"global": {n: self._like(n, t) for n, t in self.global_.items()},
                "momentum": {n: self._like(n, t) for n, t in self.momentum.items()}, "in_flight": flight}

    def _like(self, name: str, t: torch.Tensor):
        """`t` (this rank's part) as the parameter is: a DTensor sharing t's storage, so a
        checkpoint loaded into it lands in `t`."""
        p = self.params[name]
        if hasattr(p, "device_mesh"):
            from torch.distributed.tensor import DTensor

            return DTensor.from_local(t, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                      stride=p.stride())
        return t
