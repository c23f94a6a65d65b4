"""Corruptions drawn on the fly for image restoration: noise, holes, low resolution, lost colour.

Each function maps clean images (B, C, H, W) in [-1, 1] to corrupted ones of the same shape, drawing its
randomness from a `RowRNG` (the step's generator and this process's rows), so a run's corruptions are a pure
function of (seed, step) and do not depend on the number of processes: resume stays exact.

- ``denoise``: additive Gaussian noise of standard deviation `sigma` (in [0, 1] pixel units), clipped;
- ``inpaint``: a hole (``box``: a random rectangle of a quarter to half of each side; ``free``: 2-4 random
  brush strokes, as in free-form inpainting), filled with mid-grey; the hole is returned as a mask;
- ``superres``: `factor`-times area downsampling, then bicubic upsampling back to the size (the classical
  baseline itself);
- ``colorize``: the luminance (ITU-R BT.601) in every channel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..rng import RowRNG

KINDS = ("denoise", "inpaint", "superres", "colorize")


def add_noise(images: Tensor, rng: RowRNG, sigma: float) -> Tensor:
    """Gaussian noise of std `sigma` (pixel units in [0, 1], so 2 * sigma in [-1, 1]), clipped to [-1, 1]."""
    noise = torch.stack([torch.randn(images.shape[1:], generator=g) for g in rng.generators(images.shape[0])])
    return (images + 2 * sigma * noise.to(images.device, images.dtype)).clamp(-1, 1)


def box_holes(n: int, H: int, W: int, rng: RowRNG) -> Tensor:
    """(n, 1, H, W) bool: one random rectangle per image, each side a quarter to a half of the image's."""
    u = rng.rand(n, 4)                                                   # (n, 4): height, width, top, left
    h = (H * (0.25 + 0.25 * u[:, 0])).round().clamp(min=1)
    w = (W * (0.25 + 0.25 * u[:, 1])).round().clamp(min=1)
    top, left = (u[:, 2] * (H - h + 1)).floor(), (u[:, 3] * (W - w + 1)).floor()
    ys, xs = torch.arange(H)[None, :, None], torch.arange(W)[None, None, :]
    inside = ((ys >= top[:, None, None]) & (ys < (top + h)[:, None, None])
              & (xs >= left[:, None, None]) & (xs < (left + w)[:, None, None]))   # (n, H, W)
    return inside[:, None]


def free_holes(n: int, H: int, W: int, rng: RowRNG) -> Tensor:
    """(n, 1, H, W) bool: 2-4 brush strokes per image, each a random walk of 3 segments with a brush of radius
    about a sixteenth of the side (free-form masks, as DeepFill v2 draws them)."""
    u = rng.rand(n, 4, 4, 2)                                             # (n, strokes, vertices, xy)
    k = rng.randint(2, 5, n)                                             # strokes per image
    r = max(1.0, min(H, W) / 16)
    t = torch.linspace(0, 1, 16)[:, None]                                # (16, 1) points along a segment
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32),
                            indexing="ij")
    grid = torch.stack([xs, ys], -1).reshape(-1, 2)                      # (H*W, 2)
    out = torch.zeros(n, H * W, dtype=torch.bool)
    for i in range(n):
        v = u[i, :int(k[i])] * torch.tensor([W - 1, H - 1])               # (s, 4, 2) vertices in pixels
        pts = (v[:, :-1, None] * (1 - t) + v[:, 1:, None] * t).reshape(-1, 2)   # (s*3*16, 2)
        out[i] = torch.cdist(grid, pts).min(1).values <= r
    return out.reshape(n, 1, H, W)


def fill_holes(images: Tensor, holes: Tensor) -> Tensor:
    """The images with their `holes` (B, 1, H, W) set to mid-grey (0)."""
    return images.masked_fill(holes.to(images.device), 0.0)


def downsample_upsample(images: Tensor, factor: int) -> Tensor:
    """`factor`-times area downsampling, then bicubic upsampling to the original size, clipped."""
    H, W = images.shape[-2:]
    small = F.interpolate(images, size=(max(1, H // factor), max(1, W // factor)), mode="area")
    return upsample(small, (H, W))


def upsample(images: Tensor, size: tuple[int, int]) -> Tensor:
    """Bicubic resizing to `size` (H, W), clipped to [-1, 1]: the super-resolution baseline."""
    return F.interpolate(images, size=size, mode="bicubic", align_corners=False).clamp(-1, 1)


def luminance(images: Tensor) -> Tensor:
    """(B, 3, H, W) -> the BT.601 luminance in all three channels (B, 3, H, W)."""
    w = torch.tensor([0.299, 0.587, 0.114], device=images.device, dtype=images.dtype)
    y = (images * w[None, :, None, None]).sum(1, keepdim=True)          # (B, 1, H, W)
    return y.expand_as(images).contiguous()


def corrupt(images: Tensor, kind: str, rng: RowRNG, sigma: float = 0.1, holes: str = "box",
            factor: int = 2) -> tuple[Tensor, Tensor | None]:
    """(corrupted images, the holes (B, 1, H, W) for inpainting, else None) for clean `images`."""
    B, _, H, W = images.shape
    if kind == "denoise":
        return add_noise(images, rng, sigma), None
    if kind == "inpaint":
        hole = (box_holes if holes == "box" else free_holes)(B, H, W, rng).to(images.device)
        return fill_holes(images, hole), hole
    if kind == "superres":
        return downsample_upsample(images, factor), None
    if kind == "colorize":
        return luminance(images), None
    raise ValueError(f"restore.kind={kind!r}: choose one of {', '.join(KINDS)}")
