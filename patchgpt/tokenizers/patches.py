"""Patches: the seed article's method — non-overlapping P x P patches, flattened, in raster order.

Reference: ViT (Dosovitskiy et al. 2021); `patchify`/`unpatchify` follow MAE (facebookresearch/mae).
Patch vectors are laid out (row-in-patch, col-in-patch, channel), so a patch is P*P*C values.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..sequence import IGNORE, Sequence, Vocab


def grid_positions(frames: int, rows: int, cols: int, device: torch.device | str = "cpu") -> Tensor:
    """(frames*rows*cols, 3) positions (frame, row, col) + 1 in raster order (frame-major)."""
    f, r, c = torch.meshgrid(torch.arange(frames), torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.stack([f, r, c], dim=-1).reshape(-1, 3).to(device) + 1  # (F, R, W, 3) -> (N, 3)


TOKEN_TARGET = 64   # tokens per image for dense tasks (generation, boxes, words) on a laptop CPU
RECOGNITION_TARGET = {"cpu": 36, "gpu": 256}   # for classification (and its pretraining), by machine


def auto_patch_size(H: int, W: int, target: int = TOKEN_TARGET) -> tuple[int, str]:
    """The patch size for H x W images when the user has not chosen one, and why.

    The smallest P >= 2 dividing both sides whose (H/P) x (W/P) grid has at most `target` tokens (and at least
    a sixteenth of it): as fine as the budget allows (target 64: 8x8 -> 2, 16 tokens; 28x28 -> 4, 49; 32x32 ->
    4, 64; 64x64 -> 8; 224x224 -> 28; target 36, classification on a CPU: 28x28 -> 7, 16 tokens; 32x32 -> 8).
    Sizes with no such divisor take the divisor whose token count is nearest the target;
    `--set tokenizer.patch_size` always wins."""
    fits = [p for p in range(1, min(H, W) + 1) if H % p == 0 and W % p == 0]
    good = [p for p in fits if p >= 2 and target // 16 <= (H // p) * (W // p) <= target]
    if good:
        p = good[0]
    else:
        p = min(fits, key=lambda q: abs(math.log((H // q) * (W // q) / target)))
    n = (H // p) * (W // p)
    return p, f"{p}x{p} patches chosen for {H}x{W} images: {n} tokens (set tokenizer.patch_size to choose)"


def check_patch_size(patch_size: int, H: int, W: int, what: str = "image") -> None:
    """A one-line ValueError unless `patch_size` is positive and divides both sides of an H x W `what`."""
    if patch_size < 1:
        raise ValueError(f"tokenizer.patch_size={patch_size}: must be >= 1")
    if H % patch_size or W % patch_size:
        fits = [p for p in range(1, min(H, W) + 1) if H % p == 0 and W % p == 0]
        raise ValueError(f"tokenizer.patch_size={patch_size} does not divide the {H}x{W} {what}s; "
                         f"choose one of {', '.join(map(str, fits))} or another data.image_size")


class Patches:
    """Cut (B, C, H, W) images into flattened P x P patches and back, exactly.

    Args:
        patch_size: P; H and W must be multiples of it.
        channels: C (1 grayscale, 3 RGB, or any other count).
        image_size: (H, W); need not be square.
        vocab: the shared vocab; one id ("patch") marks patch positions.
    """

    def __init__(self, patch_size: int, channels: int, image_size: tuple[int, int],
                 vocab: Vocab | None = None) -> None:
        H, W = image_size
        check_patch_size(patch_size, H, W, "image")
        self.patch_size, self.channels, self.image_size = patch_size, channels, (H, W)
        self.grid = (H // patch_size, W // patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.patch_dim = patch_size * patch_size * channels
        self.patch_id = (vocab or Vocab()).add("patch", 1).start
        self.fitted = True  # nothing to learn

    def patchify(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, N, P*P*C), N = (H/P)*(W/P), raster order."""
        B, C, H, W = images.shape
        P = self.patch_size
        h, w = H // P, W // P
        x = images.reshape(B, C, h, P, w, P)          # (B, C, h, P, w, P)
        x = x.permute(0, 2, 4, 3, 5, 1)                # (B, h, w, P, P, C)
        return x.reshape(B, h * w, P * P * C)         # (B, N, D)

    def unpatchify(self, patches: Tensor) -> Tensor:
        """(B, N, P*P*C) -> (B, C, H, W); the exact inverse of `patchify`."""
        B = patches.shape[0]
        P, C = self.patch_size, self.channels
        h, w = self.grid
        x = patches.reshape(B, h, w, P, P, C)          # (B, h, w, P, P, C)
        x = x.permute(0, 5, 1, 3, 2, 4)                # (B, C, h, P, w, P)
        return x.reshape(B, C, h * P, w * P)          # (B, C, H, W)

    def fit(self, images: Tensor, seed: int = 0) -> None:
        """Nothing to learn: the tokens are the pixels."""

    def encode(self, images: Tensor) -> Sequence:
        """Images (B, C, H, W) in [-1, 1] -> a patch `Sequence` of N tokens (no labels)."""
        patches = self.patchify(images)
        B, N, _ = patches.shape
        ids = torch.full((B, N), self.patch_id, dtype=torch.long, device=images.device)
        pos = grid_positions(1, *self.grid, device=images.device).expand(B, N, 3)
        return Sequence(ids=ids, labels=torch.full_like(ids, IGNORE), pos=pos, patches=patches,
                        is_patch=torch.ones_like(ids, dtype=torch.bool))

    def decode(self, seq_or_patches: Sequence | Tensor) -> Tensor:
        """A patch `Sequence` (or its (B, N, D) patches) -> images (B, C, H, W)."""
        p = seq_or_patches.patches if isinstance(seq_or_patches, Sequence) else seq_or_patches
        return self.unpatchify(p)


def normalize_patches(patches: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-patch zero-mean unit-variance targets (MAE/AIM 'norm_pix'): (B, N, D) -> (B, N, D)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True, unbiased=False)
    return (patches - mean) / (var + eps).sqrt()
