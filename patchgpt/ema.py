"""An exponential moving average of the trained weights (``train.ema``), the weights a run evaluates and saves.

Polyak averaging as in timm's ``ModelEmaV3`` and the MAE/BEiT fine-tuning recipes: after every optimizer step,
``shadow <- d * shadow + (1 - d) * weights`` over the trainable parameters, with the decay warmed up as
``d = min(decay, (1 + step) / (10 + step))`` so early averages do not remember the random init. Buffers
(BatchNorm statistics) and frozen weights are not averaged: the live ones are used.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


class EMA:
    """The moving average of `module`'s trainable parameters; `swapped()` evaluates or saves with it."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = decay
        named = [(n, p.detach()) for n, p in module.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.live = [p for _, p in named]             # the module's own tensors (updated in place by training)
        self.shadow = [p.clone() for p in self.live]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold the weights after optimizer step `step` (0-based) into the average."""
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, self.live, 1.0 - d)

    def state_dict(self) -> dict[str, Tensor]:
        """The averaged tensors by parameter name (for a checkpoint)."""
        return dict(zip(self.names, self.shadow, strict=True))

    @torch.no_grad()
    def load_state_dict(self, tensors: dict[str, Tensor]) -> None:
        for name, s in zip(self.names, self.shadow, strict=True):
            s.copy_(tensors[name])

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """Within the block the module holds the averaged weights; its trained weights come back after."""
        live = self.live
        with torch.no_grad():
            for p, s in zip(live, self.shadow, strict=True):
                tmp = p.clone()
                p.copy_(s)
                s.copy_(tmp)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(live, self.shadow, strict=True):
                    tmp = p.clone()
                    p.copy_(s)
                    s.copy_(tmp)
