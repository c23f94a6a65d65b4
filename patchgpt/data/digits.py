"""`digits`: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes), no download.

Reference: the UCI optical recognition of handwritten digits data, as shipped by scikit-learn.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import DataInfo, ImageSet, Item

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


class Digits(ImageSet):
    """All 1,797 digits as items {"image": (1, S, S) in [-1, 1] (ink is bright), "label": 0-9, "text": a
    caption ("the digit seven") for text-conditioned generation}.

    `size`: 8 (native) or larger, upsampled bilinearly (so a model of larger images, e.g. a multi-task model
    of 64 px scenes, can classify them too)."""

    def __init__(self, size: int = 8) -> None:
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.images, dtype=torch.float32) / 16.0 * 2 - 1   # (N, 8, 8) in [-1, 1]
        x = x[:, None]                                                     # (N, 1, 8, 8)
        if size != 8:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)   # (N, 1, S, S)
        self.x = x
        self.y = torch.tensor(d.target, dtype=torch.long)
        self.info = DataInfo(channels=1, image_size=(size, size), classes=[str(i) for i in range(10)],
                             captions=True)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> Item:
        y = int(self.y[i])
        return {"image": self.x[i], "label": y, "text": f"the digit {DIGIT_NAMES[y]}"}

    def images(self, n: int | None = None) -> torch.Tensor:
        return self.x[:n]

    def labels(self) -> torch.Tensor:
        return self.y
