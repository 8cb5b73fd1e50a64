"""Checkpoints with torch.distributed.checkpoint (DCP): model, optimizer, sampler, step, RNG.

DCP writes each rank's shards in parallel and reshards on load, so a run saved with one
data-parallel layout resumes on another. Around it we add what a long job needs:
- atomic completion: everything is written to `step-NNNNNN.tmp/` and renamed to
  `step-NNNNNN/` only once every rank's files and the manifest are on disk; the `latest`
  pointer is updated after the rename, and only then are old checkpoints pruned (keep K);
- a manifest (size and CRC32 of every file, each rank checksumming what it wrote) so an
  incomplete or corrupted checkpoint is detected and named, and `resume = "latest"` falls
  back to the previous good one;
- `train_state.json` (step, sampler position, LR schedule) readable without torch;
- background saves (`checkpoint.async`): DCP's async_save stages a copy of the state
  before the next step changes it and writes it from a thread or a process, over a gloo
  group of its own (its collectives must not interleave with the training's). The rest of
  the save (checksums, manifest, rename, `latest`) runs on the training thread once every
  rank's write has finished, as the trainer learns from the step stats it gathers anyway
  (`written()` on every rank, then `finish()`), so a crash mid-write leaves the previous
  checkpoint as `latest`. One save in flight at most: the next waits for it.

The optimizer state is saved flattened (`flatten_optimizer_state_dict`): every parameter's
moments and hyper-parameters under its own name. Unflattened, `param_groups` is one list
of names per rank under one key, and DCP keeps a single rank's copy of it, so pipeline
stages holding other parameters would load their groups without lr or betas. Checkpoints
written unflattened (before this) by runs without a pipeline still load.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemWriter

from .errors import UserError

STEP_DIR = re.compile(r"^step-(\d{6,})$")
MANIFEST = "manifest.json"
TRAIN_STATE = "train_state.json"


class CheckpointError(UserError):
    """A checkpoint is missing, incomplete or corrupted (the message names it)."""


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def _file_entries(folder: Path, names) -> dict:
    return {n: {"size": (folder / n).stat().st_size, "crc32": _crc32(folder / n)} for n in names}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def verify(path: Path) -> dict:
    """Check a checkpoint folder against its manifest; returns its train state."""
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not manifest_path.exists():
        raise CheckpointError(f"checkpoint {path} is incomplete: no {MANIFEST} (the save did not finish)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"checkpoint {path} is corrupted: {MANIFEST} is unreadable") from None
    for name, want in files.items():
        f = path / name
        if not f.exists():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
        if f.stat().st_size != want["size"]:
            raise CheckpointError(f"checkpoint {path} is corrupted: {name} has {f.stat().st_size} bytes, "
                                  f"expected {want['size']}")
        if _crc32(f) != want["crc32"]:
            raise CheckpointError(f"checkpoint {path} is corrupted: {name} fails its CRC32 check")
    return json.loads((path / TRAIN_STATE).read_text())


@dataclass
class PendingSave:
    """A save whose files are being written; `future` is DCP's (None for a blocking save)."""
    step: int
    tmp: Path
    final: Path
    train_state: dict
    rng_name: str
    future: Any = None


