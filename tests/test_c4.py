"""C4: fault specs, the detector's rules on hand-made states, the injector's hooks, and one
drill launch (real gloo processes, 4 ranks) that runs every fault kind on rank 0 and on
rank 3, plus a 300-step run with 20% per-rank jitter that must produce no finding."""
from __future__ import annotations

import dataclasses
import json
import time

import pytest

from dist_train.c4 import settings_of
from dist_train.config import C4Section, Config, ConfigError, load_config
from dist_train.fault.inject import FaultInjector, InjectError, parse_spec
from dist_train.fault.recorder import CollectiveRecorder
from dist_train.fault.rules import find_hangs, find_slow
from dist_train.fault.settings import C4Settings
from dist_train.fault.wire import GroupSnapshot, PeerLink, PeerStep, PendingOp, RankState, StepTime, StepWait
from tests.conftest import run_cli

# ----------------------------------------------------------------------------- specs


@pytest.mark.parametrize("spec, words", [
    ("hang:rank=2", ["needs step="]),
    ("freeze:rank=1", ["unknown kind 'freeze'", "hang"]),
    ("delay:rank=1,msec=5", ["no field 'msec'", "ms"]),
    ("delay:rank=one,ms=5", ["rank='one'", "integer"]),
    ("slow_link:ranks=1-1,ms=5", ["must differ"]),
    ("slow_compute:rank=1,factor=0.5", ["factor must be > 1"]),
    ("hang:rank=1,step=3,where=disk", ["where must be"]),
    ("crash:rank=9,step=2", ["rank 9 does not exist", "0..3"]),
    ("sigstop:rank=1,step=4,at=later", ["at must be 'step'", "or 'random'", "at=random"]),
    ("sigstop:rank=1,step=4,seed=3", ["seed only picks the moment of at=random", "add at=random or drop seed"]),
    ("sigstop:rank=1,step=4,at=random,seed=x", ["seed='x'", "integer"]),
    ("sigstop:rank=1,at=random", ["needs step="]),
])
def test_bad_specs_name_the_field_and_the_fix(spec, words):
    with pytest.raises(InjectError) as e:
        parse_spec(spec, world_size=4)
    for w in words:
        assert w in str(e.value)


def test_good_specs_and_config_errors():
    i = parse_spec("slow_link:ranks=2-1,ms=80")
    assert i.kind == "slow_link" and i.ranks == (1, 2) and i.targets == (1, 2) and i.step == 1
    assert parse_spec("hang:rank=2,step=5").where == "comm"
    i = parse_spec("sigstop:rank=1,step=4")
    assert (i.at, i.seed, i.targets) == ("step", 0, (1,))
    i = parse_spec("sigstop:rank=1,step=4,at=random,seed=7")
    assert (i.at, i.seed, i.step) == ("random", 7, 4)
    assert parse_spec("sigstop:rank=1,step=4,at=random").seed == 0
    assert load_config("configs/tiny.toml", ['fault.inject=["delay:rank=1,ms=50"]']).fault.inject
    with pytest.raises(ConfigError, match="fault.inject: .*needs ms="):
        load_config("configs/tiny.toml", ['fault.inject=["delay:rank=1"]'])
    with pytest.raises(ConfigError, match="c4.slow_ratio"):
        load_config("configs/tiny.toml", ["c4.slow_ratio=0"])


def test_config_section_is_derived_from_the_detector_settings():
    # fault/ does not import the config: [c4] is C4Settings' fields (defaults, help, ranges) plus `enabled`
    section = {f.name: f for f in dataclasses.fields(C4Section)}
    assert list(section) == ["enabled"] + [f.name for f in dataclasses.fields(C4Settings)]
    for f in dataclasses.fields(C4Settings):
        assert (section[f.name].default, section[f.name].metadata) == (f.default, f.metadata), f.name
    assert settings_of(Config()) == C4Settings()
    cfg = load_config(None, ["c4.enabled=true", "c4.stale_s=2", "c4.detector=ranks"])
    assert settings_of(cfg) == C4Settings(stale_s=2.0, detector="ranks") and "stale_s = 2.0" in cfg.to_toml()
    with pytest.raises(ConfigError, match="c4.interval_s = 9.0: must be <= 5.0"):
        load_config(None, ["c4.interval_s=9.0"])
    with pytest.raises(ConfigError, match="c4.detector = 'nowhere': must be one of"):
        load_config(None, ["c4.detector=nowhere"])


