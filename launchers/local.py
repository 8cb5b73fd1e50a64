"""`dist-train local`: N simulated ranks on this machine under torch's elastic agent.

The agent is torch's `LocalElasticAgent`, the engine behind torchrun, so the workers see
exactly torchrun's environment and run `dist-train train`, forked from a pre-imported
server rather than exec'd (launchers/rank_server.py). `--nodes K` starts K
agents, each owning N/K workers and meeting through the c10d rendezvous like real nodes;
every worker then sees LOCAL_WORLD_SIZE = N/K, which is what node-aware code
(hierarchical all-to-all, C4 link naming) keys on. Several agents number their restarts
apart, so they run with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: rank 0 hosts the ranks' store
(dist_train/distributed.py), while the C4 detector keeps reading the rendezvous store.

`LocalJob` is the handle of one launch: `run()` blocks until the job ends, while from
another thread `watcher` (the C4 detector, when on) and `kill_attempt()` serve whoever
watches the job (the drills' watchdog). The detector runs in this process: it outlives
every rank and every restart, and the agent's rendezvous store it reads is hosted here.

Why our own agent subclass rather than `elastic_launch`: the detector must hear of a
worker that died, with its exit code, while the agent restarts the job; `_monitor_workers`
is the agent's documented extension point and returns exactly that, where
`elastic_launch` would only log it.
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import uuid
from datetime import timedelta
from typing import Callable

from torch.distributed.elastic.agent.server.api import WorkerSpec, WorkerState
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
from torch.distributed.elastic.rendezvous import RendezvousParameters
from torch.distributed.elastic.rendezvous import registry as rdzv_registry

from dist_train.errors import UserError
from dist_train.fault.wire import DETECTOR_ENV, STORE_ENV
from dist_train.launchers import rank_server
from dist_train.layout import LaunchPlan
from dist_train.topology import SIMULATED_ENV


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalJob:
    """One launch of `nproc` ranks on `nodes` simulated nodes (see module docstring).
    `plan` is the launch's pre-flight result (dist_train/layout.py): whether to host the
    C4 detector, and the SIGSTOP drills it sends."""

    def __init__(self, config_path: str | None, overrides: list[str], nproc: int, nodes: int = 1,
                 max_restarts: int = 0, runs_file: str | None = None, plan: LaunchPlan | None = None):
        if nproc < 1:
            raise UserError(f"--nproc {nproc}: must be at least 1")
        if nodes < 1 or nproc % nodes:
            raise UserError(f"--nodes {nodes}: must divide --nproc {nproc} (each node gets the same number of ranks)")
        self.nproc, self.nodes, self.max_restarts = nproc, nodes, max_restarts
        self.port, self.run_id = free_port(), f"local-{uuid.uuid4().hex[:8]}"
        self.worker_args = worker_args(config_path, overrides, runs_file)
        self.watcher = launch_watcher(plan, nproc)

    @property
    def findings(self) -> list[dict]:
        return list(self.watcher.findings) if self.watcher else []

    def run(self) -> list[dict]:
        """Run the job to its end; returns the C4 findings. A failed job raises UserError
        (naming C4's culprit when C4 stopped it)."""
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // self.nproc)))
        os.environ[SIMULATED_ENV] = "1"  # the ranks' nodes are simulated: [topology] links are slowed down to
        with self._detector():
            try:
                self._launch()
            except UserError as e:
                hangs = [f for f in self.findings if f["kind"] in ("hang", "non_comm_hang")]
                if hangs:
                    f = hangs[-1]
                    raise UserError(f"C4 stopped the job: {f['kind']} in group {f['group']}, culprit rank(s) "
                                    f"{f['ranks']} on {f['host']} ({f['why']}); {e}") from None
                raise
        return self.findings

    def kill_attempt(self) -> int:
        """SIGKILL every rank of the current attempt (a watchdog's last resort); the agent
        then restarts the job if it has restarts left. Returns how many were killed."""
        if self.watcher is None:
            return 0
        killed = 0
        for pid, (attempt, _, _) in list(self.watcher.pids.items()):
            if attempt == self.watcher.attempt:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
        return killed

    # --- internals ---------------------------------------------------------------
    def _note_exit(self, pid: int, exitcode: int) -> None:
        if self.watcher is not None:
            self.watcher.note_exit(pid, exitcode)

    @contextlib.contextmanager
    def _detector(self):
        """Run the watcher against the agent's store for the whole launch."""
        if self.watcher is None:
            yield
            return
        import torch.distributed as dist

        os.environ[DETECTOR_ENV] = "launcher"
        os.environ[STORE_ENV] = f"127.0.0.1:{self.port}"  # the rendezvous store this launcher hosts

        def run(stop: threading.Event) -> None:
            while not stop.is_set():  # the agent starts hosting the store a moment after launch
                try:
                    store = dist.TCPStore("127.0.0.1", self.port, is_master=False, timeout=timedelta(seconds=5))
                    break
                except Exception:
                    stop.wait(0.2)
            else:
                return
            self.watcher.store = store
            self.watcher.run(stop)

        try:
            with detector_thread(run):
                yield
        finally:
            os.environ.pop(DETECTOR_ENV, None)
            os.environ.pop(STORE_ENV, None)

    def _launch(self) -> None:
        per_node = self.nproc // self.nodes
        args = (self.nodes, per_node, self.port, self.run_id, self.max_restarts, self.worker_args)
        if self.nodes == 1:
            _run_agent(0, *args, on_failure=self._note_exit)
            return
        ctx = multiprocessing.get_context("spawn")
        exits = ctx.Queue()  # (pid, exit code) of failed workers, from the agents to the detector here
        drain = threading.Thread(target=_drain, args=(exits, self._note_exit), daemon=True)
        drain.start()
        agents = [ctx.Process(target=_agent_process, args=(i, *args, exits)) for i in range(self.nodes)]
        for a in agents:
            a.start()
        for a in agents:
            a.join()
        exits.put(None)
        drain.join(timeout=5)
        if any(a.exitcode for a in agents):
            raise UserError(f"the job failed on {sum(1 for a in agents if a.exitcode)} of {self.nodes} "
                            "simulated nodes")


@contextlib.contextmanager
def detector_thread(run: Callable[[threading.Event], None]):
    """`run(stop)` in a daemon thread while the block runs (a launcher's C4 detector), then
    `stop` set and the thread joined."""
    stop = threading.Event()
    thread = threading.Thread(target=run, args=(stop,), name="c4-detector", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def launch_watcher(plan: LaunchPlan | None, world: int):
    """The C4 watcher a launcher hosts for `plan` (None when C4 is off and no drill sends
    SIGSTOPs); its store is attached once the job's store is up."""
    if plan is None or not (plan.c4 or plan.sigstops):
        return None
    from dist_train.fault.watcher import Watcher

    return Watcher(None, world, sigstops=list(plan.sigstops))


def worker_args(config_path: str | None, overrides: list[str], runs_file: str | None) -> tuple[str, ...]:
    """What every launcher runs after `python`: `-m dist_train train CONFIG --set ...`."""
    args = ["-m", "dist_train", "train"]
    if config_path:
        args.append(str(config_path))
    for o in overrides:
        args += ["--set", o]
    if runs_file:
        args += ["--runs", str(runs_file)]
    return tuple(args)


class _ReportingAgent(LocalElasticAgent):
    """A LocalElasticAgent that reports each failed worker (pid, exit code) as soon as it
    sees it, also the failures it then restarts from."""

    def __init__(self, *args, on_failure: Callable[[int, int], None], **kwargs):
        super().__init__(*args, **kwargs)
        self._on_failure = on_failure

    def _monitor_workers(self, worker_group):
        result = super()._monitor_workers(worker_group)
        if result.state == WorkerState.FAILED:  # the first to fail first: it is the likely culprit
            for failure in sorted(result.failures.values(), key=lambda f: f.timestamp):
                self._on_failure(failure.pid, failure.exitcode)
        return result


def _run_agent(node_rank: int, nodes: int, per_node: int, port: int, run_id: str, max_restarts: int,
               worker_args: tuple[str, ...], on_failure: Callable[[int, int], None]) -> None:
    """One simulated node: an elastic agent with `per_node` workers (what torchrun runs).
    Its per-worker "sending SIGTERM" warnings are silenced: when one worker fails, the
    terminal gets the agent's one line naming it and each survivor's one line."""
    # the survivors' "terminating" warnings and the failed rank's traceback-shaped log
    for name in ("torch.distributed.elastic.multiprocessing.api", "torch.multiprocessing.spawn"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    rank_server.start()
    params = RendezvousParameters(backend="c10d", endpoint=f"127.0.0.1:{port}", run_id=run_id, min_nodes=nodes,
                                  max_nodes=nodes, local_addr="127.0.0.1", is_host=node_rank == 0,
                                  last_call_timeout=1, timeout=900)
    argv = worker_args[2:]  # after `-m dist_train`: the ranks fork from rank_server, they do not exec
    spec = WorkerSpec(role="default", local_world_size=per_node, entrypoint=rank_server.run_rank,
                      args=(argv, dict(os.environ)),
                      rdzv_handler=rdzv_registry.get_rendezvous_handler(params), max_restarts=max_restarts,
                      monitor_interval=0.1, local_addr="127.0.0.1")
    agent = _ReportingAgent(spec, DefaultLogsSpecs(), start_method="forkserver", on_failure=on_failure)
    try:
        result = agent.run()
    finally:
        spec.rdzv_handler.shutdown()
    if result.is_failed():
        # the rank that failed first is the culprit; the agent then terminated the others (SIGTERM)
        own = {r: f for r, f in result.failures.items() if f.exitcode != -signal.SIGTERM} or result.failures
        rank, first = min(own.items(), key=lambda kv: (kv[1].timestamp, kv[0]))
        raise UserError(f"{len(result.failures)} rank(s) failed; rank {rank} failed first, with exit code "
                        f"{first.exitcode} (its message is printed above)")


def _agent_process(node_rank, nodes, per_node, port, run_id, max_restarts, worker_args, exits) -> None:
    # Several agents number their restarts apart, so the ranks cannot share the rendezvous
    # store under a per-restart prefix: rank 0 hosts theirs (the C4 store stays this one).
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    try:
        _run_agent(node_rank, nodes, per_node, port, run_id, max_restarts, worker_args,
                   on_failure=lambda pid, code: exits.put((pid, code)))
    except UserError as e:
        print(f"dist-train: error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


def _drain(exits, note_exit: Callable[[int, int], None]) -> None:
    while (item := exits.get()) is not None:
        note_exit(*item)
