"""Experiment tracking beside ``log.jsonl``: ``train.log_to=tensorboard`` writes the logged scalars (loss, lr,
throughput, validation metrics) and the run's pictures as TensorBoard events in ``OUT/tensorboard``, through
PyTorch's own `SummaryWriter` (the ``[tensorboard]`` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .config import ConfigError

CHOICES = ("jsonl", "tensorboard")


class TensorBoard:
    """Scalars per logged row, pictures at the end; on a resume, events past the resumed step are dropped."""

    def __init__(self, out: Path, start: int = 0) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("train.log_to=tensorboard needs tensorboard: pip install 'patchgpt[tensorboard]'"
                              ) from None
        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=start or None)

    def scalars(self, row: dict[str, Any]) -> None:
        """One ``log.jsonl`` row: every number but ``step``, at ``row["step"]``."""
        step = int(row.get("step", 0))
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def pictures(self, paths: dict[str, str], step: int) -> None:
        """PNG files (tag -> path) as images at `step`."""
        from PIL import Image

        for tag, path in paths.items():
            if str(path).endswith(".png") and Path(path).is_file():
                with Image.open(path) as im:
                    hwc = np.asarray(im.convert("RGB"))                      # (H, W, 3) uint8
                self.writer.add_image(tag, hwc, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_tracker(kind: str, out: Path, start: int = 0) -> TensorBoard | None:
    """The tracker ``train.log_to`` asks for (None for ``jsonl``, which `train` always writes)."""
    return TensorBoard(out, start) if kind == "tensorboard" else None
