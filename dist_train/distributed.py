"""Process-group start-up for a rank that an outside launcher (torchrun, our local
launcher, Ray) already started: read the torchrun environment, register the observed
backend so every collective is recorded, and pick the device."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import UserError


@dataclass(frozen=True)
class RankEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def node(self) -> int:
        return self.rank // self.local_world_size

    @classmethod
    def from_environ(cls) -> "RankEnv":
        if "RANK" not in os.environ:
            # Run directly (python -m dist_train train): a one-rank job on this machine.
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "0"))
        try:
            return cls(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                       int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        except (KeyError, ValueError) as e:
            raise UserError(f"torchrun environment is incomplete or malformed ({e}); start with "
                            "`torchrun ... -m dist_train train CONFIG` or `dist-train local`") from None


def pick_device(env: RankEnv) -> torch.device:
    if torch.cuda.is_available():
        device = torch.device("cuda", env.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


ATTEMPT_ENV = "TORCHELASTIC_RESTART_COUNT"
JOB_ATTEMPT_ENV = "DIST_TRAIN_ATTEMPT"


def job_attempt() -> int:
    """The job's attempt as every rank agrees on it (set by init_distributed)."""
    return int(os.environ.get(JOB_ATTEMPT_ENV) or os.environ.get(ATTEMPT_ENV) or 0)


def init_distributed(env: RankEnv, device: torch.device, timeout_s: float = 600.0):
    """Join the job's process group through the observed backend; returns the recorder.

    Afterwards DIST_TRAIN_ATTEMPT (`job_attempt()`) holds the job's attempt, rank 0's restart
    count, on every rank: under multi-node torchrun each agent counts its own restarts (a node
    that joined later starts at 0), and C4's keys and the per-attempt logs need one number per
    attempt. TORCHELASTIC_RESTART_COUNT stays the local agent's, whose budget it counts."""
    from dist_train.fault.collectives import get_recorder, register_observed_backend

    backend = register_observed_backend()
    timeout = timedelta(seconds=timeout_s)
    kwargs = dict(backend=backend, timeout=timeout, rank=env.rank, world_size=env.world_size,
                  device_id=device if device.type == "cuda" else None)
    if env.world_size == 1 and os.environ.get("MASTER_PORT") == "0":
        store = dist.HashStore()
    elif os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        _check_shared_store(env)
        # Use the launcher agent's store (it outlives any rank, which the C4 detector
        # needs), under a prefix per restart: restarted workers would otherwise meet the
        # previous attempt's keys and fail to connect on gloo (pytorch issue 135712).
        agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), env.world_size,
                              is_master=False, timeout=timeout)
        store = dist.PrefixStore(f"dist-train/attempt-{os.environ.get(ATTEMPT_ENV, '0')}", agent)
    else:
        store = _master_store(env, timeout)
    dist.init_process_group(store=store, **kwargs)
    if env.rank == 0:
        store.set("dist-train/attempt", os.environ.get(ATTEMPT_ENV, "0"))
    os.environ[JOB_ATTEMPT_ENV] = store.get("dist-train/attempt").decode()
    return get_recorder()


def _master_store(env: RankEnv, timeout: timedelta):
    """What init_process_group's env:// would open: rank 0 hosts at MASTER_ADDR:MASTER_PORT."""
    try:
        addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    except (KeyError, ValueError) as e:
        raise UserError(f"MASTER_ADDR / MASTER_PORT missing or malformed ({e}); start with torchrun, "
                        "`dist-train local` or `dist-train ray`") from None
    return dist.TCPStore(addr, port, env.world_size, is_master=env.rank == 0, timeout=timeout)


def _check_shared_store(env: RankEnv) -> None:
    """Multi-node torchrun sharing its rendezvous store with the ranks cannot restart: each
    agent numbers its own restarts, so the per-restart prefixes of two nodes need not match
    (and without them restarted ranks meet stale keys; pytorch issue 135712)."""
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
    if nodes > 1 and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
        raise UserError(f"torchrun on {nodes} nodes with --max-restarts shares its rendezvous store with the "
                        "ranks, so a restarted job could not connect (pytorch issue 135712); set "
                        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment on every node "
                        "(`dist-train sbatch` does)")
