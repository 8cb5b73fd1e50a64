"""Shared pieces of the dp_overhead baselines (bench/_dp_fsdp_loop.py, bench/_dp_deepspeed.py).

Each baseline is started by `python -m torch.distributed.run` with `--spec JSON` (the
bench's shape, data and optimizer settings, identical to what dist-train is given) and
`--result PATH` (rank 0 writes its measurements there). Nothing here imports the trainer:
only the model, its initialisation and the data path, which all three systems share.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist


def parse_args() -> tuple[dict, Path]:
    p = argparse.ArgumentParser()
    p.add_argument("--spec", required=True, help="JSON settings written by bench/dp_overhead.py")
    p.add_argument("--result", required=True, help="where rank 0 writes the result JSON")
    a = p.parse_args()
    return json.loads(a.spec), Path(a.result)


def model_args(spec: dict):
    from dist_train.model import ModelArgs

    m = spec["model"]
    return ModelArgs(dim=m["dim"], n_layers=m["n_layers"], n_heads=m["n_heads"], n_kv_heads=m["n_kv_heads"],
                     vocab_size=m["vocab_size"], ffn_dim=m["ffn_dim"], max_seq_len=spec["seq_len"])


def data(spec: dict, dp_rank: int, dp_size: int):
    """The bundled corpus, cut and ordered exactly as the trainer does it."""
    from dist_train.data import DistributedBatchSampler, TokenDataset, ensure_prepared

    dataset = TokenDataset(ensure_prepared("bundled", None, "byte"), spec["seq_len"])
    sampler = DistributedBatchSampler(len(dataset), global_batch=spec["global_batch"],
                                      micro_batch=spec["micro_batch"], dp_size=dp_size, dp_rank=dp_rank,
                                      seed=spec["seed"])
    return dataset, sampler


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (norm weights are not decayed)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(spec: dict):
    """Linear warm-up, then cosine decay to min_lr_ratio over the run (the config's schedule)."""
    steps, warmup, floor = spec["steps"], spec["warmup"], spec["min_lr_ratio"]

    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def max_rss_bytes() -> int:
    """This process's resident-set peak (Linux reports KiB): on CPU, runtime included."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class StepTimer:
    """Per-rank wall time of each step and the mean loss; gathered once, after the loop."""

    def __init__(self):
        self.times: list[float] = []
        self.losses: list[float] = []
        self.starts: list[float] = []  # to see time spent between steps (none in these loops)
        self.cpu_starts: list[float] = []  # process CPU time (all threads) at each step's start
        self._t0 = 0.0

    def start(self) -> None:
        self.cpu_starts.append(time.process_time())
        self._t0 = time.perf_counter()
        self.starts.append(self._t0)

    def stop(self, loss: float) -> None:
        self.times.append(time.perf_counter() - self._t0)
        self.losses.append(loss)

    def finish(self, system: str, spec: dict, result: Path, extra: dict | None = None) -> None:
        """All-gather (times, losses, peak RSS) and let rank 0 write the result JSON."""
        rss = max_rss_bytes()  # before the gather: the loop's peak, not the reporting's
        n = len(self.times)
        cpu = [b - a for a, b in zip(self.cpu_starts, self.cpu_starts[1:])]  # n - 1 step periods
        mine = torch.tensor(self.times + self.losses + [float(rss)] + cpu, dtype=torch.float64)
        rows = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(rows, mine)
        if dist.get_rank() != 0:
            return
        table = torch.stack(rows)
        step_times = table[:, :n].max(dim=0).values.tolist()  # a step lasts as long as its slowest rank
        losses = table[:, n:2 * n].mean(dim=0).tolist()
        rss_per_rank = [int(v) for v in table[:, 2 * n].tolist()]
        cpu_per_step = table[:, 2 * n + 1:].sum(dim=0).tolist()  # CPU seconds of all ranks, step k to k+1
        warm = spec["warmup_steps"]
        median = statistics.median(step_times[warm:])
        periods = [b - a for a, b in zip(self.starts, self.starts[1:])]  # rank 0's step-start to step-start
        tokens = spec["global_batch"] * spec["seq_len"]
        out = {
            "system": system,
            "world_size": dist.get_world_size(),
            "step_time_s": step_times,
            "step_period_s": periods,
            "step_period_cpu_s": cpu_per_step,
            "loss": losses,
            "median_step_time_s": median,
            "tokens_per_s": tokens / median,
            "peak_rss_bytes_per_rank": rss_per_rank,
            "peak_memory_bytes": max(rss_per_rank),
            "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        }
        out.update(extra or {})
        result.write_text(json.dumps(out, indent=1))
