"""Tubelets: non-overlapping T x P x P space-time patches of a clip, flattened, frame-major raster order.

Reference: ViViT's tubelet embedding (Arnab et al. 2021) and VideoMAE (Tong et al. 2022); the layout follows
`Patches` (MAE's patchify) with time in front: a tubelet vector is (frame-in-tubelet, row-in-patch,
col-in-patch, channel), T*P*P*C values. Positions are (frame slice, row, col) + 1 over the factorised tables.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..sequence import IGNORE, Sequence, Vocab
from .patches import check_patch_size, grid_positions


class Tubelets:
    """Cut (B, F, C, H, W) clips into flattened T x P x P tubelets and back, exactly.

    Args:
        tubelet: T, frames per tubelet; F must be a multiple of it.
        patch_size: P; H and W must be multiples of it.
        channels: C.
        frames: F, frames per clip.
        image_size: (H, W) of each frame.
        vocab: the shared vocab; one id ("patch") marks tubelet positions (the same id as image patches).
    """

    def __init__(self, tubelet: int, patch_size: int, channels: int, frames: int, image_size: tuple[int, int],
                 vocab: Vocab | None = None) -> None:
        H, W = image_size
        if tubelet < 1 or frames % tubelet:
            raise ValueError(f"{frames} frames are not a multiple of tokenizer.tubelet={tubelet}")
        check_patch_size(patch_size, H, W, "frame")
        self.tubelet, self.patch_size, self.channels = tubelet, patch_size, channels
        self.frames, self.image_size = frames, (H, W)
        self.grid = (H // patch_size, W // patch_size)
        self.slices = frames // tubelet                      # tubelets along time
        self.per_slice = self.grid[0] * self.grid[1]         # tubelets per time slice
        self.num_patches = self.slices * self.per_slice
        self.patch_dim = tubelet * patch_size * patch_size * channels
        self.patch_id = (vocab or Vocab()).add("patch", 1).start
        self.fitted = True  # nothing to learn

    def patchify(self, video: Tensor) -> Tensor:
        """(B, F, C, H, W) -> (B, N, T*P*P*C), N = (F/T)*(H/P)*(W/P), frame-major raster order."""
        B, F, C, H, W = video.shape
        T, P = self.tubelet, self.patch_size
        f, h, w = F // T, H // P, W // P
        x = video.reshape(B, f, T, C, h, P, w, P)             # (B, f, T, C, h, P, w, P)
        x = x.permute(0, 1, 4, 6, 2, 5, 7, 3)                 # (B, f, h, w, T, P, P, C)
        return x.reshape(B, f * h * w, T * P * P * C)         # (B, N, D)

    def unpatchify(self, tubelets: Tensor) -> Tensor:
        """(B, N, T*P*P*C) -> (B, F, C, H, W); the exact inverse of `patchify`. N may be a multiple of
        one time slice (fewer frames than the clip: the first N tubelets' frames)."""
        B, N, _ = tubelets.shape
        T, P, C = self.tubelet, self.patch_size, self.channels
        h, w = self.grid
        f = N // (h * w)
        x = tubelets.reshape(B, f, h, w, T, P, P, C)           # (B, f, h, w, T, P, P, C)
        x = x.permute(0, 1, 4, 7, 2, 5, 3, 6)                 # (B, f, T, C, h, P, w, P)
        return x.reshape(B, f * T, C, h * P, w * P)           # (B, F, C, H, W)

    def positions(self, device: torch.device | str = "cpu") -> Tensor:
        """(N, 3) (frame slice, row, col) + 1 for every tubelet, in sequence order."""
        return grid_positions(self.slices, *self.grid, device=device)

    def fit(self, images: Tensor, seed: int = 0) -> None:
        """Nothing to learn: the tokens are the pixels."""

    def encode(self, video: Tensor) -> Sequence:
        """Clips (B, F, C, H, W) in [-1, 1] -> a tubelet `Sequence` of N tokens (no labels)."""
        tubelets = self.patchify(video)
        B, N, _ = tubelets.shape
        ids = torch.full((B, N), self.patch_id, dtype=torch.long, device=video.device)
        pos = self.positions(video.device).expand(B, N, 3)
        return Sequence(ids=ids, labels=torch.full_like(ids, IGNORE), pos=pos, patches=tubelets,
                        is_patch=torch.ones_like(ids, dtype=torch.bool))

    def decode(self, seq_or_tubelets: Sequence | Tensor) -> Tensor:
        """A tubelet `Sequence` (or its (B, N, D) tubelets) -> clips (B, F, C, H, W)."""
        p = seq_or_tubelets.patches if isinstance(seq_or_tubelets, Sequence) else seq_or_tubelets
        return self.unpatchify(p)