def test_sigstop_at_random_fires_later_inside_the_step_without_blocking_the_poll(tmp_path):
    """at=random: the watcher schedules the SIGSTOP a random fraction of the rank's median step
    time after it reports the step, returns at once, and logs the moment when it fires."""
    import os
    import signal
    import socket
    import subprocess

    from dist_train.fault.watcher import Watcher

    proc = subprocess.Popen(["sleep", "30"])
    try:
        s = _s(0, {}, step_s=0.4)
        s.pid, s.host, s.run, s.step = proc.pid, socket.gethostname(), str(tmp_path), 6
        logs = []
        w = Watcher(None, 1, log=logs.append,
                    sigstops=[(str(tmp_path), parse_spec("sigstop:rank=0,step=6,at=random,seed=3"))])
        w.states = {0: s}
        t0 = time.monotonic()
        w._sigstop(w.states)
        returned_s = time.monotonic() - t0
        assert not w.sigstops
        entry = None
        while time.monotonic() - t0 < 2.0 and entry is None:
            path = tmp_path / "c4" / "injections.jsonl"
            text = path.read_text() if path.exists() else ""
            entry = json.loads(text) if text.endswith("\n") else None
            time.sleep(0.01)
        assert entry is not None, logs
        assert entry["event"] == "fired" and entry["reported_step"] == 6 and 0 <= entry["after_s"] < 0.4
        # seed 3 draws 0.303 s of the 0.4 s step: the poll returned well before it fired
        assert entry["after_s"] > 0.3 and returned_s < entry["after_s"], "scheduled, not waited for"
        with open(f"/proc/{proc.pid}/stat") as fh:
            assert fh.read().split(") ")[1][0] == "T"  # stopped
        os.kill(proc.pid, signal.SIGCONT)
    finally:
        proc.kill()
        proc.wait()


# ----------------------------------------------------------------------------- injector


def test_injector_hooks():
    rec = CollectiveRecorder()
    st = rec.add_group((0, 1, 2, 3), "dp")
    exits = []
    inj = FaultInjector([parse_spec(s) for s in ("delay:rank=1,ms=30,step=2", "slow_link:ranks=1-3,ms=5",
                                                 "crash:rank=1,step=3,op=2")], rank=1, exit_fn=exits.append)
    rec.hooks.append(inj.hook)
    inj.on_step(1)
    slept = []
    real_sleep = time.sleep
    time.sleep = slept.append  # the injector's waits, recorded instead of slept
    try:
        r = rec.begin(st, "allreduce", "all_reduce", 4)
        assert slept == [] and r.hold_s == 0.005  # group holds both 1 and 3; a hold, not a sleep here
        inj.on_step(2)
        rec.begin(st, "allreduce", "all_reduce", 4)
        assert slept == [0.03]
    finally:
        time.sleep = real_sleep
    pair = rec.add_group((0, 1), "tp")
    assert rec.begin(pair, "allreduce", "all_reduce", 4).hold_s == 0  # 3 is not in it
    inj.on_step(3)
    rec.begin(st, "allreduce", "all_reduce", 4)
    assert exits == []
    rec.begin(st, "allreduce", "all_reduce", 4)  # the 2nd op of step 3
    assert exits == [13]
    other = FaultInjector([parse_spec("delay:rank=1,ms=30")], rank=2)
    assert not other  # not this rank's fault


def test_background_work_is_not_stuck_until_waited(tmp_path):
    """The trainer's deferred metrics gather is pending for a whole step on purpose: the
    published state must not show it until the caller waits, and its late completion must
    not move the group's last completed op backwards."""
    from dist_train.fault.publisher import Monitor

    rec = CollectiveRecorder()
    st = rec.add_group((0, 1), "world")
    st.gid = "0"
    mon = Monitor(rec, None, rank=0, world=2, attempt=0, run_dir=str(tmp_path), settings=C4Settings(),
                  publish=False)
    with rec.background():
        gather = rec.begin(st, "allgather", "all_gather", 8)
    assert not gather.counted and gather.background
    assert mon.state().groups["0"].pending is None  # issued, not waited: blocks no one
    later = rec.begin(st, "allgather", "all_gather", 8)
    assert mon.state().groups["0"].pending.seq == later.seq  # an ordinary op in the call is shown
    gather.t_wait = gather.t_enter + 1
    assert mon.state().groups["0"].pending.seq == gather.seq  # waited for now: the oldest pending op
    later.t_wait = later.t_enter
    st.end(later)
    st.end(gather)
    assert st.last_completed is later and mon.state().groups["0"].done == later.seq



