"""`dist-train drill`: run simulated jobs with injected faults and check that C4 names them.

Every drill is one run of a `--runs` sweep in a single `dist-train local` launch (one
start-up for all of them). A drill that stops the job (hang, crash, SIGSTOP) costs one
elastic restart: the job resumes that run from its latest checkpoint with the one-shot
fault spent, which is the stop-and-restart path itself under test. Finished runs are
dropped from the runs file as they complete, so a restart does not set them up again.

For each drill: was it detected, which kind and ranks were named, is that right, and
the time (and steps) from the fault's first effect to the finding. `--all` writes the
table as drill.md and drill.json in the drill directory.
"""
from __future__ import annotations

import json
import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dist_train.errors import UserError

# Small, fast jobs: the drills test detection, not the model.
DEFAULTS = {"model.dim": 32, "model.n_layers": 2, "data.seq_len": 32, "train.global_batch": 16,
            "train.micro_batch": 2, "train.warmup": 2, "checkpoint.every": 2, "checkpoint.keep": 2,
            "checkpoint.resume": "latest", "metrics.progress": "false", "metrics.report": "false",
            "c4.enabled": "true"}
EXPECT = {"delay": "slow_rank", "slow_compute": "slow_rank", "slow_link": "slow_link", "hang": "hang",
          "sigstop": "non_comm_hang", "crash": "crash", "jitter": None}
RESTARTS = ("hang", "sigstop", "crash")
WATCHDOG_S = 90.0  # no progress for this long: kill the attempt (a missed hang would wait 600 s)


@dataclass
class Drill:
    name: str
    spec: str
    expect_kind: str | None
    expect_ranks: list
    steps: int
    sets: dict = field(default_factory=dict)
    result: dict = field(default_factory=dict)


