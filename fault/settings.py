"""C4 thresholds: the one place they, their defaults, help and ranges are defined.

Shared by the ranks (publisher), the watcher and its rules; each rank publishes the
settings it runs with, so a watcher in the launcher judges a run by that run's own
`[c4]` section. `dist_train/config.py` derives its `[c4]` section from these fields
(adding `enabled`), since `fault/` imports nothing of the project; the metadata has the
config's form: {"help", "min", "max", "choices"}.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


def _f(default, help: str, *, min=None, max=None, choices=None):
    return field(default=default, metadata={"help": help, "min": min, "max": max, "choices": choices})


@dataclass
class C4Settings:
    """Detector thresholds (the `[c4]` config section passes these through)."""
    detector: str = _f("auto", "where the detector runs: auto = in the launcher under `dist-train local`, else "
                       "in every rank's side thread (lowest fresh rank writes)", choices=("auto", "launcher", "ranks"))
    interval_s: float = _f(0.2, "seconds between a rank's state publications", min=0.02, max=5.0)
    stale_s: float = _f(1.5, "a rank whose state has not changed for this long is not responding", min=0.1)
    hang_min_s: float = _f(1.5, "a wait shorter than this is never a hang (floor of the relative threshold)",
                           min=0.1)
    hang_factor: float = _f(10.0, "a wait longer than this x the group's recent p90 op duration is a hang",
                            min=1.0)
    hang_steps: float = _f(3.0, "...and longer than this x the median step time", min=0.0)
    startup_s: float = _f(30.0, "before every rank finished a run's first step, a wait is a hang only after this "
                          "long (lazy initialisation)", min=0.0)
    slow_window: int = _f(5, "steps compared for slow ranks and links", min=2)
    slow_consistency: float = _f(0.8, "share of the window's steps a slow rank must arrive last in",
                                 min=0.5, max=1.0)
    slow_ratio: float = _f(0.3, "peers must wait for a slow rank (or a link be slower) by this share of the "
                           "step time", min=0.01)
    link_factor: float = _f(2.0, "a link is slow when its ops take this x longer than its sibling groups'",
                            min=1.0)
    link_ratio: float = _f(0.1, "...and that costs at least this share of the step time", min=0.0)
    warmup_steps: int = _f(2, "steps after (re)start left out of slow-rank comparisons", min=0)
    act: bool = _f(True, "on a hang stop the job (exit code 75) so the launcher restarts it from a checkpoint")

    @classmethod
    def from_dict(cls, d: dict | None) -> "C4Settings":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (d or {}).items() if k in names})

    def as_dict(self) -> dict:
        return asdict(self)
