"""Glue between the trainer and `dist_train.fault`: build a rank's C4 monitor from the config.

Kept out of trainer.py so the trainer only calls `step_begin`/`step_end`/`busy`/`close`;
with `[c4] enabled = false` and no `[fault]` injections it gets a `NullMonitor` and a
step costs nothing extra.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from datetime import timedelta

from dist_train.fault.wire import DETECTOR_ENV, STORE_ENV  # set by a launcher that hosts the watcher

from .config import Config
from .distributed import job_attempt


def settings_of(cfg: Config):
    from dist_train.fault.settings import C4Settings

    return C4Settings.from_dict({k: v for k, v in dataclasses.asdict(cfg.c4).items() if k != "enabled"})


class NullMonitor:
    """What the trainer holds when C4 is off and nothing is injected: every call a no-op."""

    findings_count = None  # no `c4_findings` in the metrics

    def step_begin(self, step: int) -> None:
        pass

    def step_end(self, step: int, step_time: float) -> None:
        pass

    @contextlib.contextmanager
    def busy(self, what: str):
        yield

    def close(self) -> None:
        pass


def start_monitor(cfg: Config, env, recorder, device, log):
    """The rank's Monitor, or a NullMonitor when C4 is off and nothing is injected."""
    if not (cfg.c4.enabled or cfg.fault.inject):
        return NullMonitor()
    from dist_train.fault.publisher import Monitor

    store = None
    publish = cfg.c4.enabled and env.world_size > 1
    if publish:
        import torch.distributed as dist

        # A store that outlives every rank: `dist-train local` names its rendezvous store
        # (hosted by the launcher, where the detector runs); under torchrun the agent's
        # shared store the ranks already meet through (MASTER_ADDR/PORT, agent-hosted).
        addr, port = os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
        if os.environ.get(STORE_ENV):
            addr, port = os.environ[STORE_ENV].rsplit(":", 1)
        store = dist.TCPStore(addr, int(port), is_master=False, timeout=timedelta(seconds=30))
    elif cfg.c4.enabled and env.rank == 0:
        log("C4: one rank, nothing to compare; monitoring off")
    health = None
    if publish:
        from dist_train.fault.health import gpu_health

        health = gpu_health(env.local_rank, device.type == "cuda", log if env.local_rank == 0 else (lambda m: None))
    mode = cfg.c4.detector
    if mode == "auto":
        mode = "launcher" if os.environ.get(DETECTOR_ENV) == "launcher" else "ranks"
    return Monitor(recorder, store, rank=env.rank, world=env.world_size,
                   attempt=job_attempt(), run_dir=str(cfg.run_dir),
                   settings=settings_of(cfg), injections=cfg.fault.inject, publish=publish,
                   detect_here=publish and mode == "ranks", health=health)
