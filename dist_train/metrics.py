"""`metrics.jsonl`: one JSON object per optimizer step, written once per job (rank 0).

Each rank's numbers for a step are a `StepStats`: named columns (and named blocks, such
as the MoE layer's) packed into one float64 vector, so the trainer reduces all of them
over ranks with one all-gather. `MetricsLog` issues that all-gather async and waits for
it after the next step's compute, so metrics add no synchronisation point; before a
checkpoint it is flushed, so `metrics.jsonl` holds every step a checkpoint holds.

On resume the steps after the checkpoint are redone, so their old lines are moved to
`metrics.discarded.jsonl` rather than deleted: nothing written is lost, and
`metrics.jsonl` stays one line per step in order.
"""
from __future__ import annotations

import json
import os
import resource
from pathlib import Path
from typing import Callable

import torch

from .errors import UserError

COMM_KINDS = ("all_gather", "reduce_scatter", "all_reduce", "all_to_all", "send_recv")
COMM_FIELDS = ("count", "bytes")
GROUP_FIELDS = ("count", "bytes", "wire_bytes")


class StepStats:
    """One rank's numbers for one step as named blocks of floats. Every rank adds the same
    blocks in the same order (the schema follows from the config), so the vectors line
    up in the all-gather; `GatheredStats` reads them back by name."""

    def __init__(self):
        self.blocks: dict[str, int] = {}  # name -> width
        self.values: list[float] = []

    def add(self, name: str, *values: float) -> None:
        """A named block; one value makes a column."""
        self.blocks[name] = len(values)
        self.values.extend(float(v) for v in values)

    def add_comm(self, kinds: dict, groups: dict, group_names) -> None:
        """The step's collectives: (count, bytes) per kind, and (count, bytes, wire bytes)
        per mesh group name in `group_names` (every rank lists the same names)."""
        for kind in COMM_KINDS:
            for f in COMM_FIELDS:
                self.add(f"comm.{kind}.{f}", kinds.get(kind, {}).get(f, 0))
        for name in group_names:
            for f in GROUP_FIELDS:
                self.add(f"comm_by_dim.{name}.{f}", groups.get(name, {}).get(f, 0))

    def add_links(self, links: dict, classes) -> None:
        """The step's collectives per link class and kind: (count, bytes), every class listed."""
        for c in classes:
            for kind in COMM_KINDS:
                for f in COMM_FIELDS:
                    self.add(f"comm_by_link.{c}.{kind}.{f}", links.get(c, {}).get(kind, {}).get(f, 0))

    def gather(self, background) -> "PendingStats":
        """Start the all-gather over the world; `background` is the recorder's context that
        keeps it out of the step's counts and out of C4's stuck ops until it is waited."""
        import torch.distributed as dist

        mine = torch.tensor(self.values, dtype=torch.float64)
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return PendingStats(None, [mine], dict(self.blocks))
        rows = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        with background():
            work = dist.all_gather(rows, mine, async_op=True)
        return PendingStats(work, rows, dict(self.blocks))


class PendingStats:
    """A step's stats on their way: the all-gather in flight."""

    def __init__(self, work, rows: list, blocks: dict[str, int]):
        self.work, self.rows, self.blocks = work, rows, blocks

    def wait(self) -> "GatheredStats":
        if self.work is not None:
            self.work.wait()
        return GatheredStats(torch.stack(self.rows), self.blocks)


class GatheredStats:
    """Every rank's `StepStats` of one step, read by block name."""

    def __init__(self, table: torch.Tensor, blocks: dict[str, int]):
        self._table = table
        self._where: dict[str, slice] = {}
        start = 0
        for name, width in blocks.items():
            self._where[name] = slice(start, start + width)
            start += width

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def block(self, name: str) -> torch.Tensor:
        """(ranks, width) values of a block."""
        return self._table[:, self._where[name]]

    def column(self, name: str) -> torch.Tensor:
        """(ranks,) values of a one-value block."""
        return self.block(name).reshape(-1)

    def total(self, name: str) -> int:
        return int(self.column(name).sum())

    def comm(self) -> dict:
        """The `comm` record: per kind, summed over ranks."""
        return {kind: {f: self.total(f"comm.{kind}.{f}") for f in COMM_FIELDS} for kind in COMM_KINDS}

    def comm_by_dim(self) -> dict:
        """The `comm_by_dim` record: per mesh group name, summed over ranks (groups idle
        this step left out)."""
        names = [n[len("comm_by_dim."):-len(".count")] for n in self._where
                 if n.startswith("comm_by_dim.") and n.endswith(".count")]
        out = {name: {f: self.total(f"comm_by_dim.{name}.{f}") for f in GROUP_FIELDS} for name in names}
        return {name: c for name, c in out.items() if c["count"]}


    def comm_by_link(self) -> dict | None:
        """The `comm_by_link` record: per link class, per kind {count, bytes} summed over
        ranks (None without a topology)."""
        classes = list(dict.fromkeys(n.split(".")[1] for n in self._where if n.startswith("comm_by_link.")))
        if not classes:
            return None
        return {c: {k: {f: self.total(f"comm_by_link.{c}.{k}.{f}") for f in COMM_FIELDS} for k in COMM_KINDS}
                for c in classes}


