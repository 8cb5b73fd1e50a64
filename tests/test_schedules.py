"""Learning-rate schedules: the documented formulas at chosen steps, their config checks,
and a WSD run extended by resuming with more steps (the stable phase continues)."""
from __future__ import annotations

import math

import pytest

from dist_train.config import ConfigError, load_config
from dist_train.schedules import lr_factor
from tests.conftest import read_metrics, sweep

# steps 100, warmup 10, min_lr_ratio 0.1, decay_ratio 0.2 (wsd decays over steps 80..100)
CASES = [
    ("cosine", 4, 0.5), ("cosine", 55, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))), ("cosine", 100, 0.1),
    ("linear", 9, 1.0), ("linear", 55, 0.55), ("linear", 100, 0.1),
    ("constant", 0, 0.1), ("constant", 60, 1.0),
    ("wsd", 4, 0.5), ("wsd", 10, 1.0), ("wsd", 79, 1.0), ("wsd", 80, 1.0), ("wsd", 90, 0.55), ("wsd", 95, 0.325),
    ("wsd", 100, 0.1),
]


@pytest.mark.parametrize("schedule,step,expected", CASES)
def test_schedule_formula_at_documented_steps(schedule, step, expected):
    assert lr_factor(schedule, step, 100, 10, 0.1, 0.2) == pytest.approx(expected, rel=1e-12)


def test_wsd_that_leaves_no_stable_phase_is_one_line():
    with pytest.raises(ConfigError, match=r"train.warmup = 10 plus the wsd decay .* = 5\) exceed train.steps = 12"):
        load_config(None, ["train.schedule=wsd", "train.steps=12", "train.warmup=10", "train.decay_ratio=0.4"])
    with pytest.raises(ConfigError, match="train.schedule = .step.: must be one of"):
        load_config(None, ["train.schedule=step"])


def test_wsd_run_extended_by_resuming_continues_its_stable_phase(tmp_path):
    """8 steps of WSD without decay, then the same run resumed with train.steps = 20 and a
    decay over the last 20%: steps 9..16 stay at the peak lr, 17..20 decay to min_lr_ratio;
    every recorded lr is the formula's, and each step is recorded once."""
    runs = {"wsd": {"train.steps": 8, "train.decay_ratio": 0.0},
            "wsd ": {"train.steps": 20, "train.decay_ratio": 0.2}}
    sweep(tmp_path, 1, runs, {"train.schedule": "wsd", "train.warmup": 2, "checkpoint.every": 4, "train.lr": 0.01,
                              "train.min_lr_ratio": 0.1})
    records = read_metrics(tmp_path / "wsd")
    assert [r["step"] for r in records] == list(range(1, 21))
    for r in records:  # the lr a record holds is the next step's: after `step` optimizer steps
        steps, decay = (8, 0.0) if r["step"] < 8 else (20, 0.2)
        assert r["lr"] == pytest.approx(0.01 * lr_factor("wsd", r["step"], steps, 2, 0.1, decay), rel=1e-12), r["step"]
    assert [r["lr"] for r in records[8:15]] == [pytest.approx(0.01)] * 7
    assert records[-1]["lr"] == pytest.approx(0.001)
    assert all(r["mfu"] is None for r in records), "a CPU has no peak FLOPs: MFU n/a, not a made-up figure"