def test_p2p_waits_count_in_the_step_wait_and_per_peer(tmp_path):
    """A pipeline stage that waited in its recvs waited: the step's wait (what the slow_rank
    rule compares) includes p2p waits, and each peer gets the step's shortest op, wait and
    op count (what the p2p slow_link rule compares)."""
    import torch.distributed as dist

    from dist_train.fault.publisher import Monitor

    rec = CollectiveRecorder()
    st = rec.add_group((0, 2), "pp")
    st.gid = "0"
    mon = Monitor(rec, dist.HashStore(), rank=0, world=2, attempt=0, run_dir=str(tmp_path), settings=C4Settings())
    try:
        for _ in range(2):  # two recvs from rank 2 ...
            st.end(rec.begin(st, "recv", "send_recv", 8, peers=(2, 0), p2p_peer=2))
        st.p2p_wait_ns[2], st.p2p_min_ns[2] = 32_000_000, 2_000_000  # ... as if they took 30 ms and 2 ms
        mon.step_end(1, 0.1)
        assert mon._steps[-1].wait_s == 0.032  # the step's wait: all of it in p2p
        assert mon.state().groups["0"].peer_steps == {2: [PeerStep(1, 0.002, 0.032, 2)]}
        assert st.p2p_min_ns == {}  # reset for the next step
    finally:
        mon.close()


def test_wire_records_round_trip_through_json():
    """What the publisher writes is what the watcher reads back, field by field."""
    s = RankState(1, "h", 7, "/x", 3, "train", 5, 2, 0.1, steps=[StepTime(5, 0.1, 1000.0, 0.02)],
                  groups={"g": GroupSnapshot("pp", [1, 3], 9, 8, "send", _inside(9, 0.5), 0.001, 0.002,
                                             [StepWait(5, 0.02, 4)], {3: PeerLink(4, _waiting(5, 1.0, "recv"))},
                                             {3: [PeerStep(5, 0.001, 0.03, 8)]})},
                  cfg={"stale_s": 1.5}, health=[{"kind": "gpu_xid", "id": 1}], attempt=2, time=1234.5)
    assert RankState.from_json(json.loads(json.dumps(s.to_json()))) == s


# ----------------------------------------------------------------------------- rules


def _waiting(seq, seconds, op="allreduce"):
    """A pending op the rank sits in wait() for."""
    return PendingOp(seq, op, entered=True, waiting=True, seconds=seconds)


def _inside(seq, seconds, op="allreduce"):
    """A pending op the rank entered but never reached wait() in."""
    return PendingOp(seq, op, entered=True, waiting=False, seconds=seconds)


def _g(name, ranks, done, p=None, w=(), d90=0.002, pp=None):
    return GroupSnapshot(name, list(ranks), done + (1 if p else 0), done, op="allreduce", pending=p, d50=0.001,
                         d90=d90, waits=[StepWait(*x) for x in w], peers=dict(pp or {}))


def _s(r, groups, steps=(), step_s=0.1, phase="train"):
    return RankState(r, "h", 100 + r, "/x", 1, phase, 10, 0, step_s,
                     steps=[StepTime(*x) for x in (steps or [(1, step_s, 1000.0, 0.0)])], groups=groups)


ST = C4Settings()


def test_hang_inside_a_collective_names_the_rank_stuck_in_the_call():
    W = [0, 1, 2, 3]
    states = {r: _s(r, {"g0": _g("dp", W, 41, _waiting(42, 3.0))}) for r in W}
    states[2].groups["g0"].pending = _inside(42, 3.0)  # entered, never reached wait()
    f = find_hangs(states, {r: 0.1 for r in W}, ST)
    assert f["kind"] == "hang" and f["ranks"] == [2]
    assert f["evidence"]["entered"] == W and f["since_onset_s"] == 3.0


def test_wait_below_the_relative_threshold_is_not_a_hang():
    W = [0, 1]
    states = {r: _s(r, {"g0": _g("dp", W, 41, _waiting(42, 1.2))}) for r in W}
    assert find_hangs(states, {0: 0, 1: 0}, ST) is None  # below hang_min_s
    states = {r: _s(r, {"g0": _g("dp", W, 41, _waiting(42, 2.5), d90=0.5)}) for r in W}
    assert find_hangs(states, {0: 0, 1: 0}, ST) is None  # 10 x the group's p90 = 5 s
    states = {r: _s(r, {"g0": _g("dp", W, 41, _waiting(42, 2.5))}, step_s=1.0) for r in W}
    assert find_hangs(states, {0: 0, 1: 0}, ST) is None  # 3 x the step time


