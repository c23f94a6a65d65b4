"""`moving-digits`: real handwritten digits moving and bouncing on a canvas, labelled by motion direction.

Each clip puts one of scikit-learn's bundled 8x8 digits (random digit, random start position) on a dark
canvas and moves it by a constant velocity, bouncing off the walls. The label is the direction of the first
move, one of 8 compass directions; digit identity, speed (1 or 2 px/frame) and position are random, so any
single frame says nothing about the label and a model must compare frames. Clips are a pure function of
(seed, index), made on access; nothing is downloaded. In the spirit of Moving MNIST (Srivastava et al. 2015).
"""

from __future__ import annotations

import numpy as np
import torch

from .base import DataError, DataInfo, ImageSet, Item

DIRECTIONS = ["up", "up-right", "right", "down-right", "down", "down-left", "left", "up-left"]
STEPS = [(-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1)]   # (dy, dx) per direction


class MovingDigits(ImageSet):
    """`n` items {"video": (F, 1, S, S) in [-1, 1] (ink bright), "label": direction 0-7 (see `DIRECTIONS`)}.

    Args:
        n: number of clips.
        frames: F, frames per clip (1 gives the single-frame control: the same labels, no motion visible).
        size: S, canvas side (at least 12, so that an 8x8 digit has room to move).
        seed: clips are a pure function of (seed, index).
    """

    def __init__(self, n: int = 6000, frames: int = 4, size: int = 16, seed: int = 0) -> None:
        from sklearn.datasets import load_digits

        if size < 12:
            raise DataError(f"moving-digits: data.image_size={size} is too small; use 12 or more")
        if frames < 1:
            raise DataError(f"moving-digits: data.frames={frames} must be positive")
        self.digits = load_digits().images.astype(np.float32) / 16.0 * 2 - 1   # (1797, 8, 8) in [-1, 1]
        self.n, self.frames, self.size, self.seed = n, frames, size, seed
        self.info = DataInfo(channels=1, image_size=(size, size), classes=list(DIRECTIONS), frames=frames)

    def __len__(self) -> int:
        return self.n

    def clip(self, i: int) -> tuple[np.ndarray, int]:
        """Clip `i` as (F, S, S) float32 in [-1, 1] and its direction label."""
        rng = np.random.default_rng([self.seed, i])
        digit = self.digits[rng.integers(len(self.digits))]
        label = int(rng.integers(len(DIRECTIONS)))
        speed = int(rng.integers(1, 3))
        vy, vx = STEPS[label][0] * speed, STEPS[label][1] * speed
        room = self.size - 8
        # The first move never hits a wall, so it always shows the labelled direction.
        y, x = (int(rng.integers(speed, room - speed + 1)) for _ in range(2))
        out = np.full((self.frames, self.size, self.size), -1.0, dtype=np.float32)
        for f in range(self.frames):
            out[f, y:y + 8, x:x + 8] = np.maximum(out[f, y:y + 8, x:x + 8], digit)
            y, vy = _bounce(y + vy, vy, room)
            x, vx = _bounce(x + vx, vx, room)
        return out, label

    def __getitem__(self, i: int) -> Item:
        frames, label = self.clip(i)
        return {"video": torch.from_numpy(frames)[:, None], "label": label}   # (F, S, S) -> (F, 1, S, S)

    def labels(self) -> torch.Tensor:
        return torch.tensor([self.clip(i)[1] for i in range(self.n)])


def _bounce(p: int, v: int, room: int) -> tuple[int, int]:
    """Reflect position `p` (velocity `v`) off the walls at 0 and `room`."""
    if p < 0:
        return -p, -v
    if p > room:
        return 2 * room - p, -v
    return p, v
