"""Shared by the benchmarks: run several configs of `dist-train local` in one launch
(`--runs`) and read back each run's metrics.jsonl."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_sweep(root: Path, nproc: int, runs: dict[str, dict], common: dict, nodes: int = 1) -> dict[str, list[dict]]:
    """Launch once with `nproc` ranks (on `nodes` simulated nodes); returns {run name: metrics records}."""
    base = {"run.dir": str(root), "metrics.progress": "false", "metrics.report": "false",
            "checkpoint.every": 0, **common}
    entries = [[f"{k}={v}" for k, v in {**base, "run.name": name, **sets}.items()] for name, sets in runs.items()]
    spec = root / f"runs-{nproc}.json"
    spec.write_text(json.dumps(entries))
    cmd = [sys.executable, "-m", "dist_train", "local", "--nproc", str(nproc), "--nodes", str(nodes), "configs/tiny.toml",
           "--runs", str(spec)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        raise SystemExit(f"launch failed:\n{proc.stderr[-3000:]}")
    return {name: [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
            for name in runs}


def steady_median(records: list[dict], key, skip: int = 1) -> float:
    """Median of a metric over the steps after the first `skip` (warm-up)."""
    values = [key(r) if callable(key) else r[key] for r in records[skip:] or records]
    return statistics.median(values)
