"""Learning-rate schedules: the factor of the peak lr after `step` optimizer steps.

Every schedule warms up linearly over `warmup` steps ((step + 1) / warmup), then:
- cosine:   min + (1 - min) * (1 + cos(pi * p)) / 2, p the progress through the remaining steps;
- linear:   1 - (1 - min) * p;
- constant: 1;
- wsd (warmup-stable-decay; MiniCPM, Hu et al. 2024): 1 until the last `decay_ratio` of
  `steps`, then linear down to `min` over those decay_steps = round(decay_ratio * steps).
  The lr depends on the step and the run's length only, so a run resumed with a longer
  `train.steps` from a checkpoint taken before its decay continues the stable phase, the
  way WSD runs are extended.
`min` is `min_lr_ratio`, the final factor.
"""
from __future__ import annotations

import math

SCHEDULES = ("cosine", "wsd", "linear", "constant")


def lr_factor(schedule: str, step: int, steps: int, warmup: int, min_lr_ratio: float, decay_ratio: float) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "wsd":
        decay_steps = round(decay_ratio * steps)
        start = steps - decay_steps
        if step < start or decay_steps == 0:
            return 1.0
        return 1.0 - (1.0 - min_lr_ratio) * min(1.0, (step - start) / decay_steps)
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    if schedule == "linear":
        return 1.0 - (1.0 - min_lr_ratio) * progress
    if schedule == "cosine":
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}; one of {SCHEDULES}")
