"""`evaluate(task, batches)`: one pass over validation batches into the task's metric."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .data.base import batch_len, to_device
from .tasks import Task, metric_files


@torch.no_grad()
def evaluate(task: Task, batches: Iterable[dict], device: torch.device | str = "cpu"
             ) -> tuple[dict, dict[str, Any]]:
    """Run ``task.metric()`` over `batches` in eval mode; returns (the metric's results, its files, e.g.
    ``{"detections.json": [...]}``)."""
    was_training = task.training
    task.eval()
    m = task.metric()
    for batch in batches:
        if batch_len(batch) == 0:
            continue
        m.update(to_device(batch, device))
    task.train(was_training)
    return m.compute(), metric_files(m)
