"""The `dist-train` command: train, local, ray, torchrun, sbatch, lighthouse, prepare, export, verify,
report, drill, plan.

User mistakes (bad config, bad data, impossible layout) end in one line naming the field
and the fix, exit code 2 — never a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys

from .errors import UserError


def _user_errors() -> tuple[type[BaseException], ...]:
    from dist_train.data import DataError
    from dist_train.kernels import KernelBackendError
    from dist_train.parallel.dims import MeshError

    return (UserError, DataError, MeshError, KernelBackendError)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dist-train", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    def config_args(sp):
        sp.add_argument("config", nargs="?", help="TOML config (default: the built-in tiny config)")
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value, e.g. --set train.steps=20 (repeatable)")
        sp.add_argument("--runs", metavar="RUNS.json",
                        help="several runs one after another in the same launch: a JSON list of lists of "
                             "overrides (a sweep; saves the start-up of a job per run)")

    def topology_arg(sp):
        sp.add_argument("--topology", metavar="T.toml",
                        help="a TOML file with a [topology] table: clusters of nodes and per link class a bandwidth "
                             "and latency (sets topology.file; `local` simulates the slow links)")

    sp = sub.add_parser("train", help="train inside an already-launched job (torchrun, Ray, `local`)")
    config_args(sp)
    topology_arg(sp)
    sp = sub.add_parser("local", help="train on N simulated ranks on this machine")
    config_args(sp)
    topology_arg(sp)
    sp.add_argument("--nproc", type=int, required=True, help="ranks to start (1 = the single-process reference)")
    sp.add_argument("--nodes", type=int, default=1, help="simulated nodes; each gets nproc/nodes ranks")
    sp.add_argument("--max-restarts", type=int, default=0, help="restart the job this often after a failure")
    sp.add_argument("--replicas", type=int, default=0, metavar="R",
                    help="elastic DiLoCo: a lighthouse and R replica jobs of --nproc ranks each (diloco.enabled)")
    sp = sub.add_parser("ray", help="train on a Ray cluster, one Ray Train worker per rank")
    config_args(sp)
    sp.add_argument("--workers", type=int, required=True, help="ranks (Ray Train workers) to start")
    sp.add_argument("--address", help="auto or HOST:PORT of a running Ray cluster (default: start a Ray on "
                                      "this machine for the job)")
    sp.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs Ray reserves per rank (default 1)")
    sp.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs Ray reserves per rank (default 0)")
    sp.add_argument("--max-failures", type=int, default=0,
                    help="restart the whole group this often after a worker fails (-1: no limit); each "
                         "restart resumes from the latest checkpoint")
    sub.add_parser("torchrun", help="torchrun running `dist_train train` on this node, with multi-node "
                                    "defaults and one-line launch errors: dist-train torchrun [torchrun "
                                    "options] CONFIG [--set ...]", add_help=False)
    sp = sub.add_parser("sbatch", help="print a SLURM batch script running the job on N nodes")
    config_args(sp)
    sp.add_argument("--nodes", type=int, required=True, help="nodes to ask SLURM for")
    sp.add_argument("--min-nodes", type=int, help="elastic: carry on with this many nodes after a node is "
                                                  "lost (default: --nodes, no shrinking)")
    sp.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node, one rank each")
    sp.add_argument("--procs-per-node", type=int, help="ranks per node (default: --gpus-per-node)")
    sp.add_argument("--cpus-per-node", type=int, help="CPUs to ask for per node")
    sp.add_argument("--max-restarts", type=int, default=3, help="restarts of the job after a failure (default 3)")
    sp.add_argument("--port", type=int, default=29500, help="rendezvous port on the first node (default 29500)")
    sp.add_argument("--time", help="SLURM time limit, e.g. 24:00:00")
    sp.add_argument("--partition", help="SLURM partition")
    sp.add_argument("--account", help="SLURM account")
    sp = sub.add_parser("lighthouse", help="the coordinator of elastic DiLoCo replicas (torchft's Lighthouse)")
    sp.add_argument("--bind", default="127.0.0.1:29510", help="HOST:PORT to listen on (port 0: any free one)")
    sp.add_argument("--min-replicas", type=int, default=1, help="an outer step needs at least this many replicas")
    sp.add_argument("--join-timeout-s", type=float, default=60.0,
                    help="wait this long for live replicas before forming a quorum without them (default 60; keep it "
                         "above H x the step time: a live replica later than this misses the round)")
    sp.add_argument("--heartbeat-timeout-s", type=float, default=5.0,
                    help="a replica silent this long has left")
    sp = sub.add_parser("prepare", help="turn text / JSONL / Parquet files into token shards (or a Megatron pair)")
    sp.add_argument("inputs", nargs="+", help="files or folders (.txt/.md/.py..., .jsonl, .parquet)")
    sp.add_argument("--out", required=True, help="output folder for the shards (--format megatron: the path prefix)")
    sp.add_argument("--tokenizer", default="byte", help="'byte' or a HF tokenizer.json")
    sp.add_argument("--text-field", default="text", help="JSONL field / Parquet column holding the text")
    sp.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    sp.add_argument("--verify", action="store_true", help="re-read every shard written and check its full CRC32")
    sp.add_argument("--format", dest="shard_format", choices=("arrow", "parquet", "megatron"), default="arrow",
                    help="arrow/parquet token shards in a folder, or Megatron-LM's PREFIX.bin + PREFIX.idx "
                         "(--out is then the prefix)")
    sp.add_argument("--append-eod", action="store_true",
                    help="megatron: end each document with the tokenizer's eos, as preprocess_data.py --append-eod")
    sp = sub.add_parser("export", help="turn a run's checkpoint into HF safetensors (config.json + *.safetensors, "
                                       "transformers' from_pretrained loads it) or one torch file")
    sp.add_argument("run_dir", help="the run directory (runs/<name>: config.toml and checkpoints/)")
    sp.add_argument("--step", type=int, help="the checkpoint of this step (default: checkpoints/latest)")
    sp.add_argument("--format", choices=("hf", "torch"), default="hf",
                    help="hf: LlamaForCausalLM (MoE: MixtralForCausalLM) safetensors; torch: one model.pt")
    sp.add_argument("--out", required=True, help="output folder (created; refused if it exists and is not empty)")
    sp.add_argument("--replica", type=int, help="DiLoCo runs: export this replica's own parameters instead of the "
                                                "global (outer) ones")
    sp.add_argument("--dtype", help="write the weights as fp32, bf16 or fp16 (default: as saved)")
    sp.add_argument("--max-shard-size", default="5GB", help="HF: split the safetensors into files of at most this "
                                                              "size, with an index file (default 5GB)")
    sp.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    sp = sub.add_parser("verify", help="fully check shard folders and checkpoints (every file's CRC32)")
    sp.add_argument("paths", nargs="+", help="a shard folder (index.json), a checkpoint (step-NNNNNN), a run's "
                                             "checkpoints/ folder or a run directory")
    sp = sub.add_parser("report", help="draw a run's curves to RUN_DIR/report/*.png")
    sp.add_argument("run_dir")
    sp = sub.add_parser("plan", help="rank the valid layouts of a config on N GPUs by an analytic model of "
                                     "memory per rank and step time (dist_train/planner.py)")
    sp.add_argument("config", nargs="?", help="TOML config (default: the built-in tiny config)")
    sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override one config value, e.g. --set model.n_layers=40 (repeatable)")
    sp.add_argument("--gpus", type=int, required=True, help="devices (ranks) to plan for")
    sp.add_argument("--gpu", default="h100", help="h100, a100, h200, b200 (datasheet peak, memory, link "
                                                  "defaults) or cpu (needs --device-file)")
    sp.add_argument("--topology", metavar="T.toml",
                    help="the [topology] file `dist-train local/torchrun --topology` takes (clusters, nodes, per "
                         "link class intra_node / intra_cluster / inter_cluster bandwidth_gbps in Gbit/s and "
                         "latency_ms; sets topology.file): overrides the preset's link defaults")
    sp.add_argument("--nodes", type=int, help="nodes the GPUs are on (default: topology.nodes, else 8 GPUs a node "
                                              "for the GPU presets, 1 for cpu)")
    sp.add_argument("--device-file", metavar="D.toml",
                    help="a [device] table (peak_tflops, memory_gb, baseline_gb, efficiency, overlap, name) over "
                         "the --gpu preset; needed with --gpu cpu (schema in dist_train/planner.py)")
    sp.add_argument("--top", type=int, default=10, help="layouts to print (default 10)")
    sp.add_argument("--efficiency", type=float, help="fraction of the peak the matmuls reach (default: 0.75 "
                                                      "on GPUs, the device file's on cpu)")
    sp.add_argument("--micro-batch", type=int, action="append", metavar="B",
                    help="only these micro-batch sizes (repeatable; default: every divisor of the per-rank batch)")
    sp = sub.add_parser("drill", help="C4 drills: run a simulated job with an injected fault and check that "
                                      "it is detected and named")
    config_args(sp)
    sp.add_argument("--fault", action="append", default=[], metavar="KIND:rank=R,...",
                    help="fault to inject, e.g. hang:rank=2,step=5 (repeatable; one drill each)")
    sp.add_argument("--all", action="store_true", help="one drill per fault kind (on rank 0 and on the last rank)")
    sp.add_argument("--nproc", type=int, default=4, help="ranks per drill job (default 4)")
    sp.add_argument("--repeats", type=int, default=1, help="run each drill this many times")
    sp.add_argument("--jitter-steps", type=int, default=40, help="steps of the jitter drill (no finding expected)")
    sp.add_argument("--replicas", type=int, default=0, metavar="R",
                    help="elastic DiLoCo drills: R replica jobs of --nproc ranks and a lighthouse; faults "
                         "replica_kill:id=b,step=30, replica_join:step=40, replica_kill_during_heal:step=20, "
                         "lighthouse_kill:step=30 (--all: one of each)")
    return p


def _local(args) -> None:
    if args.nodes == 1 and not args.replicas:  # the ranks' fork server imports while this process does
        from dist_train.launchers import rank_server

        rank_server.start()
    from dist_train.launchers.local import LocalJob

    from .config import load_runs
    from .layout import preflight

    if args.replicas:
        return _replicas(args)
    # fail here, once, before any rank starts (and prepare the data once)
    plan = preflight(load_runs(args.config, args.overrides, args.runs), args.nproc, args.nodes)
    LocalJob(args.config, args.overrides, args.nproc, args.nodes, args.max_restarts, args.runs, plan).run()


def _ray(args) -> None:
    from dist_train.launchers.local import worker_args
    from dist_train.launchers.ray import RayJob

    from .config import load_runs
    from .layout import preflight

    cfgs = load_runs(args.config, args.overrides, args.runs)
    plan = preflight(cfgs, args.workers, None)  # nodes unknown until Ray places the ranks: each rank re-checks
    RayJob(worker_args(args.config, args.overrides, args.runs), args.workers, cfgs[0].run_dir / "ray",
           address=args.address, cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
           max_failures=args.max_failures, plan=plan).run()


def _replicas(args) -> None:
    """`local --replicas R`: check one replica's run here, then start the lighthouse and the jobs."""
    from dist_train.launchers.replicas import local_replicas

    from .config import load_config
    from .layout import preflight

    if args.replicas < 1:
        raise UserError(f"--replicas {args.replicas}: must be at least 1")
    if args.runs:
        raise UserError("--replicas cannot be combined with --runs; launch one elastic run at a time")
    probe = load_config(args.config, [*args.overrides, "elastic.lighthouse=127.0.0.1:1", "elastic.replica_id=a"])
    preflight([probe], args.nproc, args.nodes)
    local_replicas(args.config, args.overrides, args.nproc, args.replicas, probe.run_dir.parent,
                   min_replicas=probe.elastic.min_replicas, join_timeout_s=probe.elastic.join_timeout_s)


