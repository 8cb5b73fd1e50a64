"""`dist-train sbatch`: a SLURM batch script that runs the job on N nodes.

One `srun` task per node runs `dist-train torchrun` (torch's elastic agent, see
launchers/torchrun.py) with the same command line everywhere: the nodes meet through the
c10d rendezvous on the first node's host name, so no node rank is assigned by hand, and
with `--min-nodes` below `--nodes` the job carries on after losing a node (SLURM's
`--no-kill` keeps the allocation; the survivors restart from the latest checkpoint on
the smaller world). The run directory must be on storage every node sees: checkpoints
are written by every rank and read back by whichever ranks resume.
"""
from __future__ import annotations

import os
import shlex
import sys
from datetime import datetime
from pathlib import Path

from dist_train.errors import UserError

LOCAL_STORAGE = ("/tmp", "/var/tmp", "/dev/shm", "/scratch/local")


def sbatch_command(args) -> None:
    print(sbatch_script(args), end="")


def sbatch_script(args) -> str:
    from dist_train.config import load_runs
    from dist_train.layout import preflight

    per_node, min_nodes = _check(args)
    cfgs = load_runs(args.config, args.overrides, args.runs)
    preflight(cfgs, args.nodes * per_node, args.nodes)
    run_dir = cfgs[0].run_dir.resolve()
    if str(run_dir).startswith(LOCAL_STORAGE):
        print(f"dist-train sbatch: warning: run.dir {run_dir} looks node-local; every node must see the same "
              "run directory (set run.dir to shared storage)", file=sys.stderr)
    nnodes = f"{min_nodes}:{args.nodes}" if min_nodes < args.nodes else str(args.nodes)
    train = [str(Path(args.config).resolve())] if args.config else []
    train += [a for o in args.overrides for a in ("--set", o)]
    train += ["--runs", str(Path(args.runs).resolve())] if args.runs else []
    launch = [sys.executable, "-m", "dist_train", "torchrun", f"--nnodes={nnodes}", f"--nproc-per-node={per_node}",
              "--rdzv-backend=c10d", f"--max-restarts={args.max_restarts}"]
    sbatch = {"job-name": cfgs[0].run.name, "nodes": f"{min_nodes}-{args.nodes}" if min_nodes < args.nodes else args.nodes,
              "ntasks-per-node": 1, "gpus-per-node": args.gpus_per_node or None, "cpus-per-task": args.cpus_per_node,
              "time": args.time, "partition": args.partition, "account": args.account,
              "output": f"{run_dir}/slurm-%j.out", "chdir": os.getcwd()}
    lines = ["#!/bin/bash",
             f"# dist-train: {cfgs[0].run.name} on {nnodes} node(s) x {per_node} rank(s), written by "
             f"`dist-train sbatch` on {datetime.now():%Y-%m-%d %H:%M}. Submit with: sbatch THIS_FILE",
             f"# The run directory must be on storage every node sees: {run_dir}"]
    lines += [f"#SBATCH --{k}={v}" for k, v in sbatch.items() if v is not None]
    lines += ["#SBATCH --no-kill  # a lost node leaves the others running: they resume without it"
              if min_nodes < args.nodes else "# a lost node ends the job (--min-nodes lets the others carry on)",
              "set -euo pipefail",
              'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
              "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1  # restarted ranks meet in a store of their own",
              "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}",
              "# one agent per node; they meet on the first node (the rendezvous host for the whole job)",
              "srun --ntasks-per-node=1 --kill-on-bad-exit=0 \\",
              "  " + " ".join(shlex.quote(a) for a in launch) + ' \\',
              f'  --rdzv-endpoint="$head_node:{args.port}" --rdzv-id="dist-train-$SLURM_JOB_ID" \\',
              "  " + " ".join(shlex.quote(a) for a in train)]
    return "\n".join(lines) + "\n"


def _check(args) -> tuple[int, int]:
    if args.nodes < 1:
        raise UserError(f"--nodes {args.nodes}: must be at least 1")
    if args.gpus_per_node < 0:
        raise UserError(f"--gpus-per-node {args.gpus_per_node}: must be 0 or more")
    per_node = args.procs_per_node if args.procs_per_node is not None else args.gpus_per_node
    if per_node < 1:
        raise UserError("--procs-per-node: give the ranks per node (or --gpus-per-node G for one rank per GPU)")
    if args.gpus_per_node and per_node != args.gpus_per_node:
        raise UserError(f"--procs-per-node {per_node} with --gpus-per-node {args.gpus_per_node}: one rank per "
                        "GPU, so they must be equal (or leave --procs-per-node out)")
    min_nodes = args.nodes if args.min_nodes is None else args.min_nodes
    if not 1 <= min_nodes <= args.nodes:
        raise UserError(f"--min-nodes {min_nodes}: must be between 1 and --nodes {args.nodes}")
    if args.max_restarts < 0:
        raise UserError(f"--max-restarts {args.max_restarts}: must be 0 or more")
    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port}: must be a TCP port (1-65535)")
    return per_node, min_nodes