def test_first_step_of_a_run_gets_the_startup_grace():
    W = [0, 1]
    states = {r: _s(r, {"g0": _g("dp", W, 41, _waiting(42, 5.0))}) for r in W}
    states[1].groups["g0"].pending = None  # rank 1 still initialising
    assert find_hangs(states, {0: 0, 1: 0}, ST)["ranks"] == [1]
    states[1].steps = []  # ...before finishing any step of this run: lazy init, not a hang yet
    assert find_hangs(states, {0: 0, 1: 0}, ST) is None


def test_non_comm_hang_follows_the_chain_to_the_rank_that_waits_for_nobody():
    # tp x dp on 4 ranks: rank 1 never reaches tp#7; 0 waits for it in tp; 3 waits in
    # dp for 1; 2 waits in tp for 3. The culprit is 1, not 3.
    tp01, tp23, dp13, dp02 = [0, 1], [2, 3], [1, 3], [0, 2]
    states = {
        0: _s(0, {"a": _g("tp", tp01, 6, _waiting(7, 2.0)), "c": _g("dp", dp02, 3)}),
        1: _s(1, {"a": _g("tp", tp01, 6), "d": _g("dp", dp13, 3)}),
        2: _s(2, {"b": _g("tp", tp23, 6, _waiting(7, 1.9)), "c": _g("dp", dp02, 3)}),
        3: _s(3, {"b": _g("tp", tp23, 6), "d": _g("dp", dp13, 3, _waiting(4, 1.8))}),
    }
    f = find_hangs(states, {r: 0.1 for r in states}, ST)
    assert f["kind"] == "non_comm_hang" and f["ranks"] == [1]
    assert f["evidence"]["culprit_state"]["1"]["doing"].startswith("outside")


def test_stopped_rank_is_named_by_its_stale_heartbeat():
    W = [0, 1, 2, 3]
    states = {r: _s(r, {"g0": _g("dp", W, 41, _waiting(42, 2.0))}) for r in W}
    f = find_hangs(states, {0: 0.1, 1: 0.1, 2: 2.5, 3: 0.1}, ST)  # all entered; 2 stopped inside
    assert f["kind"] == "non_comm_hang" and f["ranks"] == [2] and "2" in f["evidence"]["heartbeat_stale_s"]


def test_p2p_wait_names_the_sender_that_never_sent():
    states = {0: _s(0, {"p": _g("pp", [0, 1], 0, pp={1: PeerLink(4)})}),
              1: _s(1, {"p": _g("pp", [0, 1], 0, pp={0: PeerLink(4, _waiting(5, 2.2, "recv"))})})}
    f = find_hangs(states, {0: 0.1, 1: 0.1}, ST)
    assert f["kind"] == "non_comm_hang" and f["ranks"] == [0]



def test_p2p_hang_inside_a_recv_is_a_communication_hang():
    # pp=2: rank 1 hangs inside its forward recv from 0 (entered, never reached wait());
    # rank 0's send completed, so 0 waits for a backward recv that 1 never posts. 1 is
    # not outside communication: it is a hang, named by the rank stuck in the call.
    # (p2p ops are numbered per peer: 0's send #4 matched 1's recv #4)
    states = {0: _s(0, {"p": _g("pp", [0, 1], 0, pp={1: PeerLink(4, _waiting(5, 2.2, "recv"))})}),
              1: _s(1, {"p": _g("pp", [0, 1], 0, pp={0: PeerLink(3, _inside(4, 2.4, "recv"))})})}
    f = find_hangs(states, {0: 0.1, 1: 0.1}, ST)
    assert f["kind"] == "hang" and f["ranks"] == [1]
    assert f["evidence"]["stuck_inside_call"] == [1]
    assert "pp#4 recv" in f["evidence"]["culprit_state"]["1"]["inside"]
    states[1].groups["p"].peers[0].pending.seconds = 0.01  # only just entered: passing through, 1 is late
    assert find_hangs(states, {0: 0.1, 1: 0.1}, ST)["kind"] == "non_comm_hang"