class Checkpointer:
    """Saves and finds checkpoints under `root` (the run's `checkpoints/`)."""

    def __init__(self, root: Path, keep: int, log=print, async_mode: str = "off", fault_inject=()):
        self.root = Path(root)
        self.keep = keep
        self.log = log
        self.rank = dist.get_rank()
        self.async_mode = async_mode
        self.pending: PendingSave | None = None
        self.wait_s = 0.0  # time spent waiting for background writes, since the caller last took it
        self._slow_ms = _slow_save_ms(fault_inject, self.rank)
        self._group = dist.new_group(backend="gloo") if async_mode != "off" else None

    # ---- saving -------------------------------------------------------------------------
    def save(self, step: int, model, optimizer, train_state: dict, *, replica: int | None = None,
             extra: dict | None = None) -> Path:
        """`replica`: DiLoCo replicas train apart between outer steps, so each saves its model
        and optimizer under its own key (`replica<r>.model...`); `extra` is state every
        replica holds alike (DiLoCo's global parameters), saved once."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        self.finish()  # at most one save in flight
        final = self.root / step_dir_name(step)
        tmp = final.with_name(final.name + ".tmp")
        if self.rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)  # left by a save that crashed; never a complete checkpoint
            tmp.mkdir(parents=True)
        dist.barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(flat=True))
        writer = _writer(tmp, self._slow_ms)
        rng_name = f"rng-{self.rank:05d}.pt"
        torch.save(_rng_state(), tmp / rng_name)
        pending = PendingSave(step, tmp, final, {**train_state, "step": step}, rng_name)
        if self.async_mode == "off":
            dcp.save(_layout(model_sd, optim_sd, replica, extra), storage_writer=writer)
            self.pending = pending
            return self.finish()
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        kind = AsyncCheckpointerType.PROCESS if self.async_mode == "process" else AsyncCheckpointerType.THREAD
        pending.future = dcp.async_save(_layout(model_sd, optim_sd, replica, extra), storage_writer=writer,
                                        process_group=self._group, async_checkpointer_type=kind)
        self.pending = pending  # the state is staged: training may change the weights now
        self.log(f"saving {final.name} in the background ({self.async_mode})")
        return None

    def written(self) -> int:
        """This rank's part of the save in flight: -1 none, 0 still writing, 1 on disk."""
        if self.pending is None:
            return -1
        return int(self.pending.future is None or self.pending.future.done())

    def finish(self) -> Path | None:
        """Complete the save in flight (every rank calls it at the same point): wait for this
        rank's write, checksum its files, and on rank 0 write the manifest, rename the folder
        into place and point `latest` at it."""
        p, self.pending = self.pending, None
        if p is None:
            return None
        if p.future is not None:
            t0 = time.perf_counter()
            p.future.result()  # a failed write raises here, before anything points at it
            self.wait_s += time.perf_counter() - t0
        mine = [p.rng_name] + sorted(f.name for f in p.tmp.glob(f"__{self.rank}_*"))
        entries = [None] * dist.get_world_size()
        dist.all_gather_object(entries, _file_entries(p.tmp, mine))
        if self.rank == 0:
            _write_atomic(p.tmp / TRAIN_STATE, json.dumps(p.train_state, indent=1))
            files: dict = {}
            for e in entries:
                files.update(e)
            files.update(_file_entries(p.tmp, [".metadata", TRAIN_STATE]))
            _write_atomic(p.tmp / MANIFEST, json.dumps({"step": p.step, "files": files}, indent=1))
            if p.final.exists():
                shutil.rmtree(p.final)
            os.replace(p.tmp, p.final)
            _write_atomic(self.root / "latest", p.final.name + "\n")
            self._prune()
        dist.barrier()
        if p.future is not None:
            self.log(f"saved {p.final}")
        return p.final

    def _prune(self) -> None:
        done = self.complete_steps()
        for step in done[:-self.keep]:
            shutil.rmtree(self.root / step_dir_name(step), ignore_errors=True)

    def complete_steps(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.root.iterdir() if (m := STEP_DIR.match(p.name)))

    # ---- finding and loading ----------------------------------------------------------
    def find_resumable(self, resume: str) -> Path | None:
        """The checkpoint to resume from (decided on rank 0, shared with all ranks).

        "latest": the newest checkpoint that verifies, naming each bad one skipped.
        "none": start fresh. Anything else: that path, which must verify.
        """
        choice: list = [None]
        if self.rank == 0:
            choice[0] = self._choose(resume)
        dist.broadcast_object_list(choice, src=0)
        if isinstance(choice[0], CheckpointError):
            raise choice[0]
        return Path(choice[0]) if choice[0] else None

    def _choose(self, resume: str):
        if resume == "none":
            return None
        if resume != "latest":
            try:
                verify(Path(resume))
            except CheckpointError as e:
                return e
            return str(resume)
        for step in reversed(self.complete_steps()):
            path = self.root / step_dir_name(step)
            try:
                verify(path)
                return str(path)
            except (CheckpointError, json.JSONDecodeError, OSError) as e:
                self.log(f"warning: {e}; falling back to the previous checkpoint")
        return None

    def train_state(self, path: Path) -> dict:
        """The checkpoint's train_state.json (step, sampler, schedule, DiLoCo's counters)."""
        return json.loads((Path(path) / TRAIN_STATE).read_text())

    def load(self, path: Path, model, optimizer, *, replica: int | None = None, extra: dict | None = None) -> dict:
        """Load into `model`, `optimizer` and (in place) `extra`, as `save` laid them out."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        want = "model." if replica is None else f"replica{replica}.model."
        if not any(k.startswith(want) for k in keys):
            saved = "a DiLoCo run's (per replica)" if any(k.startswith("replica") for k in keys) else "a plain run's"
            raise CheckpointError(f"checkpoint {path} holds {saved} state, not the {want[:-1]} this run needs "
                                  "(diloco.enabled / diloco.replicas differ from the run that saved it); resume with "
                                  "the same diloco settings, or start a new run.name")
        options = _options(flat=_is_flat(path))
        model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
        state = _layout(model_sd, optim_sd, replica, extra)
        dcp.load(state, checkpoint_id=str(path))
        mine = state if replica is None else state[f"replica{replica}"]
        set_state_dict(model, optimizer, model_state_dict=mine["model"], optim_state_dict=mine["optim"],
                       options=options)

        rng = path / f"rng-{self.rank:05d}.pt"
        if rng.exists():  # absent when resuming on more ranks than saved: keep the fresh seed
            _set_rng_state(torch.load(rng, weights_only=False))
        return json.loads((path / TRAIN_STATE).read_text())


def _slow_save_ms(fault_inject, rank: int) -> float:
    """The `slow_save` drill fault's delay for this rank's checkpoint writes (fault/inject.py)."""
    if not fault_inject:
        return 0.0
    from dist_train.fault.inject import parse_specs

    return sum(i.ms for i in parse_specs(fault_inject) if i.kind == "slow_save" and i.rank in (-1, rank))


def _writer(path: Path, slow_ms: float):
    """DCP's file writer; under a `slow_save` drill, one that takes `slow_ms` longer to
    write its files (a slow filesystem), in whichever thread or process writes them."""
    return SlowWriter(str(path), slow_ms=slow_ms) if slow_ms else FileSystemWriter(str(path))


class SlowWriter(FileSystemWriter):
    """FileSystemWriter taking `slow_ms` longer per write (module level: a save process
    unpickles it)."""

    def __init__(self, path, slow_ms: float = 0.0, **kwargs):
        super().__init__(path, **kwargs)
        self.slow_ms = slow_ms

    def write_data(self, plan, planner):
        time.sleep(self.slow_ms / 1e3)
        return super().write_data(plan, planner)


def _layout(model_sd: dict, optim_sd: dict, replica: int | None, extra: dict | None) -> dict:
    """What DCP saves and loads: model and optimizer (under the replica's key for DiLoCo),
    then the extra state at the top level."""
    own = {"model": model_sd, "optim": optim_sd}
    return {**(own if replica is None else {f"replica{replica}": own}), **(extra or {})}


def _options(flat: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=flat)


def _is_flat(path: Path) -> bool:
    """Whether the checkpoint holds the flattened optimizer state (see module docstring)."""
    import torch.distributed.checkpoint as dcp

    keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return not any(k.endswith("optim.param_groups.0.params") for k in keys)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
