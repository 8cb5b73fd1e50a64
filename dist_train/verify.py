"""`dist-train verify PATH...`: the full checks a run makes only cheaply when it opens its
inputs: every shard's whole-file CRC32 and token range, every checkpoint file's size and
CRC32 against its manifest. Prints one line per thing checked; the first damaged file
ends the command with its name (exit 2)."""
from __future__ import annotations

import time
from pathlib import Path

from dist_train.data import DataError

from .checkpoint import MANIFEST, STEP_DIR, CheckpointError, verify
from .errors import UserError


def verify_command(paths: list[str]) -> None:
    bad = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise UserError(f"verify: {path} does not exist; pass a shard folder, a checkpoint, a run's "
                            "checkpoints/ folder or a run directory")
        targets = _targets(path)
        if not targets:
            raise UserError(f"verify: {path} holds no index.json, no {MANIFEST} and no checkpoints/; pass a shard "
                            "folder (made by `dist-train prepare`), a checkpoint or a run directory")
        for kind, target in targets:
            t0 = time.perf_counter()
            try:
                what = _verify_shards(target) if kind == "shards" else _verify_checkpoint(target)
            except (UserError, CheckpointError, DataError) as e:
                print(f"BAD  {target}: {e}", flush=True)
                bad.append(str(e))
                continue
            print(f"ok   {target}: {what} ({time.perf_counter() - t0:.1f} s)", flush=True)
    if bad:
        raise UserError(f"verify: {len(bad)} damaged: {bad[0]}")


def _targets(path: Path) -> list[tuple[str, Path]]:
    from dist_train.data import INDEX_NAME

    if (path / INDEX_NAME).is_file():
        return [("shards", path)]
    if (path / MANIFEST).is_file() or STEP_DIR.match(path.name):
        return [("checkpoint", path)]
    ckpts = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    return [("checkpoint", p) for p in sorted(ckpts.iterdir()) if p.is_dir() and STEP_DIR.match(p.name)]


def _verify_shards(path: Path) -> str:
    from dist_train.data import verify_shards

    index = verify_shards(path)
    return f"{len(index.shards)} shard(s), {index.total_tokens:,} tokens, every CRC32 and token id checked"


def _verify_checkpoint(path: Path) -> str:
    state = verify(path)
    return f"checkpoint of step {state['step']}, every file's size and CRC32 match its manifest"
