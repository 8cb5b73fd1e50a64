"""`metrics.jsonl`: one JSON object per optimizer step, written once per job (rank 0).

On resume the steps after the checkpoint are redone, so their old lines are moved to
`metrics.discarded.jsonl` rather than deleted: nothing written is lost, and
`metrics.jsonl` stays one line per step in order.
"""
from __future__ import annotations

import json
import os
import resource
from pathlib import Path

import torch

from .errors import UserError

COMM_KINDS = ("all_gather", "reduce_scatter", "all_reduce", "all_to_all", "send_recv")


def peak_memory_bytes(device: torch.device) -> int:
    """This process's peak memory: the CUDA allocator's on GPU, max resident set on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


class MetricsWriter:
    def __init__(self, run_dir: Path, resume_step: int = 0, tensorboard: bool = False):
        self.path = Path(run_dir) / "metrics.jsonl"
        self._rewind(resume_step)
        self._file = open(self.path, "a")
        self._tb = None
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
            for key in ("loss", "lr", "grad_norm", "tokens_per_s", "step_time_s"):
                self._tb.add_scalar(f"train/{key}", record[key], step)
            for kind, c in record.get("comm", {}).items():
                self._tb.add_scalar(f"comm_bytes/{kind}", c["bytes"], step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
