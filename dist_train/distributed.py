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


def init_distributed(env: RankEnv, device: torch.device, timeout_s: float = 600.0):
    """Join the job's process group through the observed backend; returns the recorder."""
    from dist_train.fault.collectives import get_recorder, register_observed_backend

    backend = register_observed_backend()
    kwargs = dict(backend=backend, timeout=timedelta(seconds=timeout_s), rank=env.rank, world_size=env.world_size,
                  device_id=device if device.type == "cuda" else None)
    if env.world_size == 1 and os.environ.get("MASTER_PORT") == "0":
        dist.init_process_group(store=dist.HashStore(), **kwargs)
    elif os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # Use the launcher agent's store (it outlives any rank, which the C4 detector
        # needs), under a prefix per restart: restarted workers would otherwise meet the
        # previous attempt's keys and fail to connect on gloo (pytorch issue 135712).
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), env.world_size,
                              is_master=False, timeout=timedelta(seconds=timeout_s))
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(store=dist.PrefixStore(f"dist-train/attempt-{restart}", store), **kwargs)
    else:
        dist.init_process_group(**kwargs)
    return get_recorder()
