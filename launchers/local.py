"""`dist-train local`: N simulated ranks on this machine through torch's elastic launcher.

This is the engine behind torchrun (`torch.distributed.launcher.api.elastic_launch`), so
the workers see exactly torchrun's environment and run `python -m dist_train train`.
`--nodes K` starts K launcher agents, each owning N/K workers and meeting through the
c10d rendezvous like real nodes; every worker then sees LOCAL_WORLD_SIZE = N/K, which is
what node-aware code (hierarchical all-to-all, C4 link naming) keys on.
"""
from __future__ import annotations

import multiprocessing
import os
import socket
import sys
import uuid

from dist_train.errors import UserError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_args(config_path: str | None, overrides: list[str], runs_file: str | None) -> tuple[str, ...]:
    args = ["-m", "dist_train", "train"]
    if config_path:
        args.append(str(config_path))
    for o in overrides:
        args += ["--set", o]
    if runs_file:
        args += ["--runs", str(runs_file)]
    return tuple(args)


def _run_agent(node_rank: int, nodes: int, per_node: int, port: int, run_id: str, max_restarts: int,
               worker_args: tuple[str, ...]) -> None:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=nodes, max_nodes=nodes, nproc_per_node=per_node, run_id=run_id,
        rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{port}",
        rdzv_configs={"is_host": node_rank == 0, "last_call_timeout": 1},
        max_restarts=max_restarts, monitor_interval=0.1, local_addr="127.0.0.1",
    )
    try:
        elastic_launch(config, entrypoint=sys.executable)(*worker_args)
    except ChildFailedError as e:
        # the rank that failed first is the culprit; the agent then terminated the others
        rank, first = min(e.failures.items(), key=lambda kv: (kv[1].timestamp, kv[0]))
        raise UserError(f"{len(e.failures)} rank(s) failed; rank {rank} failed first, with exit code "
                        f"{first.exitcode} (its message is printed above)") from None


def _agent_process(*args) -> None:
    try:
        _run_agent(*args)
    except UserError as e:
        print(f"dist-train: error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


def launch_local(config_path: str | None, overrides: list[str], nproc: int, nodes: int = 1,
                 max_restarts: int = 0, runs_file: str | None = None) -> None:
    """Run the training job on `nproc` local ranks as `nodes` simulated nodes."""
    if nproc < 1:
        raise UserError(f"--nproc {nproc}: must be at least 1")
    if nodes < 1 or nproc % nodes:
        raise UserError(f"--nodes {nodes}: must divide --nproc {nproc} (each node gets the same number of ranks)")
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    per_node, port, run_id = nproc // nodes, free_port(), f"local-{uuid.uuid4().hex[:8]}"
    worker_args = _worker_args(config_path, overrides, runs_file)
    if nodes == 1:
        _run_agent(0, 1, per_node, port, run_id, max_restarts, worker_args)
        return
    ctx = multiprocessing.get_context("spawn")
    agents = [ctx.Process(target=_agent_process, args=(i, nodes, per_node, port, run_id, max_restarts, worker_args))
              for i in range(nodes)]
    for a in agents:
        a.start()
    for a in agents:
        a.join()
    if any(a.exitcode for a in agents):
        raise UserError(f"the job failed on {sum(1 for a in agents if a.exitcode)} of {nodes} simulated nodes")