def test_chain_is_followed_through_ranks_waiting_below_the_threshold():
    # pp=2 x dp_shard=2 (pp pairs {0,2}, {1,3}; dp pairs {0,1}, {2,3}): 2 hangs inside its
    # recv #47 from 0; 1 waits (past the threshold) on 3, which has waited a little less
    # long, in the dp all-gather that 2 never entered. The culprit is 2, not 3.
    states = {
        0: _s(0, {"p0": _g("pp", [0, 2], 0, pp={2: PeerLink(46, _waiting(47, 1.51, "send"))}),
                  "d0": _g("dp", [0, 1], 30)}),
        1: _s(1, {"p1": _g("pp", [1, 3], 0, pp={3: PeerLink(47, _waiting(48, 1.54, "send"))}),
                  "d0": _g("dp", [0, 1], 30)}),
        2: _s(2, {"p0": _g("pp", [0, 2], 0, pp={0: PeerLink(46, _inside(47, 1.56, "recv"))}),
                  "d1": _g("dp", [2, 3], 30)}),
        3: _s(3, {"p1": _g("pp", [1, 3], 0, pp={1: PeerLink(47)}),
                  "d1": _g("dp", [2, 3], 30, _waiting(31, 1.44, "allgather"))}),
    }
    f = find_hangs(states, {r: 0.1 for r in states}, ST)
    assert f["kind"] == "hang" and f["ranks"] == [2], f
    assert f["evidence"]["waiting"]["3"] == {"group": "dp", "op": "allgather", "seq": 31, "waited_s": 1.44,
                                             "not_entered": [2]}


def _stopped_in_allgather(since_stop):
    """Reported: rank 0 of 4 (dp_shard=4) is SIGSTOPped just after publishing that it waits in
    all-gather #41, which then completes on its peers; rank 1 waits in #42 for rank 0 (2 and
    3 began waiting a little later). The watcher ages rank 0's pending op by the time since
    its heartbeat moved (`since_stop`), as it does for every state."""
    W = [0, 1, 2, 3]
    states = {r: _s(r, {"d": _g("dp", W, 41, _waiting(42, since_stop + 0.33 - 0.08 * (r > 1), "allgather"))})
              for r in W}
    states[0].groups["d"] = _g("dp", W, 40, _waiting(41, 0.05 + since_stop, "allgather"))
    return states, {0: since_stop, 1: 0.1, 2: 0.1, 3: 0.1}


def test_a_rank_going_stale_is_not_read_as_waiting_in_a_cycle():
    # 1.53 s after rank 1 began waiting, rank 0's heartbeat is 1.2 s old: lagging, not yet
    # stale. Its own state is no evidence (it made a "cycle" with rank 1): wait, then name it.
    states, stale = _stopped_in_allgather(1.2)
    assert find_hangs(states, stale, ST) is None
    states, stale = _stopped_in_allgather(1.6)
    f = find_hangs(states, stale, ST)
    assert f["kind"] == "non_comm_hang" and f["ranks"] == [0] and "0" in f["evidence"]["heartbeat_stale_s"]
    assert "0" not in f["evidence"]["waiting"]  # its stale pending op is not shown as a wait


def test_a_rank_going_stale_in_a_pipeline_is_not_read_as_waiting():
    # pp=2 x dp_shard=2 (pp pairs {0,2}, {1,3}; dp pairs {0,1}, {2,3}): rank 0 stopped; its last
    # state waits in the dp all-gather #31 that rank 1 completed; 1 waits in #32 for 0, 2 in
    # its recv #47 for 0's send, 3 in dp #32 for 2.
    def frozen(since_stop):
        states = {
            0: _s(0, {"p0": _g("pp", [0, 2], 0, pp={2: PeerLink(46)}),
                      "d0": _g("dp", [0, 1], 30, _waiting(31, 0.05 + since_stop, "allgather"))}),
            1: _s(1, {"p1": _g("pp", [1, 3], 0, pp={3: PeerLink(47)}),
                      "d0": _g("dp", [0, 1], 31, _waiting(32, since_stop + 0.35, "allgather"))}),
            2: _s(2, {"p0": _g("pp", [0, 2], 0, pp={0: PeerLink(46, _waiting(47, since_stop + 0.2, "recv"))}),
                      "d1": _g("dp", [2, 3], 31)}),
            3: _s(3, {"p1": _g("pp", [1, 3], 0, pp={1: PeerLink(47)}),
                      "d1": _g("dp", [2, 3], 31, _waiting(32, since_stop + 0.1, "allgather"))}),
        }
        return states, {0: since_stop, 1: 0.1, 2: 0.1, 3: 0.1}

    assert find_hangs(*frozen(1.2), ST) is None
    f = find_hangs(*frozen(1.6), ST)
    assert f["kind"] == "non_comm_hang" and f["ranks"] == [0] and "0" in f["evidence"]["heartbeat_stale_s"]


