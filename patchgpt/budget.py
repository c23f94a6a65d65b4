"""A wall-clock budget for a run (``--time 10m``, Ultralytics' ``time=`` in spirit).

The run's step count is set from the throughput measured over its first steps, so the learning-rate
schedule (warm-up, then cosine to the end) still finishes: the run ends on time with its evaluation and
checkpoint. The decision is made once, before warm-up ends, and saved in the run's config (``train.steps``;
``train.time`` is then cleared), so a resume continues the decided run exactly.
"""

from __future__ import annotations

import math
import re
import sys
import time

from .config import ConfigError, TrainConfig

PROBE_STEPS = 20        # steps timed before deciding
MARGIN = 0.95           # of the remaining time spent training (the rest: checkpoints, periodic evaluations)


def parse_duration(text: str) -> float:
    """``"90"``, ``"90s"``, ``"10m"``, ``"1.5h"`` -> seconds; a one-line `ConfigError` otherwise."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text).lower())
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"--time {text}: expected a positive duration such as 300, 90s, 10m or 1.5h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


class TimeBudget:
    """Decides ``train.steps`` once from the measured throughput; a no-op when ``train.time`` is 0."""

    def __init__(self, t: TrainConfig, start: int) -> None:
        self.t, self.start = t, start
        self.active = t.time > 0
        self.began = time.monotonic()          # the budget counts from here (set-up included)
        self.probe_at = start + max(1, min(PROBE_STEPS, t.warmup - start)) if t.warmup > start else start + 3
        self.loop_began: float | None = None
        if self.active:
            t.steps = max(t.steps, self.probe_at + 1)   # provisional: the loop must reach the probe

    def step_started(self) -> None:
        if self.active and self.loop_began is None:
            self.loop_began = time.monotonic()

    def decide(self, step: int) -> int | None:
        """At the probe step: the step count that ends the run on time (None before, or when inactive)."""
        if not self.active or step != self.probe_at or self.loop_began is None:
            return None
        now = time.monotonic()
        rate = (step - self.start) / max(now - self.loop_began, 1e-6)           # steps per second
        remaining = self.t.time - (now - self.began)
        steps = step + max(0, math.floor(rate * remaining * MARGIN))
        self.active = False
        return steps

    def apply(self, steps: int, announce: bool = True) -> None:
        """Fix the decided step count in the config (saved with every later checkpoint)."""
        if announce:
            print(f"patchgpt: --time {self.t.time:.0f}s: {self.probe_at - self.start} steps timed -> "
                  f"{steps} steps in all", file=sys.stderr)
        self.t.steps, self.t.time = steps, 0.0
