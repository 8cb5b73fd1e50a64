"""Shared test setup: hermetic caches, one thread per rank, helpers to run the CLI."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _data_cache(tmp_path_factory):
    """Prepare the bundled corpus once per test session, outside the user's cache."""
    os.environ["DIST_TRAIN_CACHE"] = str(tmp_path_factory.mktemp("dist-train-cache"))


@pytest.fixture(scope="module")
def triton_interpret():
    """TRITON_INTERPRET=1 for one test module, then the previous value back. Kernels read it at
    launch, so a module of interpreter tests can sit beside compiled-path ones; processes the
    module spawns inherit it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield


def kernel_tol(dtype, k: int = 1, scale: float = 1.0, roundings: int = 1, term_roundings: int = 0,
               c: float = 4.0) -> dict:
    """assert_close tolerances for a kernel's result in `dtype` against a reference computed in fp32
    (or fp64) from the same input values, taken from the float formats, not from what one CPU
    produced. eps = finfo(dtype).eps is one ulp at 1 (bf16: 2**-7; its unit roundoff is 2**-8).
    - roundings: times the result itself is rounded from fp32 to `dtype`, each by at most one ulp
      (half of one with round-to-nearest as on a GPU; a whole one because the Triton interpreter
      truncates): rtol += roundings * eps;
    - term_roundings: relative errors of eps each in the terms of a later sum (e.g. bf16 logits
      or probabilities before a matmul): errors of the size of the terms, not of the result, so
      atol += term_roundings * eps * scale;
    - both sides sum in fp32 in different orders: with k the summed length of the reductions
      between the inputs and the result, they differ by about eps32 * sqrt(k) of the size of the
      terms (rounding errors add like a random walk; c covers the spread): atol and rtol += that.
    `scale` is the size of the terms, about max |reference|; it also covers entries that cancel
    to about zero.
    """
    import torch

    eps = torch.finfo(dtype).eps
    acc = c * torch.finfo(torch.float32).eps * math.sqrt(k)
    return dict(rtol=roundings * eps + acc, atol=(term_roundings * eps + acc) * scale)


def bf16_running_sum(terms):
    """Sum over the last dim the way a kernel keeping its running sum in bf16 would: every partial
    sum rounded to bf16 (the terms themselves in fp32). For tests showing that a tolerance tells
    fp32 from bf16 accumulation."""
    import torch

    acc = torch.zeros(terms.shape[:-1], dtype=torch.bfloat16)
    for j in range(terms.shape[-1]):
        acc = (acc.float() + terms[..., j].float()).bfloat16()
    return acc.float()


def run_cli(*args: str, timeout: float = 300, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m dist_train ARGS` as a user would; output captured as text."""
    proc = subprocess.run([sys.executable, "-m", "dist_train", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"dist-train {' '.join(args)} exited {proc.returncode}\n"
                             f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-8000:]}")
    return proc


def free_port() -> int:
    """A TCP port nobody listens on now (for a rendezvous or a Ray head a test starts)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (a launcher's agent, fork server and ranks)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [pid] + [q for c in out for q in process_tree(int(c))]


def rank_pids(launcher_pid: int) -> list[int]:
    """The ranks of a `dist-train local` launch: the children of its fork server
    (launchers/rank_server.py)."""
    def is_fork_server(pid: int) -> bool:
        try:
            return b"multiprocessing.forkserver" in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False

    servers = [p for p in process_tree(launcher_pid) if is_fork_server(p)]
    return [q for s in servers for q in process_tree(s)[1:]]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def tiny_overrides(run_dir: Path, name: str, steps: int, **extra) -> list[str]:
    """--set flags for a short, quiet run of configs/tiny.toml under run_dir/name."""
    sets = {"run.dir": str(run_dir), "run.name": name, "train.steps": steps, "metrics.progress": "false",
            **extra}
    out = []
    for key, value in sets.items():
        out += ["--set", f"{key}={value}"]
    return out


def runs_file(root: Path, runs: dict[str, dict], common: dict | None = None) -> Path:
    """A `--runs` file under root/ running each named run in turn: its overrides on top of
    `common` (a run's overrides may set run.name to continue an earlier run's directory)."""
    base = {"run.dir": str(root), "metrics.progress": "false", "metrics.report": "false", **(common or {})}
    entries = [[f"{k}={v}" for k, v in {**base, "run.name": name.strip(), **sets}.items()]
               for name, sets in runs.items()]
    spec = root / f"runs-{abs(hash((tuple(runs), json.dumps(entries))))}.json"
    spec.write_text(json.dumps(entries))
    return spec


def sweep(root: Path, nproc: int, runs: dict[str, dict], common: dict | None = None,
          timeout: float = 900, config: str = "configs/tiny.toml", nodes: int = 1) -> subprocess.CompletedProcess:
    """One `dist-train local --nproc N --runs` launch running each named run in turn under
    root/ (a launch costs ~10 s of start-up on 2 cores; the runs share it). `nodes`
    simulated nodes share the ranks (LOCAL_WORLD_SIZE = nproc / nodes)."""
    spec = runs_file(root, runs, common)
    return run_cli("local", "--nproc", str(nproc), "--nodes", str(nodes), config, "--runs", str(spec), timeout=timeout)
