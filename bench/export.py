"""Peak memory of `dist-train export --format hf` against the size of the checkpoint.

Builds a random checkpoint of the llama-1b preset's shape (Llama-3.2-1B: dim 2048, 16
layers, vocab 128256, tied head; 1.24B parameters, fp32) the way a run saves it: `--nproc`
gloo ranks with FSDP2 over dp_shard = nproc, the model built by `parallelize` (seeded
init), saved by the trainer's `Checkpointer` (DCP, manifest, train state) under a run
directory with its config.toml; no optimizer state (plain SGD), so the checkpoint is the
model alone, the hardest case for the ratio. Then runs `dist-train export RUN --format hf`
in a child process and reads its peak resident set (wait4's ru_maxrss), and that of a
child that does what export does before it reads a tensor (imports, metadata, the meta
model: the floor). Prints the checkpoint size, the export's peak, the ratios peak / size
(goal <= 0.2) and (peak - floor) / size, and the times. The temporary folder (the
checkpoint and the export) is removed at the end, also on Ctrl-C or SIGTERM.

`--layers N` shrinks the model (same widths) when the machine is too small or slow.

Run:  OMP_NUM_THREADS=1 .venv/bin/python bench/export.py [--nproc 4] [--layers 16] [--dtype fp32|bf16]
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(run_dir: Path, layers: int) -> list[str]:
    return ["model.preset=llama-1b", f"model.n_layers={layers}", f"run.dir={run_dir.parent}", f"run.name={run_dir.name}",
            "train.optimizer=sgd", "train.global_batch=4", "train.micro_batch=1", "data.seq_len=128"]


def _save_rank(rank: int, world: int, port: int, run_dir: str, layers: int) -> None:
    import torch
    import torch.distributed as dist

    from dist_train.checkpoint import Checkpointer
    from dist_train.config import load_config
    from dist_train.model import ModelArgs
    from dist_train.parallel.dims import ParallelDims
    from dist_train.parallelize import parallelize
    from dist_train.trainer import build_optimizer

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = load_config(None, _overrides(Path(run_dir), layers))
    dims = ParallelDims.resolve(world, dp_shard=world)
    mesh, _ = dims.build_mesh("cpu")
    args = ModelArgs.from_config(cfg.model, cfg.data.seq_len, cfg.model.vocab_size)
    par = parallelize(args, cfg, dims, mesh, torch.device("cpu"), None, n_micro=1)
    opt, sched = build_optimizer(cfg, par.view)
    if rank == 0:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / "config.toml").write_text(cfg.to_toml())
    Checkpointer(Path(run_dir) / "checkpoints", keep=1, log=lambda m: None).save(
        1, par.view, opt, {"sampler": {}, "scheduler": sched.state_dict()})
    dist.destroy_process_group()


def make_checkpoint(run_dir: Path, nproc: int, layers: int) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_save_rank, args=(nproc, _port(), str(run_dir), layers), nprocs=nproc, join=True)


# everything `export` does before it reads a tensor: the imports (the CLI, DCP, the data
# package for the tokenizer), the checkpoint's metadata, the run's model on the meta device
FLOOR = """
import sys
from pathlib import Path
import dist_train.cli
from dist_train.interop import export as ex
run = Path(sys.argv[1])
reader = ex.ChunkReader(ex.find_checkpoint(run, None))
prefix = ex.choose_source(reader.tensors.keys(), None)
shapes = {k[len(prefix):]: tuple(md.size) for k, md in reader.tensors.items() if k.startswith(prefix)}
cfg, _, _ = ex.run_args(run, shapes)
ex._eos_id(cfg)
"""


def peak_rss(cmd: list[str]) -> tuple[int, float, str]:
    """Peak resident bytes of a child process (and its wall time, its stdout)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    _, status, usage = os.wait4(proc.pid, 0)
    out, err = proc.stdout.read(), proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-4000:]}")
    return usage.ru_maxrss * 1024, time.perf_counter() - t0, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=4, help="ranks saving the checkpoint (FSDP2 dp_shard)")
    p.add_argument("--layers", type=int, default=16, help="transformer blocks (llama-1b: 16)")
    p.add_argument("--dtype", default=None, help="export --dtype (default: as saved, fp32)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    a = p.parse_args()
    # a SIGTERM (a timeout, a killed job) unwinds through the finally below like Ctrl-C,
    # so the checkpoint (5 GB at the full shape) does not stay behind in the temp folder
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = Path(tempfile.mkdtemp(prefix="bench-export-"))
    try:
        run_dir = tmp / "run"
        t0 = time.perf_counter()
        make_checkpoint(run_dir, a.nproc, a.layers)
        save_s = time.perf_counter() - t0
        ckpt = next((run_dir / "checkpoints").glob("step-*"))
        size = sum(f.stat().st_size for f in ckpt.iterdir())
        floor, _, _ = peak_rss([sys.executable, "-c", FLOOR, str(run_dir)])
        cmd = [sys.executable, "-m", "dist_train", "export", str(run_dir), "--out", str(tmp / "hf")]
        peak, secs, out = peak_rss(cmd + (["--dtype", a.dtype] if a.dtype else []))
        written = sum(f.stat().st_size for f in (tmp / "hf").iterdir())
        print(out.strip())
        print(f"model: llama-1b shape, {a.layers} layers; checkpoint saved by {a.nproc} ranks (FSDP2) in {save_s:.0f} s")
        print(f"checkpoint {size / 1e9:.2f} GB; export wrote {written / 1e9:.2f} GB in {secs:.0f} s")
        print(f"export peak RSS {peak / 1e9:.2f} GB = {peak / size:.3f} x the checkpoint (goal <= 0.2 x)")
        print(f"floor (imports, metadata, meta model; no tensor read) {floor / 1e9:.2f} GB; "
              f"peak above it {(peak - floor) / 1e9:.2f} GB = {(peak - floor) / size:.3f} x the checkpoint")
    finally:
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
