"""C4 thresholds: one dataclass shared by the ranks (publisher), the watcher and its rules.

Each rank publishes the settings it runs with, so a watcher in the launcher judges a run
by that run's own `[c4]` section.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class C4Settings:
    """Detector thresholds (the `[c4]` config section passes these through)."""
    interval_s: float = 0.2
    stale_s: float = 1.5
    hang_min_s: float = 1.5
    hang_factor: float = 10.0
    hang_steps: float = 3.0
    startup_s: float = 30.0
    slow_window: int = 5
    slow_consistency: float = 0.8
    slow_ratio: float = 0.3
    link_factor: float = 2.0
    link_ratio: float = 0.1
    warmup_steps: int = 2
    act: bool = True
    detector: str = "auto"

    @classmethod
    def from_dict(cls, d: dict | None) -> "C4Settings":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (d or {}).items() if k in names})

    def as_dict(self) -> dict:
        return asdict(self)
