"""ColorClusters: iGPT's discrete pixels — a k-means colour palette and nearest-colour quantization.

Reference: Image GPT (Chen et al. 2020, openai/image-gpt): one token per pixel, the palette fitted by
k-means on training pixels. The palette is fitted state and is saved with the checkpoint.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import ConfigError
from ..sequence import IGNORE, Sequence, Vocab
from .patches import grid_positions


def kmeans(x: Tensor, k: int, iters: int = 30, seed: int = 0) -> Tensor:
    """Lloyd's k-means with k-means++ seeding on rows of `x` (N, D); returns (k, D) centres."""
    g = torch.Generator().manual_seed(seed)
    x = x.float()
    N = x.shape[0]
    if N < k:
        raise ValueError(f"cannot fit {k} colour clusters to {N} pixels")
    centres = x[torch.randint(N, (1,), generator=g)]
    d2 = torch.cdist(x, centres).squeeze(1) ** 2
    for _ in range(1, k):
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / N)
        nxt = x[torch.multinomial(probs, 1, generator=g)]
        centres = torch.cat([centres, nxt])
        d2 = torch.minimum(d2, (torch.cdist(x, nxt).squeeze(1)) ** 2)
    for _ in range(iters):
        assign = torch.cdist(x, centres).argmin(dim=1)                      # (N,)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).float()[:, None]
        new = torch.where(counts > 0, sums / counts.clamp(min=1), centres)  # keep empty clusters in place
        if torch.allclose(new, centres):
            break
        centres = new
    return centres


class ColorClusters(nn.Module):
    """Quantize (B, C, H, W) images in [-1, 1] to one palette index per pixel and back (a module only so
    the palette travels with the model's state dict).

    Args:
        n_colors: palette size K.
        channels: C.
        image_size: (H, W).
        vocab: the shared vocab; reserves K ids under "colors".
        palette: (K, C) fitted palette; call `fit` when None.
    """

    def __init__(self, n_colors: int, channels: int, image_size: tuple[int, int],
                 vocab: Vocab | None = None, palette: Tensor | None = None) -> None:
        super().__init__()
        if n_colors < 2:
            raise ValueError(f"tokenizer.n_colors={n_colors}: a palette needs at least 2 colours")
        self.n_colors, self.channels, self.image_size = n_colors, channels, tuple(image_size)
        self.grid = self.image_size
        self.num_patches = self.image_size[0] * self.image_size[1]
        self.ids = (vocab or Vocab()).add("colors", n_colors)
        self.patch_dim = 0  # discrete ids
        # (K, C) palette: a buffer, so it is saved with the model's weights and moves with .to(device).
        self.register_buffer("palette", palette if palette is not None else torch.zeros(n_colors, channels))
        self.fitted = palette is not None

    def fit(self, images: Tensor, max_pixels: int = 200_000, seed: int = 0) -> ColorClusters:
        """Fit the palette by k-means on (a sample of) the pixels of `images` (N, C, H, W)."""
        px = images.permute(0, 2, 3, 1).reshape(-1, images.shape[1])  # (N*H*W, C)
        if px.shape[0] < self.n_colors:
            raise ConfigError(f"tokenizer.n_colors={self.n_colors}: the training images have only {px.shape[0]} "
                              "pixels to fit the palette to; lower tokenizer.n_colors")
        if px.shape[0] > max_pixels:
            g = torch.Generator().manual_seed(seed)
            px = px[torch.randperm(px.shape[0], generator=g)[:max_pixels]]
        self.palette = kmeans(px, self.n_colors, seed=seed).to(self.palette.device)
        self.fitted = True
        return self

    def quantize(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, H*W) palette indices in [0, K), raster order."""
        B, C, H, W = images.shape
        px = images.permute(0, 2, 3, 1).reshape(B, H * W, C)                  # (B, HW, C)
        pal = self.palette.to(images.device, images.dtype)
        d = (px[..., None, :] - pal).pow(2).sum(-1)                           # (B, HW, K)
        return d.argmin(dim=-1)

    def dequantize(self, idx: Tensor) -> Tensor:
        """(B, H*W) palette indices -> (B, C, H, W) images."""
        B = idx.shape[0]
        H, W = self.image_size
        px = self.palette.to(idx.device)[idx]                                 # (B, HW, C)
        return px.reshape(B, H, W, self.channels).permute(0, 3, 1, 2)        # (B, C, H, W)

    def encode(self, images: Tensor) -> Sequence:
        """Images -> a `Sequence` of H*W colour tokens with grid positions (no labels)."""
        ids = self.quantize(images) + self.ids.start
        B, N = ids.shape
        pos = grid_positions(1, *self.image_size, device=images.device).expand(B, N, 3)
        return Sequence(ids=ids, labels=torch.full_like(ids, IGNORE), pos=pos)

    def decode(self, seq_or_ids: Sequence | Tensor) -> Tensor:
        """Colour-token ids (B, H*W) (vocab ids, or a `Sequence`) -> images (B, C, H, W)."""
        ids = seq_or_ids.ids if isinstance(seq_or_ids, Sequence) else seq_or_ids
        return self.dequantize((ids - self.ids.start).clamp(0, self.n_colors - 1))