def link_layout(nproc: int) -> dict:
    """tp=2 x dp_shard=2 (x dp_replicate): every dp_shard group is a pair (r, r+2), so a
    slow link between such a pair has sibling groups to be compared with."""
    if nproc % 4:
        raise UserError(f"slow_link drills need --nproc divisible by 4 (got {nproc})")
    return {"parallel.tp": 2, "parallel.dp_shard": 2, "parallel.dp_replicate": nproc // 4}


def _link_gap(nproc: int, pp: int) -> int:
    """A slow_link drill's pair is (r, r + gap): with a pipeline, adjacent stages (the same
    position in stage s and s + 1, the mesh's pp dim being outermost); without one, the
    dp_shard pairs of `link_layout` (also r % 4 in (0, 1))."""
    return nproc // pp if pp > 1 else 2


def link_pairs(nproc: int, pp: int) -> str:
    gap = _link_gap(nproc, pp)
    if pp > 1:
        return f"(r, r+{gap}) for r < {nproc - gap} (adjacent pipeline stages)"
    return f"(r, r+{gap}) with r % 4 in (0, 1)"


def _is_link_pair(a: int, b: int, nproc: int, pp: int) -> bool:
    return b - a == _link_gap(nproc, pp) and (pp > 1 or a % 4 <= 1)


def make_drill(spec: str, nproc: int, tag: str = "", jitter_steps: int = 40, pp: int = 1) -> Drill:
    from dist_train.fault.inject import InjectError, parse_spec

    try:
        inj = parse_spec(spec, nproc)
    except InjectError as e:
        raise UserError(f"--fault: {e}") from None
    kind = inj.kind
    if kind == "hang" and inj.where == "compute":
        expect = "non_comm_hang"
    else:
        expect = EXPECT[kind]
    sets, steps = {}, 18
    if kind in RESTARTS:
        steps = max(10, inj.step + 4)
    if kind == "jitter":
        steps = jitter_steps
        sets["train.global_batch"] = 2 * nproc  # one micro-batch per rank: long runs stay short
    # one-shot faults need a checkpoint just before them to restart from; the rest only the final one
    sets["checkpoint.every"] = 2 if kind in RESTARTS else steps
    if kind == "sigstop":
        # The outside hand stops the rank once its published state (every 0.2 s, read every
        # 0.2 s) shows step S while training. Tiny steps take ~60 ms here, so with a
        # checkpoint every 2 steps each publication could fall in a checkpoint write and the
        # stop came 15 steps late or after the run ended: checkpoint at S, then train.
        steps = inj.step + 20
        sets["checkpoint.every"] = max(inj.step, 4)
    if kind == "slow_link":
        if pp == 1:  # a layout with sibling pairs of ranks; a pipeline brings its own
            sets.update(link_layout(nproc))
        a, b = inj.ranks
        if not _is_link_pair(a, b, nproc, pp):
            layout = f"pp={pp}" if pp > 1 else "tp=2 x dp_shard=2"
            raise UserError(f"--fault {spec}: in the drill layout ({layout}) the linked pairs are "
                            f"{link_pairs(nproc, pp)}, e.g. ranks=0-{_link_gap(nproc, pp)}")
    slug = spec.replace(":", "-").replace(",", "-").replace("=", "")
    return Drill(f"{slug}{tag}", spec, expect, list(inj.targets) if expect else [], steps, sets)


def all_drills(nproc: int, jitter_steps: int = 40, pp: int = 1) -> list[Drill]:
    """Every kind on rank 0 and on the last rank; slow faults start at step 4 (after warm-up);
    SIGSTOP freezes the rank at a random moment of its step 6 (not at its start)."""
    last = nproc - 1
    specs = ["jitter:pct=20"]
    for r in (0, last):
        specs += [f"delay:rank={r},ms=10,step=4", f"slow_compute:rank={r},factor=2,step=4",
                  f"hang:rank={r},step=6", f"hang:rank={r},step=6,where=compute", f"sigstop:rank={r},step=6,at=random,seed={r + 1}",
                  f"crash:rank={r},step=6"]
    # a link 20 ms slower per message stands out on a loaded machine too (5 ms was lost in
    # the waits' noise when another job shared the 2 cores)
    ms = 20
    gap = _link_gap(nproc, pp)
    specs += [f"slow_link:ranks=0-{gap},ms={ms},step=4",
              f"slow_link:ranks={last - gap}-{last},ms={ms},step=4"]
    return [make_drill(s, nproc, jitter_steps=jitter_steps, pp=pp) for s in specs]


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _finished(run_dir: Path, steps: int) -> bool:
    latest = run_dir / "checkpoints" / "latest"
    return latest.exists() and latest.read_text().strip() == f"step-{steps:06d}"


def evaluate(d: Drill, run_dir: Path) -> dict:
    findings = [f for f in _read_jsonl(run_dir / "c4" / "findings.jsonl") if not f["kind"].startswith("gpu_")]
    injected = _read_jsonl(run_dir / "c4" / "injections.jsonl")
    onset = min(injected, key=lambda e: e["time"]) if injected else None
    metrics = _read_jsonl(run_dir / "metrics.jsonl")
    right = [f for f in findings if f["kind"] == d.expect_kind and sorted(f["ranks"]) == sorted(d.expect_ranks)]
    wrong = [f for f in findings if f not in right]
    hit = right[0] if right else None
    first = hit or (findings[0] if findings else None)
    res = {"detected": bool(findings),
           "named": f"{first['kind']} {first['ranks']}" if first else "-",
           "correct": (hit is not None and not wrong) if d.expect_kind else not findings,
           "time_to_detect_s": None, "steps_to_detect": None,
           "completed": bool(metrics) and metrics[-1]["step"] == d.steps,
           "false_findings": [f"{f['kind']} {f['ranks']}" for f in wrong]}
    if hit is not None and onset is not None:
        res["time_to_detect_s"] = round(hit["time"] - onset["time"], 2)
        if hit.get("step") is not None and d.expect_kind in ("slow_rank", "slow_link"):
            res["steps_to_detect"] = hit["step"] - onset["step"] + 1
    return res


def run_drills(config: str | None, overrides: list[str], drills: list[Drill], nproc: int, root: Path) -> list[Drill]:
    """All drills in one launch; fills each drill's `result`."""
    from dist_train.config import load_runs
    from dist_train.launchers.local import LocalJob
    from dist_train.layout import preflight

    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for d in drills:
        sets = {**DEFAULTS, "run.dir": str(root), "run.name": d.name, "train.steps": d.steps, **d.sets}
        entries.append([f"{k}={v}" for k, v in sets.items()] + [f"fault.inject={json.dumps([d.spec])}"])
    runs_file = root / "runs.json"
    runs_file.write_text(json.dumps(entries))
    plan = preflight(load_runs(config, overrides, str(runs_file)), nproc)
    restarts = sum(1 for d in drills if d.spec.split(":")[0] in RESTARTS) + 2
    job = LocalJob(config, overrides, nproc, 1, restarts, str(runs_file), plan)

    done = threading.Event()

    def watchdog():  # drop finished runs from the runs file; kill an attempt that stopped moving
        last_progress, last_sizes = time.monotonic(), None
        while not done.wait(1.0):
            left = [e for e, d in zip(entries, drills) if not _finished(root / d.name, d.steps)]
            if left and len(left) < len(json.loads(runs_file.read_text())):
                tmp = runs_file.with_suffix(".tmp")
                tmp.write_text(json.dumps(left))
                os.replace(tmp, runs_file)
            sizes = [(root / d.name / "metrics.jsonl").stat().st_size if (root / d.name / "metrics.jsonl").exists()
                     else 0 for d in drills]
            if sizes != last_sizes:
                last_sizes, last_progress = sizes, time.monotonic()
            elif time.monotonic() - last_progress > WATCHDOG_S:
                print(f"drill: no progress for {WATCHDOG_S:.0f} s; killing attempt {job.watcher.attempt}", flush=True)
                job.kill_attempt()
                last_progress = time.monotonic()

    t = threading.Thread(target=watchdog, daemon=True)
    t.start()
    t0 = time.monotonic()
    error = None
    try:
        job.run()
    except UserError as e:
        error = str(e)
    finally:
        done.set()
        t.join(timeout=5)
    wall = time.monotonic() - t0
    for d in drills:
        d.result = evaluate(d, root / d.name)
    if error:
        print(f"drill: the launch ended with an error: {error}", flush=True)
    print(f"drill: {len(drills)} drill(s) on {nproc} ranks in one launch, {wall:.0f} s", flush=True)
    return drills


def table(drills: list[Drill]) -> str:
    rows = ["| drill | expected | named | correct | time to detect (s) | steps | job completed |",
            "|---|---|---|---|---|---|---|"]
    for d in drills:
        r = d.result
        exp = f"{d.expect_kind} {d.expect_ranks}" if d.expect_kind else "no finding"
        ttd = "-" if r["time_to_detect_s"] is None else f"{r['time_to_detect_s']:.2f}"
        steps = "-" if r["steps_to_detect"] is None else str(r["steps_to_detect"])
        named = r["named"] + (f" (also: {', '.join(r['false_findings'])})" if r["false_findings"] and
                              r["named"] not in r["false_findings"] else "")
        rows.append(f"| `{d.spec}` | {exp} | {named} | {'yes' if r['correct'] else 'NO'} | {ttd} | {steps} "
                    f"| {'yes' if r['completed'] else 'no'} |")
    return "\n".join(rows)


REPLICA_ALL = ("replica_kill:id=b,step=12", "replica_join:step=12", "replica_kill_during_heal:step=12",
               "lighthouse_kill:step=12")
# elastic drills' jobs: fast steps, an outer step every 5, a checkpoint at each
REPLICA_DEFAULTS = {"diloco.enabled": "true", "diloco.inner_steps": 5, "checkpoint.every": 5,
                    "metrics.progress": "false", "metrics.report": "false", "data.seq_len": 64,
                    "train.global_batch": 8, "train.steps": 80, "elastic.timeout_s": 10, "elastic.quorum_timeout_s": 15,
                    "fault.inject": '["slow_exchange:ms=60"]'}


def replica_drill_command(args) -> None:
    """`dist-train drill --replicas R`: each fault in its own elastic job (module docstring
    of launchers/replicas.py), a table of expected against observed."""
    from dist_train.config import load_config
    from dist_train.fault.inject import REPLICA_FAULTS, InjectError, parse_spec
    from dist_train.launchers.replicas import replica_drill

    specs = list(REPLICA_ALL) if args.all else args.fault
    if not specs:
        raise UserError("drill --replicas: pass --fault replica_kill:id=b,step=30 (or replica_join, "
                        "replica_kill_during_heal, lighthouse_kill) or --all")
    for spec in specs:
        try:
            kind = parse_spec(spec).kind
        except InjectError as e:
            raise UserError(f"--fault: {e}") from None
        if kind not in REPLICA_FAULTS:
            raise UserError(f"--fault {spec}: with --replicas use one of {', '.join(REPLICA_FAULTS)}")
    base = load_config(args.config, args.overrides)
    root = Path(base.run.dir) / f"drill-{time.strftime('%Y%m%d-%H%M%S')}"
    results = []
    for i, spec in enumerate(specs):
        overrides = ([f"{k}={v}" for k, v in REPLICA_DEFAULTS.items()] + list(args.overrides)
                     + [f"run.dir={root}", f"run.name=d{i}"])
        probe = load_config(args.config, [*overrides, "elastic.lighthouse=127.0.0.1:1", "elastic.replica_id=a"])
        t0 = time.monotonic()
        r = replica_drill(args.config, overrides, args.nproc, args.replicas, spec, root / f"d{i}",
                          quorum_timeout_s=probe.elastic.quorum_timeout_s)
        r["seconds"] = round(time.monotonic() - t0, 1)
        results.append(r)
        print(f"drill {spec}: {'correct' if r['correct'] else 'NOT correct'} ({r['observed']})", flush=True)
    rows = ["| drill | expected | observed | correct |", "|---|---|---|---|"]
    rows += [f"| `{r['spec']}` | {r['expected']} | {r['observed']} | {'yes' if r['correct'] else 'NO'} |"
             for r in results]
    text = "\n".join(rows)
    root.mkdir(parents=True, exist_ok=True)
    (root / "drill.md").write_text(f"# Elastic drills: {args.replicas} replicas of {args.nproc} ranks\n\n{text}\n")
    (root / "drill.json").write_text(json.dumps(results, indent=1))
    print(text)
    bad = [r for r in results if not r["correct"]]
    if bad:
        raise UserError(f"{len(bad)} elastic drill(s) went wrong (see {root / 'drill.md'})")


def drill_command(args) -> None:
    from dist_train.config import load_config

    if getattr(args, "replicas", 0):
        return replica_drill_command(args)
    if not args.all and not args.fault:
        raise UserError("drill: pass --fault KIND:rank=R,... (e.g. --fault hang:rank=2,step=6) or --all")
    from dist_train.launchers import rank_server

    rank_server.start()  # the ranks' fork server imports while this process does
    base = load_config(args.config, args.overrides)
    pp = base.parallel.pp
    drills = (all_drills(args.nproc, args.jitter_steps, pp=pp) if args.all
              else [make_drill(s, args.nproc, jitter_steps=args.jitter_steps, pp=pp) for s in args.fault])
    if args.repeats > 1:
        drills = [Drill(f"{d.name}-{k}", d.spec, d.expect_kind, d.expect_ranks, d.steps, d.sets)
                  for k in range(args.repeats) for d in drills]
    root = Path(base.run.dir) / f"drill-{time.strftime('%Y%m%d-%H%M%S')}"
    run_drills(args.config, args.overrides, drills, args.nproc, root)
    text = table(drills)
    print(text)
    (root / "drill.md").write_text(f"# C4 drills on {args.nproc} ranks\n\n{text}\n")
    (root / "drill.json").write_text(json.dumps([asdict(d) for d in drills], indent=1))
    ok = sum(d.result["correct"] for d in drills)
    ttd = [d.result["time_to_detect_s"] for d in drills if d.result["time_to_detect_s"] is not None]
    print(f"\n{ok}/{len(drills)} drills correct; median time to detect "
          f"{statistics.median(ttd) if ttd else float('nan'):.2f} s; table: {root / 'drill.md'}")
    if ok < len(drills):
        raise UserError(f"{len(drills) - ok} drill(s) not detected or misnamed (see {root / 'drill.md'})")
