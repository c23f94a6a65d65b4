"""The pictures each task leaves next to its numbers: confusion matrices, next-patch predictions."""

from __future__ import annotations

from pathlib import Path

import torch

from .data.base import ImageSet
from .report import save_confusion, save_rows
from .tasks import Classify, Pretrain, Task


def predictions_png(task: Pretrain, images: torch.Tensor, path: Path) -> Path:
    """Originals above the model's causal next-patch (or next-pixel) predictions."""
    pred = task.reconstruct(images)
    scale = max(1, 96 // images.shape[-1])
    return save_rows(path, [("original", images.cpu()), ("predicted", pred.cpu())], scale=scale)


def task_pictures(task: Task, out: Path, metrics: dict, val_set: ImageSet, device) -> list[Path]:
    """Write the task's PNGs into `out` and return their paths."""
    written = []
    if isinstance(task, Classify) and "confusion" in metrics:
        written.append(save_confusion(out / "confusion.png", metrics["confusion"], task.info.classes,
                                      title=f"validation top-1 {metrics['top1']:.3f}"))
    if isinstance(task, Pretrain) and len(val_set):
        images = torch.stack([val_set[i][0] for i in range(min(8, len(val_set)))
                              if val_set[i] is not None]).to(device)
        task.eval()
        written.append(predictions_png(task, images, out / "predictions.png"))
    return written
