"""`dist-train ray`: the job on a Ray cluster, one Ray Train worker per rank.

Why Ray Train's `DataParallelTrainer` and not its `TorchTrainer`: `TorchTrainer` creates
the torch process group before the training function starts, so dist-train's observed
backend (collective counts, C4) would see nothing. A `DataParallelTrainer` with no backend
config creates none. Each worker's training function takes its rank, world and node from
Ray and runs the rank as `python -m dist_train train` in a child process with torchrun's
environment: the same entrypoint as torchrun and `local` (Ray runs the training function
off the actor's main thread, where the trainer could not install its signal handling or
leave the way it does on a lost peer). The child dies with its worker (PR_SET_PDEATHSIG).

What Ray gives: placement (one bundle of `--cpus-per-worker` CPUs and `--gpus-per-worker`
GPUs per rank, GPUs pinned by CUDA_VISIBLE_DEVICES) and restarts: a worker that dies makes
Ray stop and restart the whole group, up to `--max-failures` times. Every attempt resumes
from dist-train's own verified `latest` checkpoint; Ray's checkpoint registry is not used,
since a checkpoint reported just before a crash may not reach it (reports travel on the
controller's health-check polls; ray issue 41700).

This driver plays the part the elastic agent plays under `local`: it hosts the store the
ranks meet through (per attempt under its own prefix) and publish their C4 state to, and
runs the C4 watcher, so both outlive every rank and every attempt.

With no `--address` a Ray is started here for the job and stopped after: sized to the
job (the ranks are simulated, as under `local`), no dashboard, its session files under the
run directory (or, when that path is too long for a Unix socket, under /tmp and moved into
the run directory at the end), its auth token in the environment rather than ~/.ray.
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from datetime import timedelta
from pathlib import Path

from dist_train.errors import UserError
from dist_train.fault.wire import DETECTOR_ENV, STORE_ENV, key
from dist_train.launchers.local import detector_thread, launch_watcher
from dist_train.layout import LaunchPlan

SOCKET_DIR_MAX = 40  # Ray's session sockets sit ~62 characters below its temp dir; AF_UNIX allows 107


class RayJob:
    """One launch of `workers` ranks on a Ray cluster (module docstring). `run()` blocks
    until the job ends and returns the C4 findings; a failed job raises UserError."""

    def __init__(self, worker_args: tuple[str, ...], workers: int, ray_dir: Path, *, address: str | None = None,
                 cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0, max_failures: int = 0,
                 plan: LaunchPlan | None = None):
        if workers < 1:
            raise UserError(f"--workers {workers}: must be at least 1")
        if cpus_per_worker <= 0:
            raise UserError(f"--cpus-per-worker {cpus_per_worker}: must be positive")
        if gpus_per_worker < 0:
            raise UserError(f"--gpus-per-worker {gpus_per_worker}: must be 0 or more")
        if max_failures < -1:
            raise UserError(f"--max-failures {max_failures}: must be -1 (no limit), 0 or more")
        self.worker_args, self.workers, self.ray_dir = tuple(worker_args), workers, Path(ray_dir)
        self.address, self.cpus, self.gpus, self.max_failures = address, cpus_per_worker, gpus_per_worker, max_failures
        self.job_id = f"ray-{uuid.uuid4().hex[:8]}"
        self.watcher = launch_watcher(plan, workers)

    @property
    def findings(self) -> list[dict]:
        return list(self.watcher.findings) if self.watcher else []

    def run(self) -> list[dict]:
        with _own_ray_auth(self.address is None):  # before Ray is imported: it reads the mode once
            try:
                import ray.train  # noqa: F401
            except ImportError:
                raise UserError("dist-train ray needs Ray Train: pip install 'dist-train[ray]'") from None
            with _quiet_ray_logs(), self._cluster() as local:
                self._check_resources()
                host = "127.0.0.1" if local or _one_node() else _driver_ip()
                store = _host_store()
                with _watching(self.watcher, store):
                    self._fit(f"{host}:{store.port}", store, own_ray=local)
        return self.findings

    # --- the cluster ----------------------------------------------------------------
    @contextlib.contextmanager
    def _cluster(self):
        """Connect to `--address`, or start a Ray for this job; yields True for our own."""
        import ray

        if self.address:
            _connect(self.address)
            try:
                yield False
            finally:
                ray.shutdown()
            return
        session, moved = _session_dir(self.ray_dir)
        try:
            ray.init(num_cpus=max(1, round(self.workers * self.cpus)), num_gpus=_local_gpus(self.gpus),
                     include_dashboard=False, _temp_dir=str(session), log_to_driver=True,
                     logging_level="WARNING", configure_logging=True)
            yield True
        finally:
            ray.shutdown()
            if moved:
                _move_session(session, self.ray_dir)

    def _check_resources(self) -> None:
        import ray

        have = ray.cluster_resources()
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        for what, per in (("CPU", self.cpus), ("GPU", self.gpus)):
            need, got = self.workers * per, have.get(what, 0.0)
            if per and need > got:
                flag = "--cpus-per-worker" if what == "CPU" else "--gpus-per-worker"
                raise UserError(f"--workers {self.workers} x {flag} {per:g} needs {need:g} {what}s, but the Ray "
                                f"cluster has {got:g} {what}s on {nodes} node(s); lower --workers or {flag}, "
                                f"or add nodes")

    # --- the job ----------------------------------------------------------------------
    def _fit(self, store_addr: str, store, own_ray: bool) -> None:
        import ray.train
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.v2.api.config import LoggingConfig
        from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

        resources = {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {})}
        loop = {"worker_args": self.worker_args, "store": store_addr, "job_id": self.job_id,
                "c4_launcher": self.watcher is not None, "cwd": os.getcwd(), "max_failures": self.max_failures}
        trainer = _trainer_class(DataParallelTrainer, own_ray)(
            _rank_main, train_loop_config=loop,
            scaling_config=ScalingConfig(num_workers=self.workers, use_gpu=self.gpus > 0,
                                         resources_per_worker=resources),
            run_config=RunConfig(name=self.job_id, storage_path=str(self.ray_dir / "storage"),
                                 failure_config=FailureConfig(max_failures=self.max_failures),
                                 logging_config=LoggingConfig(log_level="ERROR")))
        try:
            trainer.fit()
        except ray.train.TrainingFailedError as e:
            attempts = int(store.add(key("ray", "attempts"), 0))
            raise UserError(f"the job failed after {attempts} attempt(s) (--max-failures {self.max_failures}): "
                            f"{_first_line(e)}") from None


def _trainer_class(base, own_ray: bool):
    """Ray Train's trainer; on a Ray started here without its dashboard, without the
    placement-group cleaner, which polls the dashboard's state API (it would log a
    warning every second) to free the bundles of a crashed controller: this process
    stops that Ray, bundles and all."""
    if not own_ray:
        return base

    class Trainer(base):
        def _create_default_callbacks(self):
            return [c for c in super()._create_default_callbacks()
                    if type(c).__name__ != "PlacementGroupCleanerCallback"]

    return Trainer


def _rank_main(config: dict) -> None:
    """One Ray Train worker: agree the attempt, then run this rank as a child process."""
    import ray.train
    from ray.train.collective import broadcast_from_rank_zero

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    host, port = config["store"].rsplit(":", 1)
    attempt = None
    if rank == 0:  # each attempt of the group gets the next number: its own store prefix and C4 keys
        import torch.distributed as dist

        store = dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=60))
        attempt = int(store.add(key("ray", "attempts"), 1)) - 1
    attempt = broadcast_from_rank_zero(attempt)
    env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(ctx.get_world_size()),
               LOCAL_RANK=str(ctx.get_local_rank()), LOCAL_WORLD_SIZE=str(ctx.get_local_world_size()),
               GROUP_RANK=str(ctx.get_node_rank()), MASTER_ADDR=host, MASTER_PORT=port,
               TORCHELASTIC_USE_AGENT_STORE="True", TORCHELASTIC_RESTART_COUNT=str(attempt),
               TORCHELASTIC_RUN_ID=config["job_id"])
    env.setdefault("OMP_NUM_THREADS", "1")
    if config["max_failures"] >= 0:  # what a rank that loses a peer says comes next
        env["TORCHELASTIC_MAX_RESTARTS"] = str(config["max_failures"])
    if config["c4_launcher"]:
        env.update({DETECTOR_ENV: "launcher", STORE_ENV: config["store"]})
    cwd = config["cwd"] if os.path.isdir(config["cwd"]) else None  # the driver's, for relative paths
    proc = subprocess.Popen([sys.executable, *config["worker_args"]], env=env, cwd=cwd, preexec_fn=_die_with_parent)
    code = proc.wait()
    if code:
        why = f"signal {-code}" if code < 0 else f"exit code {code}"
        raise RuntimeError(f"rank {rank} (pid {proc.pid}) ended with {why} in attempt {attempt}")


def _die_with_parent() -> None:
    """In the child: SIGKILL when the worker that started it dies (Linux)."""
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def _own_ray_auth(own: bool):
    """A Ray started here authenticates with a fresh token passed in the environment
    (Ray would otherwise write one to ~/.ray/auth_token)."""
    if not own:
        yield
        return
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _connect(address: str) -> None:
    """ray.init(address) with one clear line for a cluster that is not there."""
    import ray

    if address != "auto":
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise UserError(f"--address {address!r}: expected auto or HOST:PORT of a Ray head "
                            "(the address `ray start --head` printed)")
        try:
            with socket.create_connection((host, int(port)), timeout=5):
                pass
        except OSError as e:
            raise UserError(f"--address {address}: nothing answers there ({e.strerror or e}); start the "
                            "cluster with `ray start --head` or drop --address to run a Ray on this machine") from None
    try:
        ray.init(address=address, log_to_driver=True, logging_level="WARNING")
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UserError(f"--address {address}: could not join the Ray cluster ({_first_line(e)}); start it "
                        "with `ray start --head` or drop --address to run a Ray on this machine") from None


def _host_store():
    """The job's store, hosted here for all attempts (the ranks' rendezvous and C4)."""
    import torch.distributed as dist

    return dist.TCPStore("0.0.0.0", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=300),
                         multi_tenant=True)


@contextlib.contextmanager
def _watching(watcher, store):
    if watcher is None:
        yield
        return
    watcher.store = store
    with detector_thread(watcher.run):
        yield


def _session_dir(ray_dir: Path) -> tuple[Path, bool]:
    """Where Ray's session files go: under the run directory when the path leaves room
    for its sockets, else a short folder in /tmp (moved into the run directory after)."""
    ray_dir.mkdir(parents=True, exist_ok=True)
    session = ray_dir / "session"
    if len(str(session.resolve())) <= SOCKET_DIR_MAX:
        return session, False
    return Path(tempfile.mkdtemp(prefix="dist-train-ray-")), True


def _move_session(session: Path, ray_dir: Path) -> None:
    dest = ray_dir / "session"
    with contextlib.suppress(OSError):
        shutil.copytree(session, dest, symlinks=True, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("sockets", "*.sock"))
    shutil.rmtree(session, ignore_errors=True)


def _local_gpus(per_worker: float) -> int | None:
    if not per_worker:
        return 0
    return None  # let Ray detect them; the resource check names what it found


def _one_node() -> bool:
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive")) == 1


def _driver_ip() -> str:
    import ray.util

    return ray.util.get_node_ip_address()


def _first_line(e: BaseException) -> str:
    """The line that says what happened: a rank's own (from `_rank_main`) over Ray's wrapper text."""
    text = str(e).strip() or type(e).__name__
    if m := re.search(r"rank \d+ \(pid \d+\) ended with [^\n]*", text):
        return m.group(0)
    return next(ln.strip() for ln in text.splitlines() if ln.strip())[:400]


@contextlib.contextmanager
def _quiet_ray_logs():
    """Ray's start-up chatter off the terminal (its logs stay in the session folder)."""
    import logging

    names = ("ray", "ray.train", "ray.tune", "ray.data")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for n, lv in levels.items():
            logging.getLogger(n).setLevel(lv)
