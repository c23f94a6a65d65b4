"""ClassLabel: one token per class plus a null class (dropped condition, for classifier-free guidance)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..sequence import Sequence, Vocab, tokens


class ClassLabel:
    """Class index k -> token ``start + k``; the null class is the range's last id."""

    def __init__(self, vocab: Vocab, num_classes: int) -> None:
        self.ids = vocab.add("class", num_classes + 1)
        self.num_classes = num_classes
        self.null = self.ids.stop - 1

    def encode(self, labels: Tensor) -> Sequence:
        """(B,) class indices (negative = null) -> a (B, 1) `Sequence`."""
        ids = torch.where(labels >= 0, labels + self.ids.start, torch.full_like(labels, self.null))
        return tokens(ids[:, None])

    def decode(self, ids: Tensor) -> Tensor:
        """(B,) or (B, 1) ids -> class indices (-1 for the null class)."""
        k = ids.reshape(-1) - self.ids.start
        return torch.where(ids.reshape(-1) == self.null, torch.full_like(k, -1), k)
