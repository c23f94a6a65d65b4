"""Helpers shared by the benchmark scripts (run them as ``python benchmarks/bench_*.py``)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of `fn` takes."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def write_json(path: str | None, results: dict) -> None:
    """Write the results dict to `path` (nothing when `path` is None)."""
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=2)
