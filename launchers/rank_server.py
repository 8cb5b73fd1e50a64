"""Ranks forked from a pre-imported server, for `dist-train local` and `dist-train drill`.

A rank that execs `python -m dist_train train` spends about 6 s of CPU importing torch,
DTensor and the trainer before it does anything; N ranks on a few cores pay that N times
per launch and again per restart. Here the agent starts its workers with Python's
`forkserver` start method instead (torch's elastic agent supports a function entrypoint
with any multiprocessing start method): the server imports torch and the trainer once,
and every rank (and every restarted rank) is a fork of it. `start()` is called first
thing in the launcher, so the server's imports overlap the launcher's own. torchrun, Ray
and sbatch launches still exec their ranks, as on a cluster.

The server is single-threaded and imports nothing that starts CUDA, so forking it is
safe on a GPU machine. It was started before the launcher set the job's environment
(the C4 store address, the simulated topology), so each rank gets the agent's
environment at launch, plus the per-rank variables the agent sets (RANK, LOCAL_RANK, ...).

Ranks so forked are children of the server, in the launcher's session (an exec'd rank
under torchrun gets a session of its own): kill a simulated node or replica by its
launcher's process group or process tree, not by command line.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
from multiprocessing import forkserver

# imported once in the server, so the ranks inherit them: torch, the trainer, and what a
# rank's first step would import (dynamo, which torch.nn.init pulls in; pyarrow and pandas
# for the shards; triton for the kernels). One that is not installed is skipped.
PRELOAD = ["torch", "torch.distributed.tensor", "torch.distributed.checkpoint", "torch.distributed.fsdp",
           "torch._dynamo", "pyarrow.ipc", "pandas", "triton", "dist_train.trainer", "dist_train.cli",
           "dist_train.launchers.rank_server"]

# the server's environment when it imported this module; what a rank's environment holds
# beyond it was set for that rank by the agent
_SERVER_ENV = dict(os.environ)


def start() -> None:
    """Start this process's fork server (idempotent), importing PRELOAD in it."""
    multiprocessing.set_forkserver_preload(PRELOAD)
    forkserver.ensure_running()


def run_rank(argv: tuple[str, ...], agent_env: dict[str, str]) -> None:
    """A rank's body (the agent's entrypoint): `dist-train ARGV` with the agent's
    environment under the per-rank variables. A non-zero exit is the rank's exit code;
    a rank still in its process group leaves through os._exit (dist_train/cli.py)."""
    rank_env = {k: v for k, v in os.environ.items() if _SERVER_ENV.get(k) != v}
    os.environ.clear()
    os.environ.update(agent_env)
    os.environ.update(rank_env)
    from dist_train.cli import main

    code = main(list(argv))
    sys.stdout.flush()
    sys.stderr.flush()
    if code:
        sys.exit(code)
