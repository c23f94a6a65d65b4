"""`digits`: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes), no download.

Reference: the UCI optical recognition of handwritten digits data, as shipped by scikit-learn.
"""

from __future__ import annotations

import torch

from .base import DataInfo, ImageSet, Item

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


class Digits(ImageSet):
    """All 1,797 digits as items {"image": (1, 8, 8) in [-1, 1] (ink is bright), "label": 0-9, "text": a
    caption ("the digit seven") for text-conditioned generation}."""

    def __init__(self) -> None:
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.images, dtype=torch.float32) / 16.0 * 2 - 1   # (N, 8, 8) in [-1, 1]
        self.x = x[:, None]                                                # (N, 1, 8, 8)
        self.y = torch.tensor(d.target, dtype=torch.long)
        self.info = DataInfo(channels=1, image_size=(8, 8), classes=[str(i) for i in range(10)],
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
