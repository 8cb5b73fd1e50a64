"""What a rank says when the job fails around it: one line on the terminal, the
traceback in the run directory.

When a peer dies (kill -9, a lost node), every survivor's next collective raises from
gloo or NCCL with a long traceback through FSDP or DTensor that says nothing a user can
act on, once per rank. A survivor instead names what was lost (the group, its ranks, the
op, the transport's reason) and what happens next (the launcher restarts the job from
its latest checkpoint, or there are no restarts left), and writes the traceback to
`<run dir>/logs/rank<R>-attempt<A>.log` for whoever debugs it.
"""
from __future__ import annotations

import os
import re
import traceback
from pathlib import Path

from .distributed import job_attempt

# what gloo and NCCL say when the other end of a connection is gone
_TRANSPORT = re.compile(r"(Connection reset by peer|Connection closed by peer|Broken pipe|Connection refused|"
                        r"Socket Timeout|Timed out waiting|NCCL communicator was aborted|"
                        r"NCCL error|ProcessGroupGloo|ProcessGroupNCCL)", re.IGNORECASE)


class PeerLost(Exception):
    """This rank's job lost a peer; the message is the one line to print (`quiet`: this
    rank prints nothing, another rank of its replica says it)."""

    def __init__(self, message: str, quiet: bool = False):
        super().__init__(message)
        self.quiet = quiet


def peer_lost(exc: BaseException, recorder, run_dir: Path, rank: int) -> PeerLost | None:
    """A PeerLost for `exc` if it is a collective failing because a peer is gone (its
    traceback written to the run directory), else None (a bug keeps its traceback)."""
    failure = recorder.last_failure() if recorder is not None else None
    text = f"{type(exc).__name__}: {exc}"
    from_collective = failure is not None and failure[1].error == text
    reason = _TRANSPORT.search(str(exc))
    if not from_collective and reason is None:
        return None
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))  # this agent's budget
    log = _write_traceback(exc, Path(run_dir) / "logs" / f"rank{rank}-attempt{job_attempt()}.log")
    where = ""
    if failure is not None:
        st, rec = failure
        where = f" in group {st.name} (ranks {_ranks(st.ranks)}) during {rec.op} #{rec.seq}"
    why = reason.group(1) if reason else str(exc).splitlines()[0][:120]
    return PeerLost(f"rank {rank} lost a peer{where}: {why}; {_next_step(attempt)} "
                    f"(traceback: {log})")


def _next_step(attempt: int) -> str:
    """What the launcher does next, from the restart budget torchrun gives its workers."""
    max_restarts = os.environ.get("TORCHELASTIC_MAX_RESTARTS")
    if max_restarts is None:
        return "the job stops"
    left = int(max_restarts) - attempt
    if left > 0:
        return f"the launcher restarts the job from its latest checkpoint ({left} restart(s) left)"
    return (f"no restarts left (--max-restarts {max_restarts}): the job stops; run it again to resume "
            "from its latest checkpoint")


def _ranks(ranks) -> str:
    ranks = list(ranks)
    if ranks == list(range(ranks[0], ranks[-1] + 1)) and len(ranks) > 2:
        return f"{ranks[0]}-{ranks[-1]}"
    return ",".join(map(str, ranks))


def _write_traceback(exc: BaseException, path: Path) -> Path:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write("".join(traceback.format_exception(exc)))
    except OSError:
        return Path("(not written: the run directory is not writable)")
    return path
