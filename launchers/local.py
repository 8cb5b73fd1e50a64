"""`dist-train local`: N simulated ranks on this machine through torch's elastic launcher.

This is the engine behind torchrun (`torch.distributed.launcher.api.elastic_launch`), so
the workers see exactly torchrun's environment and run `python -m dist_train train`.
`--nodes K` starts K launcher agents, each owning N/K workers and meeting through the
c10d rendezvous like real nodes; every worker then sees LOCAL_WORLD_SIZE = N/K, which is
what node-aware code (hierarchical all-to-all, C4 link naming) keys on.
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import socket
import sys
import threading
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


class _ExitLog(logging.Handler):
    """Hands the elastic agent's "failed (exitcode ...) (pid ...)" to the C4 watcher (a crash)."""

    def __init__(self, watcher):
        super().__init__(logging.ERROR)
        self.watcher = watcher

    def emit(self, record):
        args = record.args if isinstance(record.args, tuple) else ()
        if str(record.msg).startswith("failed (exitcode") and len(args) >= 3:
            try:
                self.watcher.note_exit(int(args[2]), args[0])
            except Exception:
                pass


@contextlib.contextmanager
def c4_watch(port: int, nproc: int, sigstops=(), enabled: bool = True):
    """Run the C4 detector in this (launcher) process against the agent's store for the
    whole launch: it outlives every rank and every restart. Yields the Watcher (or None)."""
    if not enabled:
        yield None
        return
    from datetime import timedelta

    import torch.distributed as dist
    from dist_train.fault.watcher import Watcher

    from dist_train.c4 import DETECTOR_ENV, STORE_ENV

    os.environ[DETECTOR_ENV] = "launcher"
    os.environ[STORE_ENV] = f"127.0.0.1:{port}"  # the rendezvous store this launcher hosts
    watcher = Watcher(None, nproc, sigstops=list(sigstops))
    stop = threading.Event()

    def run():
        while not stop.is_set():  # the agent starts hosting the store a moment after launch
            try:
                store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=5))
                break
            except Exception:
                stop.wait(0.2)
        else:
            return
        watcher.store = store
        watcher.run(stop)

    handler = _ExitLog(watcher)
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addHandler(handler)
    thread = threading.Thread(target=run, name="c4-detector", daemon=True)
    thread.start()
    try:
        yield watcher
    finally:
        stop.set()
        thread.join(timeout=5)
        logging.getLogger("torch.distributed.elastic.multiprocessing.api").removeHandler(handler)
        os.environ.pop(DETECTOR_ENV, None)
        os.environ.pop(STORE_ENV, None)


def launch_local(config_path: str | None, overrides: list[str], nproc: int, nodes: int = 1,
                 max_restarts: int = 0, runs_file: str | None = None, c4: bool = False,
                 sigstops=()) -> list[dict]:
    """Run the training job on `nproc` local ranks as `nodes` simulated nodes. With `c4`
    (or SIGSTOP drills) the C4 detector runs here; returns its findings."""
    if nproc < 1:
        raise UserError(f"--nproc {nproc}: must be at least 1")
    if nodes < 1 or nproc % nodes:
        raise UserError(f"--nodes {nodes}: must divide --nproc {nproc} (each node gets the same number of ranks)")
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    per_node, port, run_id = nproc // nodes, free_port(), f"local-{uuid.uuid4().hex[:8]}"
    worker_args = _worker_args(config_path, overrides, runs_file)
    with c4_watch(port, nproc, sigstops, enabled=c4 or bool(sigstops)) as watcher:
        try:
            _launch(nodes, per_node, port, run_id, max_restarts, worker_args)
        except UserError as e:
            hangs = [f for f in (watcher.findings if watcher else []) if f["kind"] in ("hang", "non_comm_hang")]
            if hangs:
                f = hangs[-1]
                raise UserError(f"C4 stopped the job: {f['kind']} in group {f['group']}, culprit rank(s) "
                                f"{f['ranks']} on {f['host']} ({f['why']}); {e}") from None
            raise
        return list(watcher.findings) if watcher else []


def _launch(nodes, per_node, port, run_id, max_restarts, worker_args) -> None:
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