def _prepare(args) -> None:
    from dist_train.data import prepare_command

    print(prepare_command(args.inputs, args.out, args.tokenizer, text_field=args.text_field,
                          overwrite=args.overwrite, verify=args.verify, shard_format=args.shard_format,
                          append_eod=args.append_eod).summary())


def run(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if getattr(args, "topology", None):  # every rank reads the file (an absolute path: the same on each)
        args.overrides = [*args.overrides, f"topology.file={os.path.abspath(args.topology)}"]
    if args.command == "train":
        from .config import load_runs
        from .trainer import train

        train(load_runs(args.config, args.overrides, args.runs))
    elif args.command == "local":
        _local(args)
    elif args.command == "ray":
        _ray(args)
    elif args.command == "sbatch":
        from dist_train.launchers.sbatch import sbatch_command

        sbatch_command(args)
    elif args.command == "prepare":
        _prepare(args)
    elif args.command == "drill":
        from dist_train.launchers.drill import drill_command

        drill_command(args)
    elif args.command == "lighthouse":
        from dist_train.launchers.replicas import lighthouse_command

        lighthouse_command(args.bind, args.min_replicas, args.join_timeout_s, args.heartbeat_timeout_s)
    elif args.command == "export":
        from .interop.export import export_command

        export_command(args)
    elif args.command == "verify":
        from .verify import verify_command

        verify_command(args.paths)
    elif args.command == "plan":
        from .planner import plan_command

        plan_command(args)
    elif args.command == "report":
        from .report import write_report

        print(f"report: {write_report(args.run_dir)}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["torchrun"]:  # its options are torchrun's own: torch's parser reads them
            from dist_train.launchers.torchrun import torchrun_command

            torchrun_command(argv[1:], lambda rest: _parser().parse_args(["train", *rest]))
        else:
            run(argv)
    except _user_errors() as e:
        return _exit(f"dist-train: error: {e}", 2)
    except _peer_lost() as e:
        return _exit(None if e.quiet else f"dist-train: {e}", 1)
    except _launch_failed() as e:
        return _exit(f"dist-train: {e}", 1)
    except KeyboardInterrupt:
        return 130
    return 0


def _peer_lost():
    from .failures import PeerLost  # imports torch: not before `torchrun` has set its log level

    return PeerLost


def _launch_failed():
    from dist_train.launchers.torchrun import LaunchFailed

    return LaunchFailed


def _exit(line: str | None, code: int) -> int:
    """Print the one line; a rank whose process group is still up leaves at once, without
    the interpreter's teardown (destroying a gloo group whose peers are gone can hang, and
    exiting with its threads alive can abort with 'terminate called without an active
    exception')."""
    if line is not None:
        print(line, file=sys.stderr, flush=True)
    if "torch.distributed" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            sys.stdout.flush()
            os._exit(code)
    return code