def test_a_stale_rank_s_own_pending_op_blocks_no_one():
    # rank 2 stopped (heartbeat stale) while its last state waited in an all-reduce its peers
    # have not reached yet: its aged op is not a wait, so there is no hang until a peer waits
    W = [0, 1, 2, 3]
    states = {r: _s(r, {"g0": _g("dp", W, 41)}) for r in W}
    states[2].groups["g0"] = _g("dp", W, 41, _waiting(42, 2.6))
    stale = {0: 0.1, 1: 0.1, 2: 2.5, 3: 0.1}
    assert find_hangs(states, stale, ST) is None
    for r in (0, 1, 3):
        states[r].groups["g0"] = _g("dp", W, 41, _waiting(42, 1.6))
    f = find_hangs(states, stale, ST)
    assert f["kind"] == "non_comm_hang" and f["ranks"] == [2] and "2" in f["evidence"]["heartbeat_stale_s"]


def test_a_lagging_rank_defers_the_hang_rules_only_while_someone_is_blocked():
    # a hang among fresh ranks (2 stuck inside the call) waits while rank 0's heartbeat lags ...
    W = [0, 1, 2, 3]
    states = {r: _s(r, {"g0": _g("dp", W, 41, _waiting(42, 3.0))}) for r in W}
    states[2].groups["g0"].pending = _inside(42, 3.0)
    assert find_hangs(states, {0: 0.8, 1: 0.1, 2: 0.1, 3: 0.1}, ST) is None
    # ... and is found once it is heard from again (a heartbeat within the lag is fresh)
    assert find_hangs(states, {0: 0.4, 1: 0.1, 2: 0.1, 3: 0.1}, ST)["ranks"] == [2]


def _steps(waits_by_rank, step_s=0.1):
    """States for one 4-rank group from per-rank per-step waits (steps 1..n)."""
    W = sorted(waits_by_rank)
    out = {}
    for r in W:
        w = [(i + 1, x) for i, x in enumerate(waits_by_rank[r])]
        st = [(i + 1, step_s, 1000.0 + i * step_s, x) for i, x in enumerate(waits_by_rank[r])]
        out[r] = _s(r, {"g0": _g("dp", W, 100, w=w)}, steps=st, step_s=step_s)
    return out


def test_slow_rank_named_and_jitter_is_not():
    import random

    rnd = random.Random(0)
    n = 12
    slow = {r: [0.06 + rnd.uniform(0, 0.005) for _ in range(n)] for r in range(4)}
    slow[3] = [0.002] * n  # everyone waits ~60 ms per step for rank 3, which never waits
    f = find_slow(_steps(slow), ST)
    assert [(x["kind"], x["ranks"]) for x in f] == [("slow_rank", [3])]
    for seed in range(200):  # 20% jitter: whoever is last changes, and by little
        rnd = random.Random(seed)
        jit = [[rnd.uniform(0, 0.02) for _ in range(n)] for _ in range(4)]
        waits = {r: [max(jit[q][i] for q in range(4)) - jit[r][i] + 0.003 for i in range(n)] for r in range(4)}
        assert find_slow(_steps(waits), ST) == [], seed


def test_slow_rank_not_confused_with_ranks_it_made_late():
    # tp=2 x dp=2, rank 1 slow: 0 waits for it in tp, 3 waits for it in dp and is then late
    # to tp{2,3}, where 2 waits for 3. Only 1 waits little everywhere.
    n = 10
    w = lambda x: [(i + 1, x) for i in range(n)]  # noqa: E731
    groups = {0: {"a": _g("tp", [0, 1], 9, w=w(0.1)), "c": _g("dp", [0, 2], 9, w=w(0.002))},
              1: {"a": _g("tp", [0, 1], 9, w=w(0.002)), "d": _g("dp", [1, 3], 9, w=w(0.002))},
              2: {"b": _g("tp", [2, 3], 9, w=w(0.1)), "c": _g("dp", [0, 2], 9, w=w(0.002))},
              3: {"b": _g("tp", [2, 3], 9, w=w(0.002)), "d": _g("dp", [1, 3], 9, w=w(0.1))}}
    states = {r: _s(r, g, steps=[(i + 1, 0.2, 1000.0 + i * 0.2, sum(x.waits[0].wait_s for x in g.values()))
                                 for i in range(n)], step_s=0.2) for r, g in groups.items()}
    f = find_slow(states, ST)
    assert [(x["kind"], x["ranks"]) for x in f] == [("slow_rank", [1])]


