"""`dist-train torchrun`: torchrun running `-m dist_train train`, with multi-node defaults
set and launch failures said in one line.

It is torch's own launcher (`torch.distributed.run`: the elastic agent, the c10d
rendezvous), given the same options as `torchrun`, followed by CONFIG and `--set`s in place
of a training script. What it adds, and why plain torchrun cannot:
- the run's config and layout are checked once on this node before any rank starts
  (at the job's largest world, --nnodes' maximum times --nproc-per-node);
- on more than one node, TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: each agent counts its own
  restarts, so restarted ranks cannot share the rendezvous store under a per-restart
  prefix (pytorch issue 135712); rank 0 hosts theirs;
- with an elastic `--nnodes MIN:MAX`, unless given: `--rdzv-conf last_call_timeout=1` (else
  every rendezvous round waits ~30 s for nodes that will not come) and a dead node dropped
  after 3 missed keep-alives 2 s apart (`keep_alive_interval=2,keep_alive_max_attempt=3`;
  torch's 5 s x 3 keeps the survivors waiting for it 15 s);
- a rendezvous that times out or cannot be reached, and a failed rank, end in one line
  naming the endpoint and the fix, instead of the agent's traceback.
Plain `torchrun ... -m dist_train train CONFIG` works too (docs/launch.md says what to set).
"""
from __future__ import annotations

import os

from dist_train.errors import UserError

SHARE_STORE_ENV = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"
ELASTIC_RDZV = {"last_call_timeout": 1, "keep_alive_interval": 2, "keep_alive_max_attempt": 3}


class LaunchFailed(Exception):
    """The job ran and failed on this node; the ranks have said why."""


def torchrun_command(argv: list[str], parse_train) -> None:
    """Run torchrun's options `argv` on this node; `parse_train(args)` reads what follows
    them as `dist-train train` does (the CLI's parser: config, --set, --runs)."""
    torch_run = _import_quietly()
    args = _parse(torch_run, argv)
    train_args = [args.training_script, *args.training_script_args]
    min_nodes, max_nodes = torch_run.parse_min_max_nnodes(args.nnodes)
    per_node = torch_run.determine_local_world_size(args.nproc_per_node)
    _preflight(parse_train(train_args), max_nodes * per_node, max_nodes)
    if max_nodes > 1:
        os.environ.setdefault(SHARE_STORE_ENV, "1")
    if min_nodes < max_nodes:
        given = {c.split("=", 1)[0].strip() for c in (args.rdzv_conf or "").split(",") if c}
        elastic = [f"{k}={v}" for k, v in ELASTIC_RDZV.items() if k not in given]
        args.rdzv_conf = ",".join(c for c in (args.rdzv_conf, *elastic) if c)
    args.module, args.training_script, args.training_script_args = True, "dist_train", ["train", *train_args]
    _run(torch_run, args)


def _import_quietly():
    """torch.distributed.run, with this process's C++ log at FATAL (a store that does not
    answer logs every retry with a C++ stack; the one line below says it). The ranks do not
    inherit the setting: it is read once, when torch loads."""
    before = os.environ.get("TORCH_CPP_LOG_LEVEL")
    os.environ["TORCH_CPP_LOG_LEVEL"] = "FATAL"
    try:
        from torch.distributed import run as torch_run
    finally:
        if before is None:
            del os.environ["TORCH_CPP_LOG_LEVEL"]
        else:
            os.environ["TORCH_CPP_LOG_LEVEL"] = before
    return torch_run


def _parse(torch_run, argv: list[str]):
    parser = torch_run.get_args_parser()
    parser.prog = "dist-train torchrun"

    def error(message: str):
        message = message.replace("training_script, training_script_args", "CONFIG").replace("training_script", "CONFIG")
        raise UserError(f"torchrun: {message} (usage: dist-train torchrun [torchrun options] CONFIG [--set ...])")

    parser.error = error
    args = parser.parse_args(argv)
    if args.module or args.no_python or args.run_path:
        raise UserError("torchrun: --module/-m, --no-python and --run-path do not apply: dist-train torchrun "
                        "always runs `-m dist_train train`; give CONFIG [--set SECTION.KEY=VALUE ...]")
    if args.training_script.startswith("-") or args.training_script.endswith(".py"):
        raise UserError(f"torchrun: {args.training_script!r} is not a config: after the torchrun options comes "
                        "CONFIG (a .toml file), then --set SECTION.KEY=VALUE ... or --runs RUNS.json")
    return args


def _preflight(ns, nproc: int, nodes: int) -> None:
    """Check the runs as `dist-train train` will read them, at the job's largest world."""
    from dist_train.config import load_runs
    from dist_train.layout import preflight

    overrides = list(ns.overrides) + ([f"topology.file={os.path.abspath(ns.topology)}"] if ns.topology else [])
    preflight(load_runs(ns.config, overrides, ns.runs), nproc, nodes)


def _run(torch_run, args) -> None:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import (RendezvousClosedError, RendezvousConnectionError,
                                                          RendezvousError, RendezvousTimeoutError)

    where = f"the rendezvous at {args.rdzv_endpoint or 'localhost'}"
    if args.rdzv_id != "none":
        where += f" (--rdzv-id {args.rdzv_id})"
    try:
        torch_run.run(args)
    except ChildFailedError as e:
        rank, first = e.get_first_failure()
        raise LaunchFailed(f"{len(e.failures)} rank(s) on this node failed, first rank {rank} "
                           f"(exit {first.exitcode}); its own message is above, its log under the run "
                           "directory's logs/") from None
    except RendezvousTimeoutError:
        raise UserError(f"{where} timed out before --nnodes {args.nnodes} node(s) joined: start the same "
                        "command on every node (same --rdzv-endpoint and --rdzv-id), or lower --nnodes; "
                        "--rdzv-conf join_timeout=S sets the wait") from None
    except RendezvousConnectionError as e:
        cause = f" ({e.__cause__})" if e.__cause__ else ""
        raise UserError(f"nobody answers: {where}{cause}: the first node hosts it; check that it runs "
                        "and that the host and port are reachable from this node") from None
    except RendezvousClosedError:
        raise LaunchFailed(f"{where} was closed: the job already ended on the other nodes") from None
    except RendezvousError as e:
        raise UserError(f"{where}: {e}") from None
