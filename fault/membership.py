"""Elastic membership of DiLoCo replicas: who is in this round, over torchft.

torchft (PyTorch's fault-tolerance project) does the membership: a Lighthouse forms a
quorum of replicas from their managers' heartbeats; one `Manager` per rank asks it for
the quorum at each outer step and reconfigures a gloo process group across the replicas
(this rank and the ranks holding the same shard in every replica in the quorum). A
replica that stops heartbeating is dropped after the lighthouse's heartbeat timeout; one
that asks to join is in the next quorum.

What we use of it and what not, and why:
- used: Lighthouse, Manager's quorum (`start_quorum(allow_heal=False)`), its
  reconfigurable `ProcessGroupGloo`;
- not its healing: per group rank r it picks the source replica (i + r) % n, so one
  joiner's ranks heal from different replicas, and a source that dies during the transfer
  fails the join (prime-diloco#156). The outer loop (parallel/diloco.py) heals every rank
  of a joiner from one source and retries from another live peer;
- not its DiLoCo: it drops the whole round of H inner steps when a member dies inside the
  outer all-reduce; ours keeps the pseudo-gradients and retries on the smaller quorum;
- not its `should_commit` (a per-step DDP protocol) nor its quantised collectives
  (Triton/CUDA only).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta


class MembershipLost(Exception):
    """No quorum could be had: the lighthouse is gone or did not answer in time."""


@dataclass
class Quorum:
    quorum_id: int
    index: int  # this replica's position among the quorum's replicas
    size: int   # replicas in the quorum


def lighthouse_url(addr: str) -> str:
    """torchft wants http://host:port; users write host:port."""
    return addr if "://" in addr else f"http://{addr}"


class Membership:
    """One rank's view of the replicas: `quorum()` at each outer step; `pg` is the process
    group across the replicas of the current quorum (this rank's shard in each)."""

    def __init__(self, lighthouse: str, replica_id: str, group_rank: int, group_world_size: int, *,
                 store_host: str, store_port: int, min_replicas: int = 1, quorum_timeout_s: float = 60.0,
                 timeout_s: float = 30.0, heartbeat_s: float = 0.1, hostname: str = "127.0.0.1"):
        from torchft import Manager, ProcessGroupGloo

        self.lighthouse, self.replica_id = lighthouse, replica_id
        self.quorum_timeout_s = quorum_timeout_s
        self.pg = ProcessGroupGloo(timeout=timedelta(seconds=timeout_s))
        self.manager = Manager(
            pg=self.pg, load_state_dict=None, state_dict=None, min_replica_size=min_replicas,
            use_async_quorum=False, timeout=timedelta(seconds=timeout_s),
            quorum_timeout=timedelta(seconds=quorum_timeout_s), connect_timeout=timedelta(seconds=timeout_s),
            rank=group_rank, world_size=group_world_size, store_addr=store_host, store_port=store_port,
            lighthouse_addr=lighthouse_url(lighthouse), replica_id=replica_id, hostname=hostname,
            heartbeat_interval=timedelta(seconds=heartbeat_s), init_sync=False)
        self.current: Quorum | None = None

    def quorum(self) -> Quorum:
        """This round's quorum (blocks until the lighthouse forms one); raises
        MembershipLost when it cannot, naming the lighthouse."""
        try:
            self.manager.start_quorum(allow_heal=False)
            index, size = self.manager.participating_rank(), self.manager.num_participants()
        except Exception as e:  # grpc errors, timeouts: torchft raises plain exceptions
            raise MembershipLost(f"no quorum from the lighthouse at {self.lighthouse} within "
                                 f"{self.quorum_timeout_s:g} s ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
        if self.manager.errored() is not None:  # the process group could not be configured: a member left
            raise ConnectionError(f"reconfiguring the cross-replica group failed: {self.manager.errored()}")
        if index is None:
            raise MembershipLost(f"replica {self.replica_id} is not in the lighthouse's quorum")
        self.current = Quorum(self.manager._quorum_id, index, size)
        return self.current

    def close(self) -> None:
        try:
            self.manager.shutdown(wait=False)
        except Exception:
            pass