def test_slow_link_against_sibling_groups():
    # tp=2 x dp=2: dp groups {0,2} and {1,3}; ops in {1,3} take 80 ms longer after both entered.
    n = 10
    w = lambda x: [(i + 1, x) for i in range(n)]  # noqa: E731
    st = [(i + 1, 0.2, 1000.0 + i * 0.2, 0.0) for i in range(n)]
    groups = {0: {"a": _g("tp", [0, 1], 9, w=w(0.06)), "c": _g("dp", [0, 2], 9, w=w(0.002))},
              1: {"a": _g("tp", [0, 1], 9, w=w(0.001)), "d": _g("dp", [1, 3], 9, w=w(0.082))},
              2: {"b": _g("tp", [2, 3], 9, w=w(0.06)), "c": _g("dp", [0, 2], 9, w=w(0.003))},
              3: {"b": _g("tp", [2, 3], 9, w=w(0.001)), "d": _g("dp", [1, 3], 9, w=w(0.08))}}
    states = {r: _s(r, g, steps=[(a, b, c, sum(x.waits[0].wait_s for x in g.values())) for a, b, c, _ in st],
                    step_s=0.2) for r, g in groups.items()}
    f = find_slow(states, ST)
    assert [(x["kind"], x["ranks"]) for x in f] == [("slow_link", [1, 3])]



def _pipeline(shortest_ms, wait_ms, n=10, ops=8):
    """pp=2 x dp=2 states: pp pairs {0,2} and {1,3}; per rank its per-step shortest p2p op
    and p2p wait (ms) with its stage peer, as the publisher's peer_steps."""
    peer = {0: 2, 2: 0, 1: 3, 3: 1}
    out = {}
    for r in range(4):
        pw = [(i + 1, shortest_ms[r] / 1e3, wait_ms[r] / 1e3, ops) for i in range(n)]
        st = [(i + 1, 0.2, 1000.0 + i * 0.2, 0.0) for i in range(n)]
        g = _g("pp", sorted((r, peer[r])), 0)
        g.peer_steps = {peer[r]: [PeerStep(*e) for e in pw]}
        out[r] = _s(r, {f"pp{min(r, peer[r])}": g}, steps=st, step_s=0.2)
    return out


def test_p2p_slow_link_between_pipeline_stages():
    # ops between 1 and 3 each pay 10 ms on both ends; {0,2} finds data waiting (~0 s)
    f = find_slow(_pipeline(shortest_ms={0: 0.02, 2: 0.02, 1: 10.1, 3: 10.1}, wait_ms={0: 40, 2: 15, 1: 120, 3: 90}),
                  ST)
    assert [(x["kind"], x["ranks"], x["group"]) for x in f] == [("slow_link", [1, 3], "pp")]
    assert f[0]["evidence"]["ops_per_step"] == 8
    # a slow stage-1 rank (3) makes 1 wait long, but some op still finds its data: no link
    assert find_slow(_pipeline(shortest_ms={r: 0.02 for r in range(4)}, wait_ms={0: 40, 2: 15, 1: 140, 3: 3}),
                     ST) == []
    # one slow op end only (the other end finds data waiting): not a link either
    assert find_slow(_pipeline(shortest_ms={0: 0.02, 2: 0.02, 1: 10.1, 3: 0.02}, wait_ms={r: 40 for r in range(4)}),
                     ST) == []

# ----------------------------------------------------------------------------- drills


def _findings(run_dir) -> list[tuple[str, list]]:
    """(kind, ranks) of every finding a drill run wrote (GPU health ones aside)."""
    path = run_dir / "c4" / "findings.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [(f["kind"], sorted(f["ranks"])) for f in map(json.loads, lines) if not f["kind"].startswith("gpu_")]


def _check_drills(root, expected: dict, proc) -> dict:
    """Every drill of the launch under `root` named exactly what `expected` says (spec ->
    (kind, ranks), or None for no finding), within 5 s for hangs, and its run completed."""
    drills = {d["spec"]: d for d in json.loads((root / "drill.json").read_text())}
    assert sorted(drills) == sorted(expected), (sorted(drills), proc.stdout[-3000:])
    for spec, want in expected.items():
        d = drills[spec]
        got = _findings(root / d["name"])
        assert got == ([] if want is None else [want]), f"{spec}: expected {want}, named {got}\n{proc.stdout[-2000:]}"
        r = d["result"]
        assert r["completed"], f"{spec}: the job did not finish the run after the fault"
        if want and want[0] in ("hang", "non_comm_hang"):
            assert r["time_to_detect_s"] is not None and r["time_to_detect_s"] <= 5.0, (spec, r)
        if want and want[0] == "slow_rank":
            assert r["steps_to_detect"] is not None and r["steps_to_detect"] <= 10, (spec, r)
    assert (root / "drill.md").exists()
    assert proc.returncode == 0, proc.stderr[-3000:]
    return drills