class MetricsLog:
    """The trainer's per-step metrics: `submit` a step's stats (their gather starts, the
    previous step's is finished and written), `flush` before a checkpoint. A context:
    leaving it flushes and closes the writer. Every rank takes part (the gather needs
    all); rank 0 writes (`writer`) and shows the progress bar."""

    def __init__(self, build_record: Callable[[int, GatheredStats, dict], dict], writer: "MetricsWriter | None",
                 progress=None, log_every: int = 1, last_step: int = 0):
        self.build_record, self.writer, self.progress = build_record, writer, progress
        self.log_every, self.last_step = log_every, last_step
        self._pending = None  # (step, PendingStats, local fields)
        self.last: GatheredStats | None = None  # the last step written, as every rank gathered it

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc) -> None:
        try:
            if exc[0] is None:
                self.flush()
        finally:
            if self.progress is not None:
                self.progress.close()
            if self.writer is not None:
                self.writer.close()

    def submit(self, step: int, stats: StepStats, background, **local) -> None:
        """This step's stats (their gather starts now) and its local fields (lr, grad norm)."""
        pending = (step, stats.gather(background), local)
        self.flush()
        self._pending = pending

    def flush(self) -> None:
        """Wait for the step in flight and write its record."""
        if self._pending is None:
            return
        step, stats, local = self._pending
        self._pending = None
        self.last = stats.wait()
        record = self.build_record(step, self.last, local)
        # a run's first record with its compile time (train.compile) is written whatever log_every
        if self.writer is not None and (step % self.log_every == 0 or step == self.last_step or "compile_s" in record):
            self.writer.write(record)
        if self.progress is not None:
            self.progress.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            self.progress.update(1)


def peak_memory_bytes(device: torch.device) -> int:
    """This process's peak memory: the CUDA allocator's on GPU, max resident set on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def peak_allocated_bytes(device: torch.device, heap) -> int:
    """The peak held by live allocations: the CUDA allocator's on GPU (as peak_memory_bytes),
    on CPU the heap in use sampled at the blocks (dist_train/heap_peak.py); -1 where glibc's
    mallinfo2 is missing."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return heap.peak if heap is not None and heap.available else -1


def flatten(record: dict, sep: str = "/", prefix: str = "") -> dict:
    """Nested dicts as one level, keys joined with "/" as the TensorBoard tags here
    (`comm/all_gather/bytes`); lists and other values as they are, null included, and an
    empty dict (e.g. `comm_by_dim` of a step without traffic) as null."""
    out = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, sep, name + sep))
        else:
            out[name] = None if isinstance(value, dict) else value
    return out


class WandbLogger:
    """Every metrics.jsonl record, flattened, as one W&B history row at its step (rank 0
    only: the MetricsWriter's). The W&B run id is kept in `<run dir>/wandb/run_id`, so a
    resumed run goes on logging into the same W&B run (W&B drops the redone steps it
    already holds, with a warning)."""

    def __init__(self, run_dir: Path, options: dict):
        try:
            import wandb
        except ImportError:
            raise UserError("metrics.wandb = true needs the wandb package: pip install 'dist-train[wandb]', "
                            "or set metrics.wandb = false") from None
        folder = Path(run_dir) / "wandb"
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / "run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else _new_run_id()
        self._run = wandb.init(dir=str(run_dir), id=run_id, resume="allow", **options)
        id_file.write_text(run_id + "\n")

    def log(self, record: dict) -> None:
        self._run.log(flatten(record), step=int(record["step"]))

    def close(self) -> None:
        self._run.finish()


def _new_run_id() -> str:
    """A W&B run id as W&B draws them: 8 lowercase letters and digits."""
    import secrets
    import string

    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


class MetricsWriter:
    def __init__(self, run_dir: Path, resume_step: int = 0, tensorboard: bool = False, wandb: dict | None = None):
        """`wandb`: wandb.init's arguments (project, entity, name, group, tags, mode,
        config) to log every record to W&B too; None = off."""
        self.path = Path(run_dir) / "metrics.jsonl"
        self._rewind(resume_step)
        self._file = open(self.path, "a")
        self._tb = None
        self._wandb = WandbLogger(run_dir, wandb) if wandb is not None else None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("metrics.tensorboard = true needs the tensorboard package: "
                                "pip install 'dist-train[tensorboard]', or set metrics.tensorboard = false") from None

            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def _rewind(self, resume_step: int) -> None:
        if not self.path.exists():
            return
        keep, drop = [], []
        for line in self.path.read_text().splitlines():
            try:
                step = json.loads(line)["step"]
            except (json.JSONDecodeError, KeyError, TypeError):
                drop.append(line)  # a line cut short by a crash
                continue
            (keep if step <= resume_step else drop).append(line)
        if drop:
            with open(self.path.with_name("metrics.discarded.jsonl"), "a") as f:
                f.write("\n".join(drop) + "\n")
        tmp = self.path.with_name("metrics.jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = record["step"]
            for key in ("loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "noise_scale"):
                if record.get(key) is not None:  # noise_scale: only with metrics.noise_scale, null when n/a
                    self._tb.add_scalar(f"train/{key}", record[key], step)
            for kind, c in record.get("comm", {}).items():
                self._tb.add_scalar(f"comm_bytes/{kind}", c["bytes"], step)
        if self._wandb is not None:
            self._wandb.log(record)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