# what each --all drill on 4 ranks (dp_shard = 4; slow links: tp = 2 x dp_shard = 2, pairs (r, r + 2)) must name
ALL_4 = {"jitter:pct=20": None}
for _r in (0, 3):
    ALL_4.update({
        f"delay:rank={_r},ms=10,step=4": ("slow_rank", [_r]),
        f"slow_compute:rank={_r},factor=2,step=4": ("slow_rank", [_r]),
        f"hang:rank={_r},step=6": ("hang", [_r]),  # stuck inside a collective all entered
        f"hang:rank={_r},step=6,where=compute": ("non_comm_hang", [_r]),  # never enters it
        f"sigstop:rank={_r},step=6,at=random,seed={_r + 1}": ("non_comm_hang", [_r]),  # frozen mid-step
        f"crash:rank={_r},step=6": ("crash", [_r]),
    })
ALL_4.update({"slow_link:ranks=0-2,ms=20,step=4": ("slow_link", [0, 2]),
              "slow_link:ranks=1-3,ms=20,step=4": ("slow_link", [1, 3])})
# launched below: every kind on rank 0 (the store's host), the slow kinds and a hang outside
# collectives on rank 3; a comm hang on rank 2 and SIGSTOPs of ranks 0 and 3 run in the
# pipeline launch further down, so each launch costs no drill twice
LAUNCHED = {spec: want for spec, want in ALL_4.items()
            if "rank=3" not in spec or spec.startswith(("delay", "slow_compute", "hang:rank=3,step=6,where"))}


def test_all_is_every_kind_on_rank_0_and_the_last_rank():
    from dist_train.launchers.drill import all_drills

    drills = all_drills(4, jitter_steps=100)
    assert {d.spec: (d.expect_kind and (d.expect_kind, sorted(d.expect_ranks))) or None for d in drills} == ALL_4
    assert len(LAUNCHED) == 12


@pytest.mark.slow
def test_drills_name_every_fault_on_rank_0_and_rank_3(tmp_path):
    """One launch: every fault kind on rank 0 and the slow and non-collective ones on rank 3
    (hangs, SIGSTOP at a random moment of a step, and crashes restart the job from its
    checkpoint), and 100 steps with 20% jitter and no finding."""
    t0 = time.monotonic()
    proc = run_cli("drill", "configs/tiny.toml", "--nproc", "4", "--jitter-steps", "100",
                   *[a for f in LAUNCHED for a in ("--fault", f)], "--set", f"run.dir={tmp_path}", timeout=900,
                   check=False)
    print(f"\ndrill launch: {time.monotonic() - t0:.0f} s\n{proc.stdout[-4000:]}")
    root = next(tmp_path.glob("drill-*"))
    drills = _check_drills(root, LAUNCHED, proc)
    assert drills["jitter:pct=20"]["steps"] == 100
    # the run directory of a drill holds its findings and a per-rank timeline for the report
    hang_dir = root / drills["hang:rank=0,step=6"]["name"]
    run_cli("report", str(hang_dir))
    assert (hang_dir / "report" / "c4_timeline.png").stat().st_size > 1000


@pytest.mark.slow
def test_drills_in_a_pipeline_layout(tmp_path):
    """pp=2 x dp_shard=2 (pp pairs (0, 2) and (1, 3)): a rank hung inside a pipeline recv is
    a communication hang and the job resumes from its pipeline checkpoint; a slow link
    between stages is found through their sends and recvs; ranks 0 and 3 frozen by SIGSTOP
    at a random moment of a step are named by their stale heartbeats. (Slow ranks in this
    layout: by hand, see docs/benchmarks.md; that p2p waits count is tested above.)"""
    expected = {"hang:rank=2,step=6": ("hang", [2]), "slow_link:ranks=1-3,ms=20,step=4": ("slow_link", [1, 3]),
                "sigstop:rank=0,step=6,at=random,seed=1": ("non_comm_hang", [0]),
                "sigstop:rank=3,step=6,at=random,seed=4": ("non_comm_hang", [3])}
    proc = run_cli("drill", "configs/tiny.toml", "--nproc", "4", *[a for f in expected for a in ("--fault", f)],
                   "--set", "parallel.pp=2", "--set", "parallel.dp_shard=2", "--set", f"run.dir={tmp_path}",
                   timeout=600, check=False)
    root = next(tmp_path.glob("drill-*"))
    drills = _check_drills(root, expected, proc)
    hang = json.loads((root / drills["hang:rank=2,step=6"]["name"] / "c4/findings.jsonl").read_text().splitlines()[0])
    assert hang["evidence"]["stuck_inside_call"] == [2]
